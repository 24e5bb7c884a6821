"""Validated request bodies → predictions, with the served model bundle.

The API keeps request batching and response building; the scoring itself is the one core every path
uses (``model/core.py``: features, the kind's detector against the fee market, reasons, rules,
watchlists, Mahalanobis and the risk score). Validated models go to Arrow directly (no pandas), and
``predict_jobs`` scores several requests in one ``core.score_batch`` call (batcher.py).

8-field bodies (``SummaryTransaction``) become canonical rows whose per-input/output details are unknown:
the lists have the declared lengths (so the count features are computed, not guessed), and every feature
that depends on what is inside them is replaced by the scoring kind's training median and reported in
``missing_features`` (``core.summary_table``, ``core.impute_summary``; see ``schemas.SUMMARY_SCORING``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from btc_anomaly.api.model_holder import Served
from btc_anomaly.api.risk import risk_columns, risk_enabled, risk_watchlist
from btc_anomaly.api.schemas import ExplainMode, SummaryTransaction
from btc_anomaly.api.telemetry import record_predictions
from btc_anomaly.features import FEATURES_PREVOUT, SPECS
from btc_anomaly.model import core
from btc_anomaly.model.core import INPUT_SCHEMA, SUMMARY_IMPUTED, BatchTooLarge
from btc_anomaly.schema import Transaction

_MISSING_CANONICAL = {"full": [], "structural": list(FEATURES_PREVOUT)}
_MISSING_SUMMARY = {
    "full": SUMMARY_IMPUTED["full"],
    "structural": SUMMARY_IMPUTED["structural"] + list(FEATURES_PREVOUT),
}

# The fee market (median fee rate, sat/vB) requests are read against; set by the app to its
# ``model.context.FeeMarket`` (the same provider the stream uses). None: the model's training reference.
_market: dict[str, Callable[[], float | None] | None] = {"current": None}


def set_market(provider: Callable[[], float | None] | None) -> None:
    _market["current"] = provider


def current_market() -> float | None:
    provider = _market["current"]
    return provider() if provider is not None else None


# From this batch size the compiled scorer runs numba's parallel kernel (scorer._PARALLEL_MIN_ROWS). Numba's
# fallback threading layer (workqueue, when neither TBB nor OpenMP is installed) aborts the process if two
# threads enter a parallel kernel at once, and big batches are scored in the thread pool: one at a time.
PARALLEL_ROWS = 4096
_PARALLEL_LOCK = threading.Lock()


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
    summary = np.arange(n) >= n_canon
    with _PARALLEL_LOCK if n >= PARALLEL_ROWS else contextlib.nullcontext():
        batch = core.score_batch(
            bundle,
            table,
            market=current_market(),
            summary=summary,
            watchlist=risk_watchlist(),
            detectors=risk_enabled(),
        )
    score, model_thr, kinds = batch.score, batch.threshold, batch.kinds

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
    explained = core.explain_batch(bundle, batch, row_of[explain_item], top_k) if explain_item.any() else {}
    # Risk fields of the batch's assessment (api/risk.py builds the response lists).
    rc = risk_columns(served, batch)
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
    """``core.summary_table`` for validated 8-field bodies."""
    n = len(items)
    return core.summary_table(
        np.fromiter((it.size for it in items), np.int64, n),
        np.fromiter((it.weight for it in items), np.int64, n),
        [it.fee for it in items],
        np.fromiter((it.inputs_count for it in items), np.int64, n),
        np.fromiter((it.outputs_count for it in items), np.int64, n),
        [it.input_value for it in items],
        [it.output_value for it in items],
    )
