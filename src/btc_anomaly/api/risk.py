"""The per-transaction detectors for /predict and /predict/raw: risk score, severity, signals, hits.

The forest's predictions come from ``inference.predict_jobs`` (coalesced, NumPy); this adds what
``model.scoring.score_frame`` adds for the stream, with the same code (``detectors.assess``) and the same
inputs (the batch's canonical columns and ``compute_features`` matrix), so the API and scored_transactions
agree. 8-field bodies have no inputs or outputs: only the header rules apply to them, and their
``absent_signals`` say which signals could not be computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from btc_anomaly.api import inference
from btc_anomaly.api.model_holder import Served
from btc_anomaly.api.schemas import SummaryTransaction
from btc_anomaly.config import Settings
from btc_anomaly.detectors.assess import assess
from btc_anomaly.detectors.risk import details
from btc_anomaly.detectors.watchlist import load_watchlist
from btc_anomaly.features import compute_features

SUMMARY_ABSENT = ["mahalanobis", "watchlists", "output_rules"]


def _table(items: Any) -> tuple[pa.Table, np.ndarray]:
    """The items' canonical columns in request order, and which rows are 8-field bodies."""
    if isinstance(items, inference.CanonicalBatch):
        return items.table, np.zeros(len(items), dtype=bool)
    summary = np.array([isinstance(it, SummaryTransaction) for it in items], dtype=bool)
    if not summary.any():
        return inference.canonical_table(list(items)), summary
    if summary.all():
        return inference.summary_table(list(items)), summary
    canon_idx, summ_idx = np.flatnonzero(~summary), np.flatnonzero(summary)
    table = pa.concat_tables(
        [
            inference.canonical_table([items[i] for i in canon_idx]),
            inference.summary_table([items[i] for i in summ_idx]),
        ]
    )
    position = np.empty(len(items), dtype=np.int64)
    position[np.concatenate([canon_idx, summ_idx])] = np.arange(len(items))
    return table.take(pa.array(position)), summary


def add_risk(served: Served, items: Any, predictions: Sequence[dict[str, Any]], settings: Settings) -> None:
    """Add risk_score, severity, signals, rule_hits, watchlist_hits, mahalanobis, risk_detail and
    absent_signals to each prediction (in place; predictions are in the items' order)."""
    if not len(predictions):
        return
    bundle = served.model.bundle
    table, summary = _table(items)
    matrix = compute_features(table).to_numpy(dtype=np.float64)
    score = np.fromiter((p["anomaly_score"] for p in predictions), np.float64, len(predictions))
    # The model's threshold, not a request's ?threshold=: the risk of a transaction does not depend on
    # how one caller chose to label it.
    threshold = np.fromiter((p["model_threshold"] for p in predictions), np.float64, len(predictions))
    kinds = np.array([p["model_kind"] for p in predictions], dtype=object)
    a = assess(
        table,
        matrix,
        score,
        threshold,
        kinds,
        mahalanobis=bundle.mahalanobis,
        watchlist=load_watchlist(settings.watchlist_dir) if settings.risk_detectors else load_watchlist(None),
        header_only=summary,
    )
    base_absent = list(a.parts.absent)
    for i, p in enumerate(predictions):
        p.update(a.row(i))
        kind = str(kinds[i])
        q = None
        if bundle.mahalanobis and kind in bundle.mahalanobis:
            q = (bundle.mahalanobis[kind].q99, bundle.mahalanobis[kind].q999)
        p["risk_detail"] = details(a.parts, i, float(score[i]), float(threshold[i]), q)
        p["absent_signals"] = list(dict.fromkeys(base_absent + SUMMARY_ABSENT)) if summary[i] else base_absent
