"""The one feature definition: canonical transactions → a float64 matrix with named columns.

``compute_features`` is the only place features are defined. The trainer, the Spark scoring step
(``mapInPandas`` → ``btc_anomaly.model.scoring.score_frame``) and the API all call it, so a model never
sees features computed differently from the ones it was trained on.

Two feature sets, because a transaction decoded from raw hex without a prevout lookup has no input
values or input addresses (``fee``/``input_value`` null):

* ``FEATURES_STRUCTURAL``: computable from the transaction alone (sizes, outputs, flags).
* ``FEATURES_FULL``: the structural ones plus ``FEATURES_PREVOUT`` (fee rate, fee, input value, fee share,
  address reuse), which need the prevouts.

For a transaction without prevouts the ``FEATURES_PREVOUT`` columns are NaN (never an error); the model
bundle routes such rows, and coinbases (no prevouts by definition), to a second forest trained on the
structural features only (see ``btc_anomaly.model``). ``has_prevouts`` tells which rows can use the full
model.

Heavy-tailed quantities (sizes, values, fees, counts) enter as ``log1p``: an isolation tree draws split
points uniformly between a node's min and max, so on a raw satoshi scale almost every split would only
separate the single largest value and nothing else. Shares and flags are in [0, 1].

Vectorised: nested inputs/outputs are flattened once with Arrow and aggregated with NumPy
(``bincount`` / sorting by parent row); there is no per-transaction Python loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from btc_anomaly.schema import Transaction, arrow_schema, utc_times

# Bump when a feature's definition changes; the model records the version it was trained with and
# scoring refuses a model whose features were computed differently.
FEATURE_VERSION = 2

DUST_LIMIT_SAT = 546  # Bitcoin Core's dust threshold for a P2PKH output at the default relay fee
ROUND_UNITS_SAT = (100_000, 1_000_000, 10_000_000)  # 0.001, 0.01 and 0.1 BTC

Kind = Literal["log1p", "linear", "share", "flag"]
# Which end of a feature's distribution is anomalous on its own, whatever the other features say: the
# detector's per-feature tail model (model/tails.py) scores it there, extrapolating past the training range.
Tail = Literal["upper", "lower", "both"]


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    name: str
    label: str  # how a human reason names it
    doc: str
    kind: Kind  # "log1p": value = log1p(raw), raw is shown in reasons; "share": 0..1; "flag": 0/1
    unit: str = ""
    needs_prevouts: bool = False
    tail: Tail | None = None
    # Tail values at or below this (feature units) are never anomalous on their own: one dust or OP_RETURN
    # output is ordinary in some eras (ordinals postage, token protocols); a fan-out of them is not.
    tail_floor: float = float("-inf")


# Script types (Bitcoin Core `decodescript` names) grouped into the output mix buckets.
SCRIPT_GROUPS: dict[str, tuple[str, ...]] = {
    "legacy": ("pubkey", "pubkeyhash"),
    "p2sh": ("scripthash",),
    "segwit_v0": ("witness_v0_keyhash", "witness_v0_scripthash"),
    "taproot": ("witness_v1_taproot",),
    "multisig": ("multisig",),
    "nulldata": ("nulldata",),
    "nonstandard": ("nonstandard", "witness_unknown", "unknown", "coinbase"),  # and anything unlisted
}
_GROUP_NAMES = tuple(SCRIPT_GROUPS)
_GROUP_OF = {st: i for i, names in enumerate(SCRIPT_GROUPS.values()) for st in names}
_NONSTANDARD = _GROUP_NAMES.index("nonstandard")
_NULLDATA = _GROUP_NAMES.index("nulldata")

FEATURE_SPECS: tuple[FeatureSpec, ...] = (
    # --- structural: computable without prevouts ---
    FeatureSpec("log_vsize", "virtual size", "log1p(vsize in vbytes).", "log1p", "vB", tail="upper"),
    FeatureSpec(
        "witness_share",
        "witness share of the size",
        "Witness bytes / total size = (4*size - weight) / (3*size); 0 for legacy, the weight/size ratio "
        "rescaled to [0, 1).",
        "share",
    ),
    FeatureSpec("is_segwit", "segwit", "1 if the transaction carries witness data.", "flag"),
    FeatureSpec("rbf", "opt-in RBF", "1 if any input signals BIP125 replaceability.", "flag"),
    FeatureSpec(
        "locktime_set", "locktime", "1 if nLockTime > 0 (anti fee-sniping wallets, timelocks).", "flag"
    ),
    FeatureSpec("has_op_return", "OP_RETURN output", "1 if an output is OP_RETURN (nulldata).", "flag"),
    FeatureSpec("log_input_count", "input count", "log1p(number of inputs).", "log1p", tail="upper"),
    FeatureSpec("log_output_count", "output count", "log1p(number of outputs).", "log1p", tail="upper"),
    FeatureSpec(
        "log_output_value", "output value", "log1p(total output value in sat).", "log1p", "sat", tail="upper"
    ),
    FeatureSpec(
        "output_max_share",
        "largest output's share of the value",
        "Largest output value / total output value (0 when the outputs carry no value).",
        "share",
    ),
    FeatureSpec(
        "output_hhi",
        "output value concentration (HHI)",
        "Herfindahl index of output values: sum of squared value shares; 1 = one output holds everything.",
        "share",
    ),
    FeatureSpec(
        "value_change_ratio",
        "second-largest/largest output ratio",
        "Second-largest output value / largest (0 with fewer than two outputs). Payment+change pairs sit "
        "well below 1; equal-output (CoinJoin-like) transactions at 1.",
        "share",
    ),
    FeatureSpec(
        "log_dust_output_count",
        "dust outputs",
        f"log1p(outputs below {DUST_LIMIT_SAT} sat, OP_RETURN excluded).",
        "log1p",
        tail="upper",
        tail_floor=float(np.log1p(2)),
    ),
    FeatureSpec(
        "log_nulldata_output_count",
        "OP_RETURN outputs",
        "log1p(OP_RETURN (nulldata) outputs): one is common (token protocols, commitments), many are spam.",
        "log1p",
        tail="upper",
        tail_floor=float(np.log1p(1)),
    ),
    FeatureSpec("dust_output_share", "share of dust outputs", "Dust outputs / outputs.", "share"),
    FeatureSpec(
        "round_output_share",
        "share of round-amount outputs",
        "Outputs whose value is a positive multiple of 0.001 BTC / outputs.",
        "share",
    ),
    FeatureSpec(
        "round_output_level",
        "roundness of output amounts",
        "Mean over outputs of (multiple of 0.001 BTC) + (of 0.01 BTC) + (of 0.1 BTC), divided by 3.",
        "share",
    ),
    *(
        FeatureSpec(
            f"out_share_{g}",
            f"share of {g.replace('_', ' ')} outputs",
            f"Outputs with script type in {SCRIPT_GROUPS[g]} / outputs"
            + (" (any script type not listed elsewhere counts here)." if g == "nonstandard" else "."),
            "share",
        )
        for g in _GROUP_NAMES
    ),
    # --- need prevouts ---
    FeatureSpec(
        "log_fee_rate",
        "fee rate",
        "log1p(fee / vsize), fee rate in sat/vB. Both tails: overpayment and zero or below-relay fees; the tail "
        "model also reads it relative to the fee market (``relative_fee_rate``).",
        "log1p",
        "sat/vB",
        True,
        tail="both",
    ),
    FeatureSpec("log_fee", "fee", "log1p(fee in sat).", "log1p", "sat", True, tail="upper"),
    FeatureSpec(
        "log_input_value",
        "input value",
        "log1p(total input value in sat).",
        "log1p",
        "sat",
        True,
        tail="upper",
    ),
    FeatureSpec(
        "fee_share",
        "fee share of the input value",
        "fee / input_value (0 when nothing is spent).",
        "share",
        needs_prevouts=True,
        tail="upper",
    ),
    FeatureSpec(
        "address_reuse_share",
        "outputs paying back to an input address",
        "Outputs whose address is also one of the inputs' addresses / outputs (change to the same address).",
        "share",
        needs_prevouts=True,
    ),
)

SPECS: dict[str, FeatureSpec] = {s.name: s for s in FEATURE_SPECS}
FEATURES_STRUCTURAL: list[str] = [s.name for s in FEATURE_SPECS if not s.needs_prevouts]
FEATURES_PREVOUT: list[str] = [s.name for s in FEATURE_SPECS if s.needs_prevouts]
FEATURES_FULL: list[str] = FEATURES_STRUCTURAL + FEATURES_PREVOUT
TAIL_FEATURES: dict[str, Tail] = {s.name: s.tail for s in FEATURE_SPECS if s.tail}
# What the forest leaves out: script-type mix, segwit/witness, RBF and locktime follow wallet software, so
# they shift from one era to the next (taproot, segwit adoption) and a forest on them flags a newer era's
# ordinary traffic. The forest looks at amounts, counts, fees and the shape of the outputs.
ERA_FEATURES: frozenset[str] = frozenset(
    {"witness_share", "is_segwit", "rbf", "locktime_set", *(f"out_share_{g}" for g in SCRIPT_GROUPS)}
)

# The fee market a transaction was sent into: the median fee rate of the transactions around it. Training
# takes each row's market from its own block (or, unconfirmed, its 10-minute window); scoring takes it from
# the recent `tx_stats_1m` windows (model/context.py), so the tail model reads fee rates relative to the
# market of their time and a model trained in a cheap week does not flag an expensive one.
MARKET_WINDOW = "10min"
MARKET_MIN_ROWS = 20  # a block or window with fewer fee-paying rows takes the whole frame's median


def market_fee_rates(df: pd.DataFrame) -> np.ndarray:
    """Per row of a canonical frame, the median fee rate (sat/vB) of its block, or of its ``MARKET_WINDOW``
    of ``first_seen`` when unconfirmed; NaN when no row of the frame has a known fee."""
    fee = pd.to_numeric(df["fee"]).to_numpy(dtype=np.float64, na_value=np.nan)
    vsize = pd.to_numeric(df["vsize"]).to_numpy(dtype=np.float64, na_value=np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = np.where(vsize > 0, fee / vsize, np.nan)
    if "is_coinbase" in df.columns:
        # Via pandas' nullable boolean: an unknown flag (None/NA) is no coinbase, and filling it on an object
        # column would make pandas downcast (deprecated).
        rate[df["is_coinbase"].astype("boolean").fillna(False).to_numpy(dtype=bool)] = np.nan
    overall = float(np.nanmedian(rate)) if np.isfinite(rate).any() else np.nan
    height = pd.to_numeric(df.get("block_height", pd.Series(np.nan, index=df.index))).astype("Float64")
    if "first_seen" in df.columns:
        window = utc_times(df["first_seen"]).dt.floor(MARKET_WINDOW)
        window_key = window.astype("int64").astype("Float64")
    else:
        window_key = pd.Series(np.nan, index=df.index, dtype="Float64")
    # Confirmed rows group by block (key >= 0), unconfirmed ones by window (negative keys keep them apart).
    key = height.where(height.notna(), -1.0 - window_key).to_numpy(dtype=np.float64, na_value=np.nan)
    frame = pd.DataFrame({"key": key, "rate": rate})
    grouped = frame.groupby("key", dropna=False)["rate"]
    median = grouped.transform("median").to_numpy(dtype=np.float64)
    count = grouped.transform("count").to_numpy(dtype=np.float64)
    return np.where((count >= MARKET_MIN_ROWS) & np.isfinite(median), median, overall)


def relative_fee_rate(log_fee_rate: np.ndarray, market_fee_rate: np.ndarray | float) -> np.ndarray:
    """The fee rate against the market: log1p(fee rate) - log1p(market median), 0 = the market's median."""
    return np.asarray(log_fee_rate, dtype=np.float64) - np.log1p(
        np.asarray(market_fee_rate, dtype=np.float64)
    )


