"""Why a transaction scored as anomalous: top features and a one-line human reason for each.

The detector's evidence is in decades (-log10 of a training-window probability, ``detector.py``), and so
is the attribution: a tail feature contributes its own tail evidence; the forest's evidence above its
margin is split over its features by *path-length attribution* (``CompiledForest.path_savings``: every
split a transaction passes moves its expected remaining path from c(n_node) to 1 + c(n_child), and the
difference is credited to the split's feature; summed over a path this telescopes to c(psi) - h(x)).
The largest contributions are named.

The reason text places the transaction's value in the training window's distribution, using the
quantiles stored with the model (``FeatureStats``), e.g. "fee rate 412 sat/vB is above the 99.9th
percentile of the training window (210 sat/vB)".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from btc_anomaly.features import SPECS, FeatureSpec
from btc_anomaly.model.detector import FOREST_MARGIN, KindDetector, Parts
from btc_anomaly.model.tails import MIN_RELAY_FEE_RATE

# Quantile levels stored per feature; the tails are dense because that is where reasons are needed.
LEVELS: tuple[float, ...] = (
    0.0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 1.0,
)  # fmt: skip
_HIGH = (0.999, 0.995, 0.99, 0.95, 0.9)
_LOW = (0.001, 0.005, 0.01, 0.05, 0.1)


@dataclass
class FeatureStats:
    """Training-window distribution of each feature: quantiles at ``LEVELS`` and the mean."""

    quantiles: dict[str, list[float]]
    mean: dict[str, float]
    rows: int

    @classmethod
    def from_frame(cls, X: pd.DataFrame, extremes: pd.DataFrame | None = None) -> FeatureStats:
        """Quantiles of ``X`` (a sample); minimum and maximum from ``extremes`` (all rows) when given, so
        "above every transaction of the training window" means every one, as the tail model counts them."""
        q = X.quantile(list(LEVELS), interpolation="nearest")
        quantiles = {c: [float(v) for v in q[c]] for c in X.columns}
        if extremes is not None:
            for c in X.columns:
                quantiles[c][0] = float(extremes[c].min())
                quantiles[c][-1] = float(extremes[c].max())
        return cls(quantiles=quantiles, mean={c: float(X[c].mean()) for c in X.columns}, rows=len(X))

    def to_dict(self) -> dict[str, Any]:
        return {"levels": list(LEVELS), "quantiles": self.quantiles, "mean": self.mean, "rows": self.rows}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureStats:
        if [float(x) for x in d["levels"]] != list(LEVELS):
            raise ValueError("feature stats were stored with other quantile levels")
        return cls(quantiles=d["quantiles"], mean=d["mean"], rows=int(d["rows"]))

    def q(self, feature: str, level: float) -> float:
        return self.quantiles[feature][LEVELS.index(level)]


def explain(
    det: KindDetector,
    stats: FeatureStats,
    X: np.ndarray,
    parts: Parts,
    market: np.ndarray,
    top_k: int = 3,
) -> list[list[dict[str, Any]]]:
    """For each row of X (the detector's input columns, raw values), up to ``top_k`` reason items.

    Candidates are every tail feature with its tail evidence (decades, ``tails.TailModel``) and the
    forest's features with their share of the forest's evidence above its margin (path-length
    attribution, ``CompiledForest.path_savings``); the largest contributions are named. Each item:
    feature, contribution (decades), share (of the named items' total), value, display, reason.
    ``parts`` are the rows' evidence from ``KindDetector.parts``, ``market`` their fee market (sat/vB).
    """
    if len(X) == 0:
        return []
    X = np.asarray(X, dtype=np.float64)
    col = {f: i for i, f in enumerate(det.feature_names)}
    tail_names = det.tails.features
    forest_names = det.forest_feature_names
    forest_part = np.maximum(parts.forest - FOREST_MARGIN, 0.0)
    savings = None
    if (forest_part > 0).any():
        savings = np.zeros((len(X), len(forest_names)))
        rows = np.flatnonzero(forest_part > 0)
        savings[rows] = det.forest.path_savings(parts.forest_input[rows])
    out: list[list[dict[str, Any]]] = []
    for r in range(len(X)):
        candidates: dict[str, float] = {}
        for j, name in enumerate(tail_names):
            if parts.tails[r, j] > 0:
                candidates[name] = float(parts.tails[r, j])
        if savings is not None and forest_part[r] > 0:
            row = np.maximum(savings[r], 0.0)
            total = row.sum()
            if total > 0:
                for j in np.flatnonzero(row):
                    name = forest_names[j]
                    candidates[name] = max(candidates.get(name, 0.0), float(forest_part[r] * row[j] / total))
        top = sorted(candidates.items(), key=lambda kv: -kv[1])[:top_k]
        named = sum(c for _, c in top)
        items = []
        for name, contribution in top:
            v = float(X[r, col[name]])
            past = name in tail_names and bool(parts.past_range[r, tail_names.index(name)])
            items.append(
                {
                    "feature": name,
                    "contribution": round(contribution, 4),
                    "share": round(contribution / named, 3) if named > 0 else 0.0,
                    "value": v,
                    "display": display_value(SPECS[name], v),
                    "reason": reason(name, v, stats, market=float(market[r]), past_range=past),
                }
            )
        out.append(items)
    return out


def reasons_text(items: list[dict[str, Any]]) -> str:
    return "; ".join(i["reason"] for i in items)


def reason(
    feature: str,
    value: float,
    stats: FeatureStats,
    *,
    market: float = math.nan,
    past_range: bool | None = None,
) -> str:
    """One sentence placing ``value`` of ``feature`` in the training distribution (for the fee rate, also
    against the fee market of ``market`` sat/vB). Only a tail feature past the training range
    (``past_range``, which the detector always flags) is said to be beyond every training transaction;
    for other features the strongest claim is the 99.9th percentile."""
    spec = SPECS[feature]
    if math.isnan(value):
        return f"{spec.label} unknown"
    text = _placement(spec, value, stats, past_range)
    if spec.name == "log_fee_rate" and math.isfinite(market) and market > 0:
        rate = math.expm1(value)
        if rate < MIN_RELAY_FEE_RATE:
            text += f", below the minimum relay fee ({MIN_RELAY_FEE_RATE:g} sat/vB)"
        text += f"; {rate / market:,.1f}x the fee market's median ({display_value(spec, math.log1p(market))})"
    return text


def _placement(spec: FeatureSpec, value: float, stats: FeatureStats, past_range: bool | None) -> str:
    feature = spec.name
    if spec.kind == "flag":
        share = 100.0 * stats.mean[feature]
        if value >= 0.5:
            return f"{spec.label}: yes, as only {_pct(share)} of the training window"
        return f"{spec.label}: no, unlike {_pct(100.0 - share)} of the training window"
    shown = display_value(spec, value)
    beyond = past_range if past_range is not None else spec.tail is not None
    if beyond and value > stats.q(feature, 1.0):
        return f"{spec.label} {shown} is above every transaction of the training window (max {_q(spec, stats, 1.0)})"
    for level in _HIGH:
        if value > stats.q(feature, level):
            return (
                f"{spec.label} {shown} is above the {_ordinal(level)} percentile of the training window "
                f"({_q(spec, stats, level)})"
            )
    if beyond and value < stats.q(feature, 0.0):
        return f"{spec.label} {shown} is below every transaction of the training window (min {_q(spec, stats, 0.0)})"
    for level in _LOW:
        if value < stats.q(feature, level):
            return (
                f"{spec.label} {shown} is below the {_ordinal(level)} percentile of the training window "
                f"({_q(spec, stats, level)})"
            )
    return (
        f"{spec.label} {shown} is unusual in combination with the other features "
        f"(median {_q(spec, stats, 0.5)})"
    )


def display_value(spec: FeatureSpec, value: float) -> str:
    if math.isnan(value):
        return "unknown"
    if spec.kind == "flag":
        return "yes" if value >= 0.5 else "no"
    if spec.kind == "share":
        return f"{value:.2f}"
    raw = math.expm1(value) if spec.kind == "log1p" else value
    if spec.unit == "sat" and raw >= 100_000:
        return f"{raw / 1e8:,.4f} BTC"
    if spec.unit == "sat/vB":
        return f"{raw:,.1f} sat/vB" if raw < 10 else f"{raw:,.0f} sat/vB"
    text = f"{raw:,.0f}" if abs(raw - round(raw)) < 1e-6 or raw >= 100 else f"{raw:,.2f}"
    return f"{text} {spec.unit}".strip()


def _q(spec: FeatureSpec, stats: FeatureStats, level: float) -> str:
    return display_value(spec, stats.q(spec.name, level))


def _ordinal(level: float) -> str:
    pct = round(level * 100, 1)
    text = f"{pct:g}"
    if text.endswith("1") and not text.endswith("11"):
        return f"{text}st"
    if text.endswith("2") and not text.endswith("12"):
        return f"{text}nd"
    if text.endswith("3") and not text.endswith("13"):
        return f"{text}rd"
    return f"{text}th"


def _pct(p: float) -> str:
    return f"{p:.2f}%" if p < 1 else f"{p:.1f}%"
