"""Why a transaction scored as anomalous: top features and a one-line human reason for each.

Attribution is *path-length attribution* (``CompiledForest.path_savings``): every split a transaction
passes on its way down a tree moves its expected remaining path from c(n_node) to 1 + c(n_child); the
difference is credited to the split's feature. Summed over a path this telescopes to c(psi) - h(x), so
per transaction the contributions add up exactly to how much shorter than average its isolation
path was, which is what the anomaly score measures. The features with the largest positive
contribution are the ones that isolated it.

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
from btc_anomaly.model.scorer import CompiledForest

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
    def from_frame(cls, X: pd.DataFrame) -> FeatureStats:
        q = X.quantile(list(LEVELS), interpolation="nearest")
        return cls(
            quantiles={c: [float(v) for v in q[c]] for c in X.columns},
            mean={c: float(X[c].mean()) for c in X.columns},
            rows=len(X),
        )

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
    forest: CompiledForest, stats: FeatureStats, X: pd.DataFrame | np.ndarray, top_k: int = 3
) -> list[list[dict[str, Any]]]:
    """For each row of X (features of ``forest``), up to ``top_k`` features that shortened its path.

    Each item: feature, contribution (path length saved, in splits), share (of the total saving),
    value (feature value), display (human value), reason (one sentence).
    """
    if len(X) == 0:
        return []
    values = X[forest.feature_names].to_numpy(dtype=np.float64) if isinstance(X, pd.DataFrame) else X
    savings = forest.path_savings(values)
    out: list[list[dict[str, Any]]] = []
    for r in range(len(X)):
        row = savings[r]
        positive = row[row > 0].sum()
        items = []
        for j in np.argsort(-row)[:top_k]:
            if row[j] <= 0:
                break
            name = forest.feature_names[j]
            v = float(values[r, j])
            items.append(
                {
                    "feature": name,
                    "contribution": round(float(row[j]), 4),
                    "share": round(float(row[j] / positive), 3) if positive > 0 else 0.0,
                    "value": v,
                    "display": display_value(SPECS[name], v),
                    "reason": reason(name, v, stats),
                }
            )
        out.append(items)
    return out


def reasons_text(items: list[dict[str, Any]]) -> str:
    return "; ".join(i["reason"] for i in items)


def reason(feature: str, value: float, stats: FeatureStats) -> str:
    """One sentence placing ``value`` of ``feature`` in the training distribution."""
    spec = SPECS[feature]
    if math.isnan(value):
        return f"{spec.label} unknown"
    if spec.kind == "flag":
        share = 100.0 * stats.mean[feature]
        if value >= 0.5:
            return f"{spec.label}: yes, as only {_pct(share)} of the training window"
        return f"{spec.label}: no, unlike {_pct(100.0 - share)} of the training window"
    shown = display_value(spec, value)
    if value > stats.q(feature, 1.0):
        return f"{spec.label} {shown} is above every transaction of the training window (max {_q(spec, stats, 1.0)})"
    for level in _HIGH:
        if value > stats.q(feature, level):
            return (
                f"{spec.label} {shown} is above the {_ordinal(level)} percentile of the training window "
                f"({_q(spec, stats, level)})"
            )
    if value < stats.q(feature, 0.0):
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