# Canonical columns compute_features reads; nothing else is needed (hash and timestamps are not features).
INPUT_COLUMNS: tuple[str, ...] = (
    "size",
    "vsize",
    "weight",
    "locktime",
    "fee",
    "input_value",
    "output_value",
    "is_segwit",
    "rbf",
    "has_op_return",
    "inputs",
    "outputs",
)
_SCHEMA = arrow_schema()
_INPUT_SCHEMA = pa.schema([_SCHEMA.field(c) for c in INPUT_COLUMNS])


def compute_features(df: pd.DataFrame | pa.Table) -> pd.DataFrame:
    """Feature matrix (float64, columns ``FEATURES_FULL``) of canonical transactions, one row per input row.

    ``df`` holds at least ``INPUT_COLUMNS`` with canonical types; ``inputs``/``outputs`` may be lists of
    dicts (JSON), arrays of dicts (Delta/Spark via Arrow) or Arrow list<struct> columns. The result
    keeps a pandas input's index. ``FEATURES_PREVOUT`` columns are NaN where ``has_prevouts`` is false.
    """
    matrix = feature_matrix(df)
    index = df.index if isinstance(df, pd.DataFrame) else pd.RangeIndex(len(matrix))
    return pd.DataFrame(matrix, columns=FEATURES_FULL, index=index)


