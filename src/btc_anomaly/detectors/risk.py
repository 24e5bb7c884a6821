"""One 0-100 risk score and a severity per transaction, from every per-transaction signal.

Each signal i gives a part p_i in [0, 1), and the parts are combined like independent pieces of evidence
(a noisy-OR)::

    risk = 100 * (1 - (1 - p_forest) * (1 - p_mahalanobis) * prod_rules (1 - w_r) * prod_watchlist (1 - w_a))

* forest (the model: tails + isolation forest, ``model/detector.py``): with p = 1 - anomaly_score (the
  share of training transactions at least as unusual) and c = 1 - threshold (the contamination),
  ``x = log10(p) / log10(c)`` is 0 for p = 1, 1 at the threshold and 2 at p = c²;
  ``p_forest = 0.70 * (1 - 2^(-x^2))``: ~0 for ordinary transactions, 35 (medium) at the threshold, rising
  smoothly towards 70 (high) as p falls; the model alone never makes "severe": that needs a second signal.
* mahalanobis: d is the distance from the training mean (``mahalanobis.py``), q99 and q999 the training
  rows' 99th and 99.9th percentiles of d; ``p_mahalanobis = 0.40 * clip((d - q99) / (q999 - q99), 0, 1)``.
  Absent (0, and named in ``absent_signals``) when the model bundle predates it or the body has no
  per-output detail (8-field requests).
* rules: every rule that fires contributes its weight ``w_r`` (``rules.RULES``, 0.05-0.30).
* watchlists: every distinct listed address the transaction spends from or pays to contributes the
  weight of its category (``CATEGORY_WEIGHTS``: sanctions 0.90, ransomware 0.75, hacks/scams 0.60,
  mixers 0.50, ...; the largest one when the address is on several lists).

Severity: low < 25 <= medium < 50 <= high < 75 <= severe. So one sanctioned address is severe on its own,
a ransomware address is severe, a forest flag with a rule or an extreme Mahalanobis distance is high,
and the forest alone is medium or high.

Properties (tested): the score is non-decreasing in each signal (a higher forest score or distance, one
more rule or listed address never lowers it), stays in [0, 100), and is a pure function of its inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from btc_anomaly.detectors.rules import RULES, WEIGHTS

SEVERITIES = ("low", "medium", "high", "severe")
SEVERITY_BANDS = (25.0, 50.0, 75.0)  # lower bounds of medium, high, severe

FOREST_MAX = 0.70
MIN_P = 1e-300  # p = 0 (a score of exactly 1) is the most anomalous, not an error
MAHALANOBIS_MAX = 0.40

CATEGORY_WEIGHTS: dict[str, float] = {
    "sanctions": 0.90,
    "sanction": 0.90,
    "ransomware": 0.75,
    "sextortion": 0.60,
    "service_hack": 0.60,
    "scam": 0.60,
    "phishing": 0.60,
    "market": 0.60,  # darknet market
    "ponzi_scheme": 0.50,
    "mixing_service": 0.50,
    "coinjoin": 0.20,
    "exchange": 0.05,  # e.g. a hacked exchange's own cold wallet in hacks.yaml: the victim, not the thief
}
DEFAULT_CATEGORY_WEIGHT = 0.50


def category_weight(category: str) -> float:
    return CATEGORY_WEIGHTS.get(category, DEFAULT_CATEGORY_WEIGHT)


def severity_of(risk: np.ndarray) -> np.ndarray:
    """Severity names (object array) for risk scores."""
    idx = np.searchsorted(np.asarray(SEVERITY_BANDS), np.asarray(risk, dtype=np.float64), side="right")
    return np.asarray(SEVERITIES, dtype=object)[idx]


def severity_rank(name: str) -> int:
    return SEVERITIES.index(name)


def forest_part(score: np.ndarray, threshold: np.ndarray) -> np.ndarray:
    p = np.clip(1.0 - np.asarray(score, dtype=np.float64), MIN_P, 1.0)
    c = np.clip(1.0 - np.asarray(threshold, dtype=np.float64), MIN_P, 0.5)
    x = np.log10(p) / np.log10(c)
    return FOREST_MAX * (1.0 - np.exp2(-(x * x)))


def mahalanobis_part(d: np.ndarray, q99: np.ndarray | float, q999: np.ndarray | float) -> np.ndarray:
    d = np.asarray(d, dtype=np.float64)
    span = np.maximum(np.asarray(q999, dtype=np.float64) - q99, 1e-9)
    part = MAHALANOBIS_MAX * np.clip((d - q99) / span, 0.0, 1.0)
    return np.where(np.isnan(d), 0.0, part)


def watchlist_weights(hits: Sequence[dict[str, Any]]) -> list[float]:
    """One weight per distinct listed address: its largest category weight."""
    best: dict[str, float] = {}
    for h in hits:
        w = category_weight(h["category"])
        best[h["address"]] = max(best.get(h["address"], 0.0), w)
    return list(best.values())


def combine(
    p_forest: np.ndarray,
    p_mahalanobis: np.ndarray,
    rule_hits: np.ndarray,
    watch_weights: Sequence[Sequence[float]] | None = None,
) -> np.ndarray:
    """The module-doc formula for a batch: parts and hits in, risk in [0, 100) out."""
    keep = (1.0 - np.asarray(p_forest, dtype=np.float64)) * (
        1.0 - np.asarray(p_mahalanobis, dtype=np.float64)
    )
    if rule_hits.size:
        keep = keep * np.exp(rule_hits.astype(np.float64) @ np.log1p(-WEIGHTS))
    if watch_weights is not None:
        for i, ws in enumerate(watch_weights):
            for w in ws:
                keep[i] *= 1.0 - w
    # Rounded so that a stored score reads the same everywhere (and is bit-reproducible).
    return np.round(100.0 * (1.0 - keep), 2)


@dataclass
class Parts:
    """Everything that went into the scores of a batch, for signals and explanations."""

    p_forest: np.ndarray
    p_mahalanobis: np.ndarray
    rule_hits: np.ndarray
    watch_hits: list[list[dict[str, Any]]]
    mahalanobis: np.ndarray  # NaN where absent
    absent: list[str] = field(default_factory=list)  # signals this batch could not compute at all


def signal_names(parts: Parts) -> list[list[str]]:
    """Per row, the signals that raised its score: forest, mahalanobis, rule:<id>, watchlist:<list>."""
    # One integer per row says which of forest, mahalanobis and each rule fired; rows with the same
    # integer share one list.
    n_rules = parts.rule_hits.shape[1]
    keys = (
        (parts.p_forest > 0).astype(np.int64)
        + 2 * (parts.p_mahalanobis > 0)
        + parts.rule_hits.astype(np.int64) @ (4 << np.arange(n_rules, dtype=np.int64))
    )
    cache: dict[int, list[str]] = {}
    out: list[list[str]] = []
    for i, key in enumerate(keys.tolist()):
        names = cache.get(key)
        if names is None:
            names = ["forest"] * (key & 1) + ["mahalanobis"] * (key >> 1 & 1)
            names += [f"rule:{RULES[j].id}" for j in range(n_rules) if key >> (j + 2) & 1]
            cache[key] = names
        hits = parts.watch_hits[i]
        if hits:
            names = names + [f"watchlist:{name}" for name in dict.fromkeys(h["list"] for h in hits)]
        out.append(names)
    return out


# A rule's entry is the same for every row: built once and shared by the rows it fired on (the rows are
# serialized, never modified).
_RULE_DETAILS = {
    r.id: {"signal": f"rule:{r.id}", "points": round(100 * r.weight, 2), "detail": r.description}
    for r in RULES
}


def details(
    parts: Parts,
    rule_ids: Sequence[Sequence[str]],
    score: np.ndarray,
    threshold: np.ndarray,
    quantiles: Sequence[tuple[float, float] | None],
) -> list[list[dict[str, Any]]]:
    """Per row, its contributing signals as {signal, points, detail}; points = the risk it alone would give.

    ``rule_ids``: the rows' fired rule ids; ``quantiles``: each row's Mahalanobis (p99, p99.9) or None.
    """
    p_forest, p_mahal = parts.p_forest.tolist(), parts.p_mahalanobis.tolist()
    score_l, thr_l, dist = score.tolist(), threshold.tolist(), parts.mahalanobis.tolist()
    out: list[list[dict[str, Any]]] = []
    for i in range(len(p_forest)):
        row: list[dict[str, Any]] = []
        if p_forest[i] > 0:
            row.append(
                {
                    "signal": "forest",
                    "points": round(100 * p_forest[i], 2),
                    "detail": f"anomaly score {score_l[i]:.3f} (threshold {thr_l[i]:.3f})",
                }
            )
        if p_mahal[i] > 0:
            q = quantiles[i]
            extra = f" (training p99 {q[0]:.1f}, p99.9 {q[1]:.1f})" if q else ""
            row.append(
                {
                    "signal": "mahalanobis",
                    "points": round(100 * p_mahal[i], 2),
                    "detail": f"distance {dist[i]:.1f} from the training mean{extra}",
                }
            )
        row.extend(_RULE_DETAILS[rid] for rid in rule_ids[i])
        seen: set[tuple[str, str]] = set()
        for h in parts.watch_hits[i]:
            if (h["list"], h["address"]) in seen:
                continue
            seen.add((h["list"], h["address"]))
            verb = "spends from" if h["side"] == "input" else "pays"
            label = f" ({h['label']})" if h.get("label") else ""
            row.append(
                {
                    "signal": f"watchlist:{h['list']}",
                    "points": round(100 * category_weight(h["category"]), 2),
                    "detail": f"{verb} {h['address']}, listed as {h['category']}{label}",
                }
            )
        out.append(row)
    return out
