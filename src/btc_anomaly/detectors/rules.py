"""Transparent per-transaction rules: each has an id, a one-line description and a weight in the risk score.

Rules read only the canonical columns the feature function reads (``features.INPUT_COLUMNS``), so they
run on every scoring path (stream, API, 8-field bodies with the per-output rules skipped) and are
evaluated for a whole batch at once with Arrow/NumPy. Rules that need prevouts (fee) never fire on a
transaction whose fee is unknown.

Thresholds were chosen on the bundled real transactions (``data/sample``: 7,006 then, 5,274 since a quarter
of its block transactions was held out for the benchmark) so that each rule fires on a small share of them
(see the counts in tests/unit/test_detectors_rules.py), not on ordinary payments.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from btc_anomaly.features import DUST_LIMIT_SAT, list_column, list_lengths, numeric_column

COIN = 100_000_000


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    description: str
    weight: float  # this rule's share of the risk score when it fires alone (risk.py)
    needs_outputs: bool = True  # False: decided from the header fields alone (8-field bodies too)


RULES: tuple[Rule, ...] = (
    Rule(
        "dust_fanout",
        f"At least 10 outputs, 10 or more of them dust (below {DUST_LIMIT_SAT} sat, OP_RETURN excluded) and "
        "dust at least half of the outputs: address-poisoning or spam fan-out.",
        0.25,
    ),
    Rule(
        "peel_chain_step",
        "One input, two outputs, at least 10 BTC moved and the smaller output at most 1 % of it: one step of a "
        "peel chain (a large balance peeled off in small payments).",
        0.10,
    ),
    Rule(
        "round_large_transfer",
        "An output of at least 10 BTC that is a whole number of BTC.",
        0.15,
    ),
    Rule("very_high_fee_rate", "Fee rate of at least 1,000 sat/vB.", 0.25, needs_outputs=False),
    Rule(
        "excessive_fee_share",
        "Fee of at least half the input value (and at least 10,000 sat): a fat-finger fee or value burnt.",
        0.30,
        needs_outputs=False,
    ),
    Rule(
        "old_style_script",
        "Pays to or spends from a pay-to-pubkey (P2PK) or bare multisig script, rare since about 2012.",
        0.15,
    ),
    Rule("op_return_payload", "Carries an OP_RETURN data output.", 0.05),
    Rule("large_consolidation", "At least 100 inputs merged into at most 2 outputs.", 0.10),
)
RULE_IDS: tuple[str, ...] = tuple(r.id for r in RULES)
RULES_BY_ID: dict[str, Rule] = {r.id: r for r in RULES}
WEIGHTS = np.array([r.weight for r in RULES])
HEADER_ONLY = np.array([not r.needs_outputs for r in RULES])

VERY_HIGH_FEE_RATE = 1_000.0  # sat/vB
FEE_SHARE = 0.5
FEE_SHARE_MIN_SAT = 10_000
OLD_SCRIPTS = ("pubkey", "multisig")
SMALL = 256  # elements below which a column is scanned in Python


def _script_flags(script: pa.Array, names: tuple[str, ...]) -> np.ndarray:
    """Per element, whether its script type is one of ``names`` (one dictionary pass, no per-call hash set)."""
    if not len(script):
        return np.zeros(0, dtype=bool)
    if len(script) <= SMALL:  # the API's single transactions: Python beats Arrow's per-call overhead
        return np.fromiter((v in names for v in script.to_pylist()), bool, len(script))
    encoded = script.dictionary_encode()
    lut = np.array([v in names for v in encoded.dictionary.to_pylist()] + [False], dtype=bool)
    idx = encoded.indices
    if idx.null_count:
        idx = pc.fill_null(idx, len(lut) - 1)
    return lut[idx.to_numpy(zero_copy_only=False)]


def evaluate(table: pa.Table) -> np.ndarray:
    """(rows, len(RULES)) boolean matrix: which rule fires on which transaction.

    Few Arrow calls, then NumPy: on the API's one-transaction batches the per-call overhead of Arrow
    compute functions, not the data, is the cost.
    """
    n = table.num_rows
    hits = np.zeros((n, len(RULES)), dtype=bool)
    if n == 0:
        return hits
    outputs, inputs = list_column(table, "outputs"), list_column(table, "inputs")
    n_out, n_in = list_lengths(outputs), list_lengths(inputs)
    out_flat = outputs.flatten()
    parent = np.repeat(np.arange(n), n_out)
    value = out_flat.field("value").to_numpy(zero_copy_only=False).astype(np.int64)
    out_script = out_flat.field("script_type")
    nulldata = _script_flags(out_script, ("nulldata",))
    col = {r.id: i for i, r in enumerate(RULES)}

    dust = np.bincount(parent, weights=(value < DUST_LIMIT_SAT) & ~nulldata, minlength=n)
    hits[:, col["dust_fanout"]] = (n_out >= 10) & (dust >= 10) & (2 * dust >= n_out)

    total = np.bincount(parent, weights=value, minlength=n)
    smallest = np.full(n, np.inf)
    np.minimum.at(smallest, parent, value.astype(np.float64))
    hits[:, col["peel_chain_step"]] = (
        (n_in == 1) & (n_out == 2) & (total >= 10 * COIN) & (smallest <= 0.01 * total)
    )

    round_big = (value >= 10 * COIN) & (value % COIN == 0)
    hits[:, col["round_large_transfer"]] = np.bincount(parent, weights=round_big, minlength=n) > 0

    fee, vsize, input_value = (
        numeric_column(table, "fee"),
        numeric_column(table, "vsize"),
        numeric_column(table, "input_value"),
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        fee_rate = np.where(vsize > 0, fee / vsize, np.nan)
        fee_share = np.where(input_value > 0, fee / input_value, np.nan)
    # An unknown fee (NaN) compares false: the fee rules need the fee.
    hits[:, col["very_high_fee_rate"]] = fee_rate >= VERY_HIGH_FEE_RATE
    hits[:, col["excessive_fee_share"]] = (fee_share >= FEE_SHARE) & (fee >= FEE_SHARE_MIN_SAT)

    old_out = _script_flags(out_script, OLD_SCRIPTS)
    old_in = _script_flags(inputs.flatten().field("script_type"), OLD_SCRIPTS)
    in_parent = np.repeat(np.arange(n), n_in)
    hits[:, col["old_style_script"]] = (
        np.bincount(parent, weights=old_out, minlength=n)
        + np.bincount(in_parent, weights=old_in, minlength=n)
    ) > 0

    hits[:, col["op_return_payload"]] = numeric_column(table, "has_op_return") > 0
    hits[:, col["large_consolidation"]] = (n_in >= 100) & (n_out <= 2)
    return hits


class RuleNames:
    """Per-row lists of rule ids, shared between rows with the same hits (one list per distinct set)."""

    def __init__(self) -> None:
        self._by_mask: dict[int, list[str]] = {}
        self._bits = 1 << np.arange(len(RULES), dtype=np.int64)

    def rows(self, hits: np.ndarray) -> list[list[str]]:
        masks = (hits.astype(np.int64) * self._bits).sum(axis=1)
        out = []
        for m in masks.tolist():
            names = self._by_mask.get(m)
            if names is None:
                names = [RULES[i].id for i in range(len(RULES)) if m >> i & 1]
                self._by_mask[m] = names
            out.append(names)
        return out


def describe() -> list[dict[str, object]]:
    """The rule catalogue (API, README)."""
    return [{"id": r.id, "description": r.description, "weight": r.weight} for r in RULES]