def feature_matrix(df: pd.DataFrame | pa.Table) -> np.ndarray:
    """``compute_features``' values as a (rows, ``len(FEATURES_FULL)``) float64 array.

    The same computation without the DataFrame around it, for the API, where building the frame cost
    more than a one-transaction request's features. Written for small batches as much as large ones:
    NumPy over Arrow buffers, few Arrow compute calls (each costs microseconds whatever the size).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        return _feature_matrix(_as_table(df))


def _feature_matrix(table: pa.Table) -> np.ndarray:
    n = table.num_rows
    f: dict[str, np.ndarray] = {}

    size = numeric_column(table, "size")
    vsize = numeric_column(table, "vsize")
    weight = numeric_column(table, "weight")
    fee = numeric_column(table, "fee")  # NaN where unknown
    input_value = numeric_column(table, "input_value")
    output_value = numeric_column(table, "output_value")

    f["log_vsize"] = np.log1p(vsize)
    witness = np.where(size > 0, (4.0 * size - weight) / (3.0 * size), 0.0)
    f["witness_share"] = _unit_interval(witness)
    f["is_segwit"] = numeric_column(table, "is_segwit")
    f["rbf"] = numeric_column(table, "rbf")
    f["locktime_set"] = (numeric_column(table, "locktime") > 0).astype(np.float64)
    f["has_op_return"] = numeric_column(table, "has_op_return")

    outputs = list_column(table, "outputs")
    inputs = list_column(table, "inputs")
    out_len = list_lengths(outputs)
    n_out = out_len.astype(np.float64)
    n_in = list_lengths(inputs).astype(np.float64)
    f["log_input_count"] = np.log1p(n_in)
    f["log_output_count"] = np.log1p(n_out)
    f["log_output_value"] = np.log1p(output_value)

    out_flat = outputs.flatten()
    out_parent = np.repeat(np.arange(n, dtype=np.int64), out_len)
    out_int = out_flat.field("value").to_numpy(zero_copy_only=False).astype(np.int64)
    out_value = out_int.astype(np.float64)
    out_group = _script_groups(out_flat.field("script_type"))
    safe_out = np.maximum(n_out, 1.0)

    # Value shares use the outputs' own sum, not output_value, so they stay in [0, 1] by construction.
    total = np.bincount(out_parent, weights=out_value, minlength=n)
    share = np.where(total[out_parent] > 0, out_value / total[out_parent], 0.0)
    f["output_hhi"] = np.bincount(out_parent, weights=share * share, minlength=n)
    largest, second = _top_two(out_parent, out_value, n)
    f["output_max_share"] = np.where(total > 0, largest / total, 0.0)
    f["value_change_ratio"] = np.where(largest > 0, second / largest, 0.0)

    not_nulldata = out_group != _NULLDATA
    dust = (out_value < DUST_LIMIT_SAT) & not_nulldata
    dust_count = np.bincount(out_parent, weights=dust, minlength=n)
    f["log_dust_output_count"] = np.log1p(dust_count)
    f["log_nulldata_output_count"] = np.log1p(np.bincount(out_parent, weights=~not_nulldata, minlength=n))
    f["dust_output_share"] = dust_count / safe_out

    positive = out_int > 0
    level = np.zeros(len(out_int), dtype=np.float64)
    for unit in ROUND_UNITS_SAT:
        level += positive & (out_int % unit == 0)
    f["round_output_share"] = np.bincount(out_parent, weights=level > 0, minlength=n) / safe_out
    f["round_output_level"] = np.bincount(out_parent, weights=level, minlength=n) / (3.0 * safe_out)

    mix = np.bincount(out_parent * len(_GROUP_NAMES) + out_group, minlength=n * len(_GROUP_NAMES))
    mix = mix.reshape(n, len(_GROUP_NAMES)) / safe_out[:, None]
    for i, g in enumerate(_GROUP_NAMES):
        f[f"out_share_{g}"] = mix[:, i]

    prev = _known(fee, input_value)
    fee_rate = np.where(vsize > 0, fee / vsize, 0.0)
    fee_share = np.where(input_value > 0, fee / input_value, 0.0)
    f["log_fee_rate"] = np.log1p(np.maximum(fee_rate, 0.0))
    f["log_fee"] = np.log1p(np.maximum(fee, 0.0))
    f["log_input_value"] = np.log1p(input_value)
    f["fee_share"] = _unit_interval(fee_share)
    f["address_reuse_share"] = _address_reuse(inputs, outputs, out_parent, n) / safe_out

    matrix = np.empty((n, len(FEATURES_FULL)), dtype=np.float64)
    for j, name in enumerate(FEATURES_STRUCTURAL):
        matrix[:, j] = f[name]
    for j, name in enumerate(FEATURES_PREVOUT, start=len(FEATURES_STRUCTURAL)):
        matrix[:, j] = np.where(prev, f[name], np.nan)
    return matrix


def features_from_transactions(txs: Iterable[Transaction | Mapping[str, Any]]) -> pd.DataFrame:
    """``compute_features`` for a list of ``Transaction`` objects or canonical dicts (e.g. parsed JSON)."""
    rows = [t.model_dump(include=set(INPUT_COLUMNS)) if isinstance(t, Transaction) else t for t in txs]
    return compute_features(pa.Table.from_pylist(rows, schema=_INPUT_SCHEMA))


def has_prevouts(df: pd.DataFrame | pa.Table) -> np.ndarray:
    """Rows whose fee and input value are known (so the full feature set applies). Coinbases never do."""
    if isinstance(df, pa.Table):
        fee, input_value = numeric_column(df, "fee"), numeric_column(df, "input_value")
    else:
        fee = pd.to_numeric(df["fee"]).to_numpy(dtype=np.float64, na_value=np.nan)
        input_value = pd.to_numeric(df["input_value"]).to_numpy(dtype=np.float64, na_value=np.nan)
    return _known(fee, input_value)


def _known(fee: np.ndarray, input_value: np.ndarray) -> np.ndarray:
    return ~(np.isnan(fee) | np.isnan(input_value))


# --- helpers -------------------------------------------------------------------------------------


def _as_table(df: pd.DataFrame | pa.Table) -> pa.Table:
    present = set(df.column_names if isinstance(df, pa.Table) else df.columns)
    missing = [c for c in INPUT_COLUMNS if c not in present]
    if missing:
        raise KeyError(f"compute_features needs canonical columns, missing: {missing}")
    if isinstance(df, pa.Table):
        return df if df.column_names == list(INPUT_COLUMNS) else df.select(list(INPUT_COLUMNS))
    arrays = []
    for field in _INPUT_SCHEMA:
        col = df[field.name]
        if pa.types.is_list(field.type):
            # from_pandas handles both Python lists (JSON) and NumPy object arrays (Arrow → pandas).
            arrays.append(pa.array(col.to_numpy(dtype=object), type=field.type, from_pandas=True))
        else:
            arrays.append(pa.Array.from_pandas(col))
    return pa.Table.from_arrays(arrays, names=list(INPUT_COLUMNS))


def numeric_column(table: pa.Table, name: str) -> np.ndarray:
    """A numeric or boolean column as float64, NaN for null (also used by detectors/rules.py)."""
    # Arrow gives nullable ints as float64 with NaN and nullable bools as objects with None (→ NaN here);
    # NumPy's conversion instead of two pc.cast calls: ~1 µs per column instead of ~8-14 (one-tx requests).
    return np.asarray(table.column(name).to_numpy(), dtype=np.float64)


def list_column(table: pa.Table, name: str) -> pa.ListArray:
    """A list column as one array, null lists as empty ones."""
    col = table.column(name)
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if arr.null_count:
        arr = pc.fill_null(arr, pa.scalar([], type=arr.type))
    return arr


def list_lengths(lists: pa.ListArray) -> np.ndarray:
    """Per row, the list's length (``lists`` has no nulls: see ``list_column``)."""
    return np.diff(lists.offsets.to_numpy()).astype(np.int64)


