"""Validated request bodies → predictions, with the served model bundle.

This is the API's scoring path. It calls the one feature function (``features.feature_matrix``, the
array behind ``compute_features``), the bundle's compiled forests with the routing of
``ModelBundle.score_features`` (full forest where every prevout feature is known, else structural) and
the model's own explanations (``model.explain.explain``),
as ``model.scoring.score_frame`` does, but without ``score_frame``'s pandas round trips (canonical rows →
DataFrame → Arrow, and a scored DataFrame with per-row lists), which cost ~3x the scoring itself for one
transaction (bench/RESULTS.md, API section). Validated models go to Arrow directly, and the scores and
explanations are computed on the NumPy feature matrix. ``predict_jobs`` scores several requests in one
call (batcher.py). tests/unit/test_api_inference.py asserts equal results to ``score_frame``.

8-field bodies (``SummaryTransaction``) become canonical rows whose per-input/output details are unknown:
the lists have the declared lengths (so the count features are computed, not guessed), and every feature
that depends on what is inside them is replaced by the scoring forest's training median from the bundle's
``FeatureStats`` and reported in ``missing_features``. See ``schemas.SUMMARY_SCORING``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from btc_anomaly.api.model_holder import Served
from btc_anomaly.api.risk import risk_columns
from btc_anomaly.api.schemas import ExplainMode, SummaryTransaction
from btc_anomaly.api.telemetry import record_predictions
from btc_anomaly.features import (
    FEATURES_FULL,
    FEATURES_PREVOUT,
    FEATURES_STRUCTURAL,
    INPUT_COLUMNS,
    SPECS,
    feature_matrix,
)
from btc_anomaly.model.explain import explain
from btc_anomaly.schema import Transaction, arrow_schema

INPUT_SCHEMA = pa.schema([arrow_schema().field(c) for c in INPUT_COLUMNS])
_IN_STRUCT = INPUT_SCHEMA.field("inputs").type.value_type
_OUT_STRUCT = INPUT_SCHEMA.field("outputs").type.value_type

# What the 8 fields determine exactly (through compute_features); everything else is imputed.
SUMMARY_KNOWN = frozenset(
    {
        "log_vsize",
        "witness_share",
        "is_segwit",
        "log_input_count",
        "log_output_count",
        "log_output_value",
        "log_fee_rate",
        "log_fee",
        "log_input_value",
        "fee_share",
    }
)
SUMMARY_IMPUTED: dict[str, list[str]] = {
    "full": [f for f in FEATURES_FULL if f not in SUMMARY_KNOWN],
    "structural": [f for f in FEATURES_STRUCTURAL if f not in SUMMARY_KNOWN],
}
_MISSING_CANONICAL = {"full": [], "structural": list(FEATURES_PREVOUT)}
_MISSING_SUMMARY = {
    "full": SUMMARY_IMPUTED["full"],
    "structural": SUMMARY_IMPUTED["structural"] + list(FEATURES_PREVOUT),
}
_COL = {name: i for i, name in enumerate(FEATURES_FULL)}
_PREVOUT_COLS = [_COL[f] for f in FEATURES_PREVOUT]


# From this batch size the compiled scorer runs numba's parallel kernel (scorer._PARALLEL_MIN_ROWS). Numba's
# fallback threading layer (workqueue, when neither TBB nor OpenMP is installed) aborts the process if two
# threads enter a parallel kernel at once, and big batches are scored in the thread pool: one at a time.
PARALLEL_ROWS = 4096
_PARALLEL_LOCK = threading.Lock()


class BatchTooLarge(ValueError):
    """More inputs + outputs than ``api_max_batch_ios``."""


@dataclass(frozen=True)
class CanonicalBatch:
    """Validated canonical transactions in columns: their hashes and their ``INPUT_COLUMNS`` as Arrow.

    What ``body.BodyParser`` returns for large canonical arrays (no per-transaction model objects); scored
    like a list of ``Transaction`` with the same results."""

    hashes: list[str]
    table: pa.Table

    def __len__(self) -> int:
        return len(self.hashes)


Items = Sequence[Transaction | SummaryTransaction] | CanonicalBatch


@dataclass(frozen=True)
class Job:
    """One request's share of a scoring call: its transactions and how to label and explain them."""

    items: Items
    threshold: float | None = None
    explain: ExplainMode = "anomalies"


