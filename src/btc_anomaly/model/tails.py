"""Per-feature tail probabilities that extrapolate past the training range (ECOD-style, one-sided).

An isolation forest loses single-feature extremes: with ~20 features only the few splits on the extreme
one isolate it, and a value past the training maximum lands in the same leaf as the maximum, so "more
extreme" never scores higher. The tail model scores each heavy-tailed feature on its own:

    score_j(x) = -log10 P_train(X_j >= x_j)        (upper tail; lower tail with <=)

from the training window's empirical distribution, exact in the tails. Past the training range the
probability keeps falling exponentially on the feature's (log) scale, with the mean excess of the top 1 %
of the training values as the scale (a Pareto tail on the raw scale), so a 10x larger value always scores
higher than a 2x larger one. Every score is non-decreasing as a value moves further into its tail.

``EmpiricalTail`` is one distribution (also used for the calibration of the combined score, model/detector.py);
``TailModel`` is the set of tail features of one forest kind (``features.TAIL_FEATURES``), including the
fee rate read both absolutely and relative to the fee market of its time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from btc_anomaly.features import SPECS, TAIL_FEATURES, relative_fee_rate

MAX_KNOTS = 4096  # distinct values kept per distribution; the EXACT_TAIL lowest and highest are all kept
EXACT_TAIL = 512
TAIL_SHARE = (
    0.01  # the top (bottom) share of the training values whose mean excess sets the extrapolation scale
)
MIN_TAIL_ROWS = 10
MIN_RELAY_FEE_RATE = 1.0  # sat/vB, Bitcoin Core's default minimum relay fee: below it counts as past range
FEE_RATE = "log_fee_rate"
LN10 = math.log(10)


@dataclass
class EmpiricalTail:
    """A training distribution as knots (ascending distinct values) with exact counts at each knot."""

    knots: np.ndarray  # (k,) ascending
    ge: np.ndarray  # (k,) training values >= knot
    le: np.ndarray  # (k,) training values <= knot
    n: int
    scale_upper: float  # extrapolation scale past the maximum (feature units)
    scale_lower: float  # ... below the minimum

    @classmethod
    def fit(cls, values: np.ndarray) -> EmpiricalTail:
        v = np.sort(np.asarray(values, dtype=np.float64))
        v = v[np.isfinite(v)]
        if not len(v):
            raise ValueError("no finite training values")
        n = len(v)
        distinct = np.unique(v)
        if len(distinct) > MAX_KNOTS:
            middle = distinct[EXACT_TAIL:-EXACT_TAIL]
            pick = np.linspace(0, len(middle) - 1, MAX_KNOTS - 2 * EXACT_TAIL).round().astype(np.int64)
            distinct = np.concatenate(
                [distinct[:EXACT_TAIL], middle[np.unique(pick)], distinct[-EXACT_TAIL:]]
            )
        ge = (n - np.searchsorted(v, distinct, side="left")).astype(np.float64)
        le = np.searchsorted(v, distinct, side="right").astype(np.float64)
        k = min(max(MIN_TAIL_ROWS, math.ceil(TAIL_SHARE * n)), n - 1) if n > 1 else 0
        q25, q75 = np.percentile(v, [25, 75])
        # A floor for ties at the extremes (fee share 1.0, a count of 1): a tenth of the spread, never 0.
        floor = max(0.1 * (q75 - q25), 0.01 * (v[-1] - v[0]), 1e-3)
        upper = float(np.mean(v[n - k :] - v[n - k - 1])) if k else 0.0
        lower = float(np.mean(v[k] - v[:k])) if k else 0.0
        return cls(distinct, ge, le, n, max(upper, floor), max(lower, floor))

    @property
    def maximum(self) -> float:
        return float(self.knots[-1])

    @property
    def minimum(self) -> float:
        return float(self.knots[0])

    def upper(self, x: np.ndarray) -> np.ndarray:
        """-log10 of the share of training values >= x (extrapolated past the maximum)."""
        x = np.asarray(x, dtype=np.float64)
        i = np.searchsorted(self.knots, x, side="left")
        inside = i < len(self.knots)
        count = self.ge[np.minimum(i, len(self.knots) - 1)]
        beyond = np.maximum(x - self.knots[-1], 0.0) / self.scale_upper
        log_p = np.where(
            inside, np.log10(count / self.n), np.log10(self.ge[-1] / self.n) - beyond / math.log(10)
        )
        return np.where(np.isnan(x), 0.0, -log_p)

    def lower(self, x: np.ndarray) -> np.ndarray:
        """-log10 of the share of training values <= x (extrapolated below the minimum)."""
        x = np.asarray(x, dtype=np.float64)
        i = np.searchsorted(self.knots, x, side="right") - 1
        inside = i >= 0
        count = self.le[np.maximum(i, 0)]
        beyond = np.maximum(self.knots[0] - x, 0.0) / self.scale_lower
        log_p = np.where(
            inside, np.log10(count / self.n), np.log10(self.le[0] / self.n) - beyond / math.log(10)
        )
        return np.where(np.isnan(x), 0.0, -log_p)

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {
            f"{prefix}.knots": self.knots,
            f"{prefix}.ge": self.ge,
            f"{prefix}.le": self.le,
            f"{prefix}.meta": np.array([self.n, self.scale_upper, self.scale_lower], dtype=np.float64),
        }

    @classmethod
    def from_arrays(cls, arrays: Any, prefix: str) -> EmpiricalTail:
        n, su, sl = (float(v) for v in arrays[f"{prefix}.meta"])
        return cls(
            np.asarray(arrays[f"{prefix}.knots"], dtype=np.float64),
            np.asarray(arrays[f"{prefix}.ge"], dtype=np.float64),
            np.asarray(arrays[f"{prefix}.le"], dtype=np.float64),
            int(n),
            su,
            sl,
        )


class PackedTails:
    """Several ``EmpiricalTail`` evaluated together with one ``searchsorted``: each distribution's knots are
    shifted into a range of its own on one axis, so a one-transaction request costs a few NumPy calls
    instead of a dozen per feature. Results equal the per-tail ``upper``/``lower``."""

    def __init__(self, tails: list[EmpiricalTail]) -> None:
        lo = np.array([t.minimum for t in tails])
        hi = np.array([t.maximum for t in tails])
        span = float(np.max(hi - lo)) * 2.0 + 4.0 if tails else 1.0
        self.shift = np.arange(len(tails)) * span - lo  # tail j's knots start at j * span
        self.lo, self.hi = lo, hi
        sizes = np.array([len(t.knots) for t in tails], dtype=np.int64)
        self.end = np.cumsum(sizes) - 1  # index of each tail's last knot
        self.start = self.end - sizes + 1
        empty = np.zeros(0)
        self.keys = np.concatenate([t.knots + sh for t, sh in zip(tails, self.shift, strict=True)] or [empty])
        self.ge = np.concatenate([t.ge for t in tails] or [empty])
        self.le = np.concatenate([t.le for t in tails] or [empty])
        self.n = np.array([t.n for t in tails], dtype=np.float64)
        self.scale_upper = np.array([t.scale_upper for t in tails])
        self.scale_lower = np.array([t.scale_lower for t in tails])
        self.log_last_ge = np.log10(self.ge[self.end] / self.n) if tails else empty
        self.log_first_le = np.log10(self.le[self.start] / self.n) if tails else empty
        # -log10 of each knot's share, computed once instead of per scored value.
        n_of_knot = np.repeat(self.n, sizes)
        self.score_ge = -np.log10(self.ge / n_of_knot) if tails else empty
        self.score_le = -np.log10(self.le / n_of_knot) if tails else empty

    def upper(self, X: np.ndarray) -> np.ndarray:
        """(rows, m) -log10 P(X_j >= x) for column j of ``X`` against tail j; NaN scores 0."""
        x = np.clip(X, self.lo - 1.0, None)
        i = np.searchsorted(self.keys, (x + self.shift).ravel(), side="left").reshape(X.shape)
        inside = i <= self.end
        beyond = np.maximum(x - self.hi, 0.0) / self.scale_upper / LN10
        score = np.where(inside, self.score_ge[np.minimum(i, self.end)], beyond - self.log_last_ge)
        return np.where(np.isnan(X), 0.0, score)

    def lower(self, X: np.ndarray) -> np.ndarray:
        """(rows, m) -log10 P(X_j <= x); NaN scores 0."""
        x = np.clip(X, None, self.hi + 1.0)
        i = np.searchsorted(self.keys, (x + self.shift).ravel(), side="right").reshape(X.shape) - 1
        inside = i >= self.start
        beyond = np.maximum(self.lo - x, 0.0) / self.scale_lower / LN10
        score = np.where(inside, self.score_le[np.maximum(i, self.start)], beyond - self.log_first_le)
        return np.where(np.isnan(X), 0.0, score)


@dataclass
class TailModel:
    """The tail features of one forest kind, each with its training distribution.

    ``evaluate`` gives, per row and tail feature, -log10 of the tail probability in the feature's anomalous
    direction(s). The fee rate is read twice, absolutely and against the fee market of its time
    (``features.relative_fee_rate``). High: the mean of the two, so an overpayment stands out against
    its own market while a dearer market, or one era's wider spread of fees, does not flag ordinary
    transactions alone. Low: the smaller of the two, as paying little is only odd when it is odd both
    for Bitcoin and for the day (a cheap week is not anomalous); a fee rate below the minimum relay fee
    (zero included) counts as past the training range whatever the market.
    """

    features: list[str]  # tail features of this kind, in the kind's feature order
    tails: dict[str, EmpiricalTail]
    market: EmpiricalTail | None = None  # relative fee rate; None for the structural kind

    @classmethod
    def fit(cls, X: np.ndarray, feature_names: list[str], market_fee_rate: np.ndarray | None) -> TailModel:
        names = [f for f in feature_names if f in TAIL_FEATURES]
        col = {f: i for i, f in enumerate(feature_names)}
        tails = {f: EmpiricalTail.fit(X[:, col[f]]) for f in names}
        market = None
        if FEE_RATE in names:
            if market_fee_rate is None:
                raise ValueError("the fee-rate tail needs each training row's market fee rate")
            market = EmpiricalTail.fit(relative_fee_rate(X[:, col[FEE_RATE]], market_fee_rate))
        return cls(names, tails, market)

    def __post_init__(self) -> None:
        direction = [TAIL_FEATURES[f] for f in self.features]
        self._up = np.array([d in ("upper", "both") for d in direction], dtype=bool)
        self._down = np.array([d in ("lower", "both") for d in direction], dtype=bool)
        self._up_idx, self._down_idx = np.flatnonzero(self._up), np.flatnonzero(self._down)
        # The market-relative fee rate rides along as one more column of both packs.
        extra = [self.market] if self.market is not None else []
        self._packed_up = PackedTails([self.tails[self.features[i]] for i in self._up_idx] + extra)
        self._packed_down = PackedTails([self.tails[self.features[i]] for i in self._down_idx] + extra)
        self._hi = np.array([self.tails[f].maximum for f in self.features])
        self._lo = np.array([self.tails[f].minimum for f in self.features])
        self._floor = np.array([SPECS[f].tail_floor for f in self.features])
        self._fee = self.features.index(FEE_RATE) if FEE_RATE in self.features else None
        if self._fee is not None and self.market is not None:
            self._fee_up = int(np.flatnonzero(self._up_idx == self._fee)[0])
            self._fee_down = int(np.flatnonzero(self._down_idx == self._fee)[0])
            self._edge_base = math.log10(self.tails[FEE_RATE].n) + MIN_RELAY_FEE_RATE
        self._cols: dict[tuple[str, ...], np.ndarray] = {}

    def _columns(self, feature_names: list[str]) -> np.ndarray:
        key = tuple(feature_names)
        cols = self._cols.get(key)
        if cols is None:
            col = {f: i for i, f in enumerate(feature_names)}
            cols = self._cols[key] = np.array([col[f] for f in self.features], dtype=np.int64)
        return cols

    def evaluate(
        self, X: np.ndarray, feature_names: list[str], market_fee_rate: np.ndarray | float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per row and tail feature: the tail score in decades (-log10 p; 0 where a value is unknown or at
        most its ``tail_floor``) and whether the value lies past the training range in an anomalous
        direction (for the fee rate, also below the minimum relay fee)."""
        V = np.asarray(X, dtype=np.float64)[:, self._columns(feature_names)]
        Vu, Vd = V[:, self._up_idx], V[:, self._down_idx]
        with_market = self._fee is not None and self.market is not None
        if with_market:
            rel = relative_fee_rate(V[:, self._fee], market_fee_rate)[:, None]
            Vu, Vd = np.concatenate([Vu, rel], axis=1), np.concatenate([Vd, rel], axis=1)
        U = self._packed_up.upper(Vu)
        score = np.zeros_like(V)
        score[:, self._up_idx] = U[:, : len(self._up_idx)]
        if len(self._down_idx):
            D = self._packed_down.lower(Vd)
            score[:, self._down_idx] = np.maximum(score[:, self._down_idx], D[:, : len(self._down_idx)])
        below_relay = None
        if with_market:
            j = self._fee
            rate = np.expm1(V[:, j])
            below_relay = rate < MIN_RELAY_FEE_RATE
            up = 0.5 * (U[:, self._fee_up] + U[:, -1])
            down = np.minimum(D[:, self._fee_down], D[:, -1])
            # Below the minimum relay fee (zero fees included): past the range, whatever the window held.
            down = np.where(below_relay, np.maximum(down, self._edge_base - rate), down)
            score[:, j] = np.maximum(up, down)
        known = ~np.isnan(V) & (self._floor < V)
        past = (self._up & (self._hi < V)) | (self._down & (self._lo > V))
        if below_relay is not None:
            past[:, self._fee] |= below_relay
        return np.where(known, score, 0.0), past & known

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        for f in self.features:
            arrays.update(self.tails[f].to_arrays(f"{prefix}.{f}"))
        if self.market is not None:
            arrays.update(self.market.to_arrays(f"{prefix}.market"))
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Any, prefix: str, features: list[str]) -> TailModel:
        tails = {f: EmpiricalTail.from_arrays(arrays, f"{prefix}.{f}") for f in features}
        market = (
            EmpiricalTail.from_arrays(arrays, f"{prefix}.market")
            if f"{prefix}.market.meta" in arrays
            else None
        )
        return cls(list(features), tails, market)
