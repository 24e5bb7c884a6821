"""The per-transaction detectors for /predict and /predict/raw: risk score, severity, signals, hits.

``inference.predict_jobs`` scores through the one core (``model.core.score_batch``, which runs the
detectors, as ``model.scoring.score_frame`` does for the stream), so the API and scored_transactions agree;
``risk_columns`` turns the batch's assessment into the response's lists. 8-field bodies have no inputs or outputs: only the header rules apply to them, and their
``absent_signals`` say which signals could not be computed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from btc_anomaly.api.model_holder import Served
from btc_anomaly.config import Settings
from btc_anomaly.detectors.risk import details
from btc_anomaly.detectors.watchlist import Watchlist, load_watchlist
from btc_anomaly.model.core import Batch

SUMMARY_ABSENT = ["mahalanobis", "watchlists", "output_rules"]

# Set from the app's Settings when its routes are built (routes_lake.router): inference.predict_jobs only
# receives the served model.
_config: dict[str, Any] = {"watchlist_dir": None, "enabled": True}


def configure(settings: Settings) -> None:
    _config["watchlist_dir"] = settings.watchlist_dir
    _config["enabled"] = settings.risk_detectors


def risk_enabled() -> bool:
    return bool(_config["enabled"])


def risk_watchlist() -> Watchlist:
    return load_watchlist(_config["watchlist_dir"])


def risk_columns(served: Served, batch: Batch) -> dict[str, list[Any]]:
    """The risk fields (``RISK_FIELDS``) of every row of a scored batch (``core.score_batch``), one list
    per field. Columns, not a dict per row: ``predict_jobs`` puts them straight into its response rows.

    The model's threshold, not a request's ``?threshold=``: a transaction's risk does not depend on how
    one caller chose to label it.
    """
    bundle = served.model.bundle
    a = batch.assessment
    base_absent = list(a.parts.absent)
    summary_absent = list(dict.fromkeys(base_absent + SUMMARY_ABSENT))
    quantiles = {k: (m.q99, m.q999) for k, m in (bundle.mahalanobis or {}).items()}
    kinds_l = [str(k) for k in batch.kinds]
    detail = details(a.parts, a.rule_hits, batch.score, batch.threshold, [quantiles.get(k) for k in kinds_l])
    summary = np.asarray(batch.summary, dtype=bool)
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