def count_ios(items: Items) -> int:
    """Inputs + outputs (declared, for 8-field bodies): what the feature lists will hold."""
    if isinstance(items, CanonicalBatch):
        t = items.table
        return int(pc.sum(pc.list_value_length(t.column("inputs"))).as_py() or 0) + int(
            pc.sum(pc.list_value_length(t.column("outputs"))).as_py() or 0
        )
    return sum(
        it.inputs_count + it.outputs_count
        if isinstance(it, SummaryTransaction)
        else it.input_count + it.output_count
        for it in items
    )


def predict(
    served: Served,
    items: Items,
    *,
    threshold: float | None = None,
    explain: ExplainMode = "anomalies",
    top_k: int = 3,
    max_ios: int | None = None,
) -> list[dict[str, Any]]:
    """One prediction dict per item, in order (the ``schemas.Prediction`` shape)."""
    if max_ios is not None and (ios := count_ios(items)) > max_ios:
        raise BatchTooLarge(f"{ios:,} inputs + outputs in one request exceed the limit of {max_ios:,}")
    return predict_jobs(served, [Job(items, threshold, explain)], top_k=top_k)[0]


def predict_jobs(served: Served, jobs: Sequence[Job], *, top_k: int = 3) -> list[list[dict[str, Any]]]:
    """Score several requests' transactions with one ``compute_features`` call (see batcher.py)."""
    n = sum(len(job.items) for job in jobs)
    if n == 0:
        return [[] for _ in jobs]
    # Feature rows: columnar batches and canonical models first, 8-field bodies last (``_impute`` expects
    # them at the end); ``order[r]`` is the request-order position of feature row r.
    hashes: list[str] = []
    canon: list[int] = []
    summ: list[int] = []
    model_at: dict[int, Any] = {}
    tables: list[pa.Table] = []
    batch_rows: list[np.ndarray] = []
    for job in jobs:
        start = len(hashes)
        if isinstance(job.items, CanonicalBatch):
            hashes.extend(job.items.hashes)
            tables.append(job.items.table)
            batch_rows.append(np.arange(start, len(hashes)))
            continue
        for it in job.items:
            (summ if isinstance(it, SummaryTransaction) else canon).append(len(hashes))
            model_at[len(hashes)] = it
            hashes.append(it.hash)
    if canon:
        tables.append(canonical_table([model_at[i] for i in canon]))
    if summ:
        tables.append(summary_table([model_at[i] for i in summ]))
    order = np.concatenate([*batch_rows, np.asarray(canon, np.int64), np.asarray(summ, np.int64)])
    table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
    n_canon = n - len(summ)

    bundle = served.model.bundle
    matrix = feature_matrix(table)
    if summ:
        _impute(matrix, n_canon, bundle)
    with _PARALLEL_LOCK if n >= PARALLEL_ROWS else contextlib.nullcontext():
        score, model_thr, kinds = score_matrix(bundle, matrix)

    # Per item (request order): the threshold to apply and whether to explain it.
    row_of = np.empty(n, dtype=np.int64)
    row_of[order] = np.arange(n)
    thr_item = np.empty(n)
    explain_item = np.zeros(n, dtype=bool)
    start = 0
    for job in jobs:
        stop = start + len(job.items)
        rows = row_of[start:stop]
        thr_item[start:stop] = model_thr[rows] if job.threshold is None else float(job.threshold)
        if job.explain == "all":
            explain_item[start:stop] = True
        elif job.explain == "anomalies":
            explain_item[start:stop] = score[rows] > thr_item[start:stop]
        start = stop
    thr = np.empty(n)
    thr[row_of] = thr_item
    flags = score > thr
    record_predictions(score, flags, kinds)
    explained = (
        explain_matrix(bundle, matrix, kinds, row_of[explain_item], top_k) if explain_item.any() else {}
    )
    # Risk score, severity, rule/watchlist hits (detectors) from the same table and matrix (api/risk.py).
    rc = risk_columns(served, table, matrix, score, model_thr, kinds, n_canon)
    risk_score, severity, signals = rc["risk_score"], rc["severity"], rc["signals"]
    rule_hits, watchlist_hits, distance = rc["rule_hits"], rc["watchlist_hits"], rc["mahalanobis"]
    risk_detail, absent = rc["risk_detail"], rc["absent_signals"]

    ref = served.ref
    score_l, thr_l, model_thr_l, flags_l = score.tolist(), thr.tolist(), model_thr.tolist(), flags.tolist()
    kinds_l = kinds.tolist()
    out: list[dict[str, Any]] = []
    for i, r in enumerate(row_of.tolist()):
        kind = kinds_l[r]
        summary = r >= n_canon
        reasons = explained.get(r)
        out.append(
            {
                "hash": hashes[i],
                "anomaly_score": score_l[r],
                "is_anomaly": flags_l[r],
                "threshold": thr_l[r],
                "model_threshold": model_thr_l[r],
                "model_kind": kind,
                "reasons": _reasons(reasons, summary, kind) if reasons else [],
                "missing_features": (_MISSING_SUMMARY if summary else _MISSING_CANONICAL)[kind],
                "model": ref,
                "risk_score": risk_score[r],
                "severity": severity[r],
                "signals": signals[r],
                "rule_hits": rule_hits[r],
                "watchlist_hits": watchlist_hits[r],
                "mahalanobis": distance[r],
                "risk_detail": risk_detail[r],
                "absent_signals": absent[r],
            }
        )
    results, start = [], 0
    for job in jobs:
        results.append(out[start : start + len(job.items)])
        start += len(job.items)
    return results


