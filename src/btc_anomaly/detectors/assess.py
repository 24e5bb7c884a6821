"""Per-transaction detectors for a scored batch: rules, watchlists, Mahalanobis, risk score and severity.

``assess`` is what ``model.scoring.score_frame`` (stream, batch) and the API's /predict call after the
forest has scored the batch: it reuses the batch's Arrow columns and feature matrix, so the only new
work is the rules (a few vectorised passes over the outputs), one ``is_in`` over the addresses and one
small matrix product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from btc_anomaly.detectors import rules
from btc_anomaly.detectors.mahalanobis import MahalanobisModel
from btc_anomaly.detectors.risk import (
    Parts,
    combine,
    forest_part,
    mahalanobis_part,
    severity_of,
    signal_names,
    watchlist_weights,
)
from btc_anomaly.detectors.watchlist import Watchlist
from btc_anomaly.features import FEATURES_FULL

_COL = {name: i for i, name in enumerate(FEATURES_FULL)}


@dataclass
class Assessment:
    risk_score: np.ndarray
    severity: np.ndarray  # object array of severity names
    signals: list[list[str]]
    rule_hits: list[list[str]]
    watchlist_hits: list[list[dict[str, Any]]]
    mahalanobis: np.ndarray  # NaN where absent
    parts: Parts

    def row(self, i: int) -> dict[str, Any]:
        """Row ``i``'s columns as scored_transactions stores them (JSON-ready)."""
        d = float(self.mahalanobis[i])
        return {
            "risk_score": float(self.risk_score[i]),
            "severity": str(self.severity[i]),
            "signals": self.signals[i],
            "rule_hits": self.rule_hits[i],
            "watchlist_hits": self.watchlist_hits[i],
            "mahalanobis": None if np.isnan(d) else d,
        }


def mahalanobis_distances(
    models: dict[str, MahalanobisModel] | None, matrix: np.ndarray, kinds: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distance, q99, q999) per row with the model of the row's forest kind; NaN where there is none."""
    n = len(matrix)
    d = np.full(n, np.nan)
    q99 = np.full(n, np.nan)
    q999 = np.full(n, np.nan)
    if not models:
        return d, q99, q999
    for kind, model in models.items():
        mask = kinds == kind
        if not mask.any():
            continue
        cols = [_COL[f] for f in model.feature_names]
        X = matrix[np.ix_(mask, cols)] if not mask.all() else matrix[:, cols]
        d[mask] = model.distance(X)
        q99[mask], q999[mask] = model.q99, model.q999
    return d, q99, q999


def assess(
    table: pa.Table,
    matrix: np.ndarray,
    anomaly_score: np.ndarray,
    threshold: np.ndarray,
    kinds: np.ndarray,
    *,
    mahalanobis: dict[str, MahalanobisModel] | None,
    watchlist: Watchlist,
    header_only: np.ndarray | None = None,
) -> Assessment:
    """Every per-transaction detector for a batch.

    ``table`` holds the batch's canonical ``features.INPUT_COLUMNS`` (Arrow), ``matrix`` its
    ``compute_features`` values (``FEATURES_FULL`` order), ``threshold`` the scoring forest's own
    threshold per row, ``kinds`` the forest per row. ``header_only`` marks rows whose inputs and outputs
    are unknown placeholders (8-field API bodies): for them only the header rules run, and neither the
    watchlists nor the Mahalanobis distance (whose features would be imputed) apply.
    """
    hits = rules.evaluate(table)
    watch = watchlist.match(table.column("inputs").combine_chunks(), table.column("outputs").combine_chunks())
    d, q99, q999 = mahalanobis_distances(mahalanobis, matrix, np.asarray(kinds))
    if header_only is not None and header_only.any():
        hits[header_only] &= rules.HEADER_ONLY
        d[header_only] = np.nan
        for i in np.flatnonzero(header_only):
            watch[i] = []
    p_forest = forest_part(anomaly_score, threshold)
    p_mahal = mahalanobis_part(d, q99, q999)
    absent = [] if mahalanobis else ["mahalanobis"]
    return _assessment(Parts(p_forest, p_mahal, hits, watch, d, absent))


def forest_only(anomaly_score: np.ndarray, threshold: np.ndarray) -> Assessment:
    """The assessment with the detectors off (``Settings.risk_detectors=false``): the risk score is the
    forest's share alone, and rules, watchlists and the Mahalanobis distance are named absent."""
    n = len(anomaly_score)
    hits = np.zeros((n, len(rules.RULES)), dtype=bool)
    p_forest = forest_part(anomaly_score, threshold)
    absent = ["mahalanobis", "watchlists", "rules"]
    return _assessment(Parts(p_forest, np.zeros(n), hits, empty_hits(n), np.full(n, np.nan), absent))


def _assessment(parts: Parts) -> Assessment:
    """Risk score, severity and the per-row lists from a batch's detector parts."""
    weights = [watchlist_weights(w) if w else () for w in parts.watch_hits]
    risk = combine(parts.p_forest, parts.p_mahalanobis, parts.rule_hits, weights)
    return Assessment(
        risk_score=risk,
        severity=severity_of(risk),
        signals=signal_names(parts),
        rule_hits=rules.RuleNames().rows(parts.rule_hits),
        watchlist_hits=parts.watch_hits,
        mahalanobis=parts.mahalanobis,
        parts=parts,
    )


def empty_hits(n: int) -> list[list[Any]]:
    shared: list[Any] = []
    return [shared] * n