def _unit_interval(x: np.ndarray) -> np.ndarray:
    return np.minimum(np.maximum(x, 0.0), 1.0)  # np.clip, which costs ~5x more on a one-row array


def _script_groups(script_type: pa.Array) -> np.ndarray:
    """Output mix group of each script type. A null script type (a JSON body or pandas row that left the
    key out or sent None) counts as ``nonstandard``, the group of the schema's default for outputs
    (``TxOutput.script_type = "nonstandard"``; an input's default ``"unknown"`` is in the same group)."""
    encoded = pc.dictionary_encode(script_type)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    # One slot past the dictionary for nulls: filling null indices with 0 would give them the group of
    # whichever script type happened to be seen first.
    names = encoded.dictionary.to_pylist()
    lut = np.array([_GROUP_OF.get(s, _NONSTANDARD) for s in names] + [_NONSTANDARD], dtype=np.int64)
    indices = encoded.indices
    if indices.null_count:
        indices = pc.fill_null(indices, len(names))
    codes = indices.to_numpy(zero_copy_only=False)
    return lut[codes] if len(codes) else np.zeros(0, dtype=np.int64)


def _top_two(parent: np.ndarray, value: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Largest and second-largest value per parent row (0 where absent)."""
    largest = np.zeros(n)
    second = np.zeros(n)
    if not len(value):
        return largest, second
    order = np.lexsort((value, parent))  # by parent, then value ascending: group maxima sit at group ends
    p, v = parent[order], value[order]
    same_next = np.zeros(len(p), dtype=bool)  # element i and i + 1 belong to the same row
    np.equal(p[1:], p[:-1], out=same_next[:-1])
    last = ~same_next
    largest[p[last]] = v[last]
    # The second-largest is the element just before a group end, when it belongs to the same group.
    before_last = np.zeros(len(p), dtype=bool)
    np.logical_and(last[1:], same_next[:-1], out=before_last[:-1])
    second[p[before_last]] = v[before_last]
    return largest, second


def _address_reuse(inputs: pa.ListArray, outputs: pa.ListArray, out_parent: np.ndarray, n: int) -> np.ndarray:
    """Per row, how many outputs pay to an address that also appears among the row's inputs."""
    in_addr = inputs.flatten().field("address")
    out_addr = outputs.flatten().field("address")
    if not len(in_addr) or not len(out_addr):
        return np.zeros(n)
    in_parent = np.repeat(np.arange(n, dtype=np.int64), list_lengths(inputs))
    # One dictionary over both sides turns "same address" into "same integer code".
    both = pc.dictionary_encode(pa.concat_arrays([in_addr, out_addr]))
    indices = both.indices
    if indices.null_count:
        valid = ~np.asarray(indices.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        codes = pc.fill_null(indices, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    else:
        valid = np.ones(len(indices), dtype=bool)
        codes = indices.to_numpy(zero_copy_only=False).astype(np.int64)
    width = len(both.dictionary) + 1
    k_in = len(in_addr)
    in_keys = np.sort((in_parent * width + codes[:k_in])[valid[:k_in]])
    if not len(in_keys):
        return np.zeros(n)
    out_keys = out_parent * width + codes[k_in:]
    # Membership by binary search in the sorted input keys: np.isin's setup costs ~50 µs per call.
    at = np.minimum(np.searchsorted(in_keys, out_keys), len(in_keys) - 1)
    reused = (in_keys[at] == out_keys) & valid[k_in:]
    return np.bincount(out_parent, weights=reused, minlength=n)