def score_matrix(bundle: Any, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(anomaly_score, model threshold, model_kind) per row of a ``compute_features`` matrix.

    ``ModelBundle.score_features`` on a NumPy matrix instead of a DataFrame: the same routing (the full
    forest where every prevout feature is known, else the structural one) and the same compiled forests,
    without pandas' column selections, which cost ~10x the forest itself for one row.
    ``tests/unit/test_api_inference.py`` asserts identical results to ``score_features``.
    """
    n = len(matrix)
    full = ~np.isnan(matrix[:, _PREVOUT_COLS]).any(axis=1)
    score = np.empty(n)
    threshold = np.empty(n)
    kinds = np.where(full, "full", "structural").astype(object)
    for kind, mask in (("full", full), ("structural", ~full)):
        if not mask.any():
            continue
        forest = bundle.forests[kind]
        cols = [_COL[f] for f in forest.feature_names]
        rows = matrix[:, cols] if mask.all() else matrix[np.ix_(mask, cols)]
        score[mask] = forest.anomaly_score(rows.astype(np.float32))
        threshold[mask] = forest.threshold
    return score, threshold, kinds


def explain_matrix(
    bundle: Any, matrix: np.ndarray, kinds: np.ndarray, rows: np.ndarray, top_k: int
) -> dict[int, list[dict[str, Any]]]:
    """``ModelBundle.explain_features`` for ``rows`` of a feature matrix: row → reason items."""
    out: dict[int, list[dict[str, Any]]] = {}
    for kind in ("full", "structural"):
        idx = rows[kinds[rows] == kind]
        if not len(idx):
            continue
        forest = bundle.forests[kind]
        X = matrix[np.ix_(idx, [_COL[f] for f in forest.feature_names])]
        for r, items in zip(idx.tolist(), explain(forest, bundle.stats[kind], X, top_k=top_k), strict=True):
            out[r] = items
    return out


def _reasons(items: Sequence[dict[str, Any]], summary: bool, kind: str) -> list[dict[str, Any]]:
    imputed = SUMMARY_IMPUTED[kind] if summary else ()
    return [
        {
            "feature": it["feature"],
            "label": SPECS[it["feature"]].label,
            "value": it["value"],
            "display": it["display"],
            "contribution": it["contribution"],
            "share": it["share"],
            "text": it["reason"],
            "imputed": it["feature"] in imputed,
        }
        for it in items
    ]


# --- canonical rows → Arrow ------------------------------------------------------------------------------


def canonical_table(txs: Sequence[Transaction]) -> pa.Table:
    """The ``INPUT_COLUMNS`` of validated canonical transactions as Arrow (what compute_features reads).

    Reads the validated field values from each model's ``__dict__`` (where pydantic keeps them) instead of
    ``model_dump`` per row: the same table (asserted in tests/unit/test_api_inference.py), ~3x faster on
    a 1,000-transaction batch.
    """
    rows = [
        {**t.__dict__, "inputs": [i.__dict__ for i in t.inputs], "outputs": [o.__dict__ for o in t.outputs]}
        for t in txs
    ]
    return pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)


def summary_table(items: Sequence[SummaryTransaction]) -> pa.Table:
    """Canonical rows for 8-field bodies: known columns filled, lists of the declared lengths.

    List entries carry no information (unknown addresses, input values and scripts; zero output values):
    every feature computed from them is overwritten by ``_impute``. Built from NumPy, not Python dicts,
    because a declared count can be in the hundred thousands.
    """
    n = len(items)
    size = np.fromiter((it.size for it in items), np.int64, n)
    weight = np.fromiter((it.weight for it in items), np.int64, n)
    n_in = np.fromiter((it.inputs_count for it in items), np.int64, n)
    n_out = np.fromiter((it.outputs_count for it in items), np.int64, n)
    columns: dict[str, pa.Array] = {
        "size": pa.array(size),
        "vsize": pa.array((weight + 3) // 4),
        "weight": pa.array(weight),
        "locktime": pa.array(np.zeros(n, np.int64)),
        "fee": pa.array([it.fee for it in items], pa.int64()),
        "input_value": pa.array([it.input_value for it in items], pa.int64()),
        "output_value": pa.array([it.output_value for it in items], pa.int64()),
        "is_segwit": pa.array(weight < 4 * size),
        "rbf": pa.array(np.zeros(n, bool)),
        "has_op_return": pa.array(np.zeros(n, bool)),
        "inputs": _blank_lists(n_in, _IN_STRUCT, {"script_type": "unknown"}),
        "outputs": _blank_lists(n_out, _OUT_STRUCT, {"script_type": "nonstandard", "value": 0}),
    }
    return pa.Table.from_arrays([columns[c] for c in INPUT_COLUMNS], schema=INPUT_SCHEMA)


def _blank_lists(counts: np.ndarray, struct: pa.StructType, fill: dict[str, Any]) -> pa.ListArray:
    total = int(counts.sum())
    if total >= 2**31:  # Arrow list offsets are int32
        raise BatchTooLarge(f"{total:,} declared inputs or outputs in one request")
    children = []
    for f in struct:
        if f.name in fill:
            children.append(pa.repeat(pa.scalar(fill[f.name], f.type), total))
        else:
            children.append(pa.nulls(total, f.type))
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    values = pa.StructArray.from_arrays(children, fields=list(struct))
    return pa.ListArray.from_arrays(offsets, values)


def _impute(matrix: np.ndarray, first_summary_row: int, bundle: Any) -> None:
    """Replace the features the 8 fields cannot determine by the scoring forest's training median (in place)."""
    rows = np.arange(first_summary_row, len(matrix))
    full = ~np.isnan(matrix[np.ix_(rows, _PREVOUT_COLS)]).any(axis=1)
    for kind, mask in (("full", full), ("structural", ~full)):
        if not mask.any():
            continue
        names = SUMMARY_IMPUTED[kind]
        stats = bundle.stats[kind]
        medians = np.array([stats.q(f, 0.5) for f in names])
        matrix[np.ix_(rows[mask], [_COL[f] for f in names])] = medians
