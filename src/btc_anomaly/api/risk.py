"""The per-transaction detectors for /predict and /predict/raw: risk score, severity, signals, hits.

``inference.predict_jobs`` (coalesced, NumPy) calls ``risk_columns`` with its batch's canonical columns and
``compute_features`` matrix; it adds what ``model.scoring.score_frame`` adds for the stream, with the same
code (``detectors.assess``), so the API and scored_transactions agree. 8-field bodies have no inputs or outputs: only the header rules apply to them, and their
``absent_signals`` say which signals could not be computed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from btc_anomaly.api.model_holder import Served
from btc_anomaly.config import Settings
from btc_anomaly.detectors.assess import assess, forest_only
from btc_anomaly.detectors.risk import details
from btc_anomaly.detectors.watchlist import load_watchlist

SUMMARY_ABSENT = ["mahalanobis", "watchlists", "output_rules"]

# Set from the app's Settings when its routes are built (routes_lake.router): inference.predict_jobs, which
# calls ``risk_columns``, only receives the served model.
_config: dict[str, Any] = {"watchlist_dir": None, "enabled": True}


def configure(settings: Settings) -> None:
    _config["watchlist_dir"] = settings.watchlist_dir
    _config["enabled"] = settings.risk_detectors


def risk_columns(
    served: Served,
    table: pa.Table,
    matrix: np.ndarray,
    score: np.ndarray,
    model_threshold: np.ndarray,
    kinds: np.ndarray,
    first_summary_row: int,
) -> dict[str, list[Any]]:
    """The risk fields (``RISK_FIELDS``) of every feature row of a ``predict_jobs`` batch, one list per
    field (rows from ``first_summary_row`` on are 8-field bodies). Uses the batch's own table and feature
    matrix: nothing is computed twice. Columns, not a dict per row: ``predict_jobs`` puts them straight
    into its response rows.

    ``model_threshold``, not a request's ``?threshold=``: a transaction's risk does not depend on how one
    caller chose to label it.
    """
    n = len(score)
    bundle = served.model.bundle
    summary = np.arange(n) >= first_summary_row
    a = (
        assess(
            table,
            matrix,
            score,
            model_threshold,
            kinds,
            mahalanobis=bundle.mahalanobis,
            watchlist=load_watchlist(_config["watchlist_dir"]),
            header_only=summary,
        )
        if _config["enabled"]
        else forest_only(score, model_threshold)
    )
    base_absent = list(a.parts.absent)
    summary_absent = list(dict.fromkeys(base_absent + SUMMARY_ABSENT))
    quantiles = {k: (m.q99, m.q999) for k, m in (bundle.mahalanobis or {}).items()}
    kinds_l = [str(k) for k in kinds]
    detail = details(a.parts, a.rule_hits, score, model_threshold, [quantiles.get(k) for k in kinds_l])
    return {
        "risk_score": a.risk_score.tolist(),
        "severity": a.severity.tolist(),
        "signals": a.signals,
        "rule_hits": a.rule_hits,
        "watchlist_hits": a.watchlist_hits,
        # NaN: absent
        "mahalanobis": [None if d != d else d for d in a.mahalanobis.tolist()],
        "risk_detail": detail,
        "absent_signals": [summary_absent if s else base_absent for s in summary.tolist()],
    }
