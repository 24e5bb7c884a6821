"""The detector of one forest kind: per-feature tails + an isolation forest, calibrated to one p-value.

Two views of a transaction, combined by their evidence in decades (-log10 of a training-window
probability):

* **tails** (``tails.TailModel``): how far each heavy-tailed feature (fee rate, fee, fee share, value,
  counts, size, dust and OP_RETURN outputs) lies in its tail, extrapolated past the training range;
* **forest**: an isolation forest on the amounts, counts, fees and output shape (``FOREST_FEATURES_OF``:
  no era-dependent script mix), whose tail features are clipped to their training 1st-99th percentiles,
  so it judges combinations inside the body and leaves magnitudes to the tails. Its score is turned into
  decades by its own training distribution and enters ``FOREST_MARGIN`` decades lower: a combination the
  forest finds rare counts, but it takes a ten times rarer one to weigh like a tail.

``combined = max(max_j tail_j, forest - FOREST_MARGIN)``, and the training rows' distribution of
``combined`` calibrates it: ``p`` = the share of training transactions at least as unusual (extrapolated
past the most unusual one), ``anomaly_score = 1 - p`` and the threshold is ``1 - contamination``. So a
score reads "more unusual than this share of the training window", the flag rate on data like the
training window is the contamination, and a value past the training range of any tail feature (or a fee
rate below the minimum relay fee) is always flagged (``p`` capped at half the contamination).

Monotone tails: beyond its 99th (1st) training percentile a tail feature no longer changes the forest's
input, and its own tail score only grows, so moving a transaction further into a tail never lowers its
score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from btc_anomaly.features import ERA_FEATURES, TAIL_FEATURES
from btc_anomaly.model.scorer import CompiledForest
from btc_anomaly.model.tails import EmpiricalTail, TailModel

FOREST_MARGIN = 1.0  # decades
CLIP_QUANTILES = (0.01, 0.99)


def forest_features(feature_names: list[str]) -> list[str]:
    return [f for f in feature_names if f not in ERA_FEATURES]


@dataclass
class Parts:
    """A batch's evidence, in decades: per tail feature, the forest's, the combination, and the outcome."""

    tails: np.ndarray  # (rows, tail features)
    forest: np.ndarray  # (rows,) forest decades before the margin
    combined: np.ndarray  # (rows,)
    past_range: np.ndarray  # (rows, tail features) bool
    p_value: np.ndarray  # (rows,)
    forest_input: np.ndarray  # (rows, forest features) the clipped values the forest saw

    def take(self, rows: np.ndarray) -> Parts:
        """The evidence of ``rows`` only (positions in this batch)."""
        return Parts(
            self.tails[rows],
            self.forest[rows],
            self.combined[rows],
            self.past_range[rows],
            self.p_value[rows],
            self.forest_input[rows],
        )


@dataclass
class KindDetector:
    feature_names: list[str]  # the kind's input columns (FEATURES_FULL or FEATURES_STRUCTURAL order)
    forest: CompiledForest  # on forest_features(feature_names), clipped
    clip_low: np.ndarray  # per forest feature (-inf where not a tail feature)
    clip_high: np.ndarray
    tails: TailModel
    forest_tail: EmpiricalTail  # training forest anomaly scores
    calibration: EmpiricalTail  # training combined decades
    contamination: float
    _forest_cols: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def threshold(self) -> float:
        return 1.0 - self.contamination

    @property
    def forest_feature_names(self) -> list[str]:
        return self.forest.feature_names

    # --- fitting ----------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        X: np.ndarray,
        feature_names: list[str],
        market_fee_rate: np.ndarray | None,
        *,
        contamination: float,
        n_estimators: int,
        max_samples: int,
        random_state: int,
        backend: str = "auto",
    ) -> tuple[KindDetector, Any, np.ndarray]:
        """Fit on training rows ``X`` (columns ``feature_names``); return the detector, the fitted sklearn
        forest (kept for audit) and the training rows' anomaly scores."""
        from sklearn.ensemble import IsolationForest

        X = np.asarray(X, dtype=np.float64)
        names = forest_features(feature_names)
        col = {f: i for i, f in enumerate(feature_names)}
        cols = [col[f] for f in names]
        low = np.full(len(names), -np.inf)
        high = np.full(len(names), np.inf)
        for j, f in enumerate(names):
            direction = TAIL_FEATURES.get(f)
            lo, hi = np.nanquantile(X[:, col[f]], CLIP_QUANTILES)
            if direction in ("upper", "both"):
                high[j] = hi
            if direction in ("lower", "both"):
                low[j] = lo
        Xf = np.clip(X[:, cols], low, high)
        model = IsolationForest(
            n_estimators=n_estimators,
            max_samples=min(max_samples, len(X)),
            contamination="auto",
            random_state=random_state,
        )
        model.fit(Xf)
        forest = CompiledForest.from_sklearn(model, names)
        forest.backend = backend  # type: ignore[assignment]
        tails = TailModel.fit(X, feature_names, market_fee_rate)
        forest_scores = forest.anomaly_score(Xf.astype(np.float32))
        forest_tail = EmpiricalTail.fit(forest_scores)
        # The calibration is the training rows' own combined evidence: computed with the detector itself,
        # so it starts as a stand-in that nothing reads.
        uncalibrated = EmpiricalTail.fit(np.zeros(1))
        det = cls(list(feature_names), forest, low, high, tails, forest_tail, uncalibrated, contamination)
        market = market_fee_rate if market_fee_rate is not None else np.nan
        combined = det._combined(X, market)[0]
        det.calibration = EmpiricalTail.fit(combined)
        score, _ = det.score(X, market)
        # sklearn's own convention for the stored forest: offset_ at the contamination quantile.
        model.contamination = contamination
        model.offset_ = float(np.percentile(-forest_scores, 100.0 * contamination))
        forest.offset = model.offset_
        return det, model, score

    # --- scoring ----------------------------------------------------------------------------------
    def _combined(
        self, X: np.ndarray, market_fee_rate: np.ndarray | float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if self._forest_cols is None:
            col = {f: i for i, f in enumerate(self.feature_names)}
            self._forest_cols = np.array([col[f] for f in self.forest_feature_names], dtype=np.int64)
        Xf = np.clip(X[:, self._forest_cols], self.clip_low, self.clip_high)
        tails, past = self.tails.evaluate(X, self.feature_names, market_fee_rate)
        forest = self.forest_tail.upper(self.forest.anomaly_score(Xf.astype(np.float32)))
        top = tails.max(axis=1) if tails.shape[1] else np.zeros(len(X))
        return np.maximum(top, forest - FOREST_MARGIN), tails, forest, Xf, past

    def parts(self, X: np.ndarray, market_fee_rate: np.ndarray | float) -> Parts:
        combined, tails, forest, Xf, past = self._combined(np.asarray(X, dtype=np.float64), market_fee_rate)
        log_p = -self.calibration.upper(combined)
        p = 10.0**log_p
        p = np.where(past.any(axis=1), np.minimum(p, 0.5 * self.contamination), p)
        return Parts(tails, forest, combined, past, p, Xf)

    def score(self, X: np.ndarray, market_fee_rate: np.ndarray | float) -> tuple[np.ndarray, Parts]:
        parts = self.parts(X, market_fee_rate)
        return 1.0 - parts.p_value, parts

    # --- persistence ------------------------------------------------------------------------------
    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        arrays = {
            f"{prefix}.clip_low": self.clip_low,
            f"{prefix}.clip_high": self.clip_high,
            f"{prefix}.contamination": np.array([self.contamination]),
        }
        arrays.update(self.tails.to_arrays(f"{prefix}.tails"))
        arrays.update(self.forest_tail.to_arrays(f"{prefix}.forest_tail"))
        arrays.update(self.calibration.to_arrays(f"{prefix}.calibration"))
        return arrays

    @classmethod
    def from_arrays(
        cls, arrays: Any, prefix: str, feature_names: list[str], forest: CompiledForest
    ) -> KindDetector:
        tail_names = [f for f in feature_names if f in TAIL_FEATURES]
        return cls(
            feature_names=list(feature_names),
            forest=forest,
            clip_low=np.asarray(arrays[f"{prefix}.clip_low"], dtype=np.float64),
            clip_high=np.asarray(arrays[f"{prefix}.clip_high"], dtype=np.float64),
            tails=TailModel.from_arrays(arrays, f"{prefix}.tails", tail_names),
            forest_tail=EmpiricalTail.from_arrays(arrays, f"{prefix}.forest_tail"),
            calibration=EmpiricalTail.from_arrays(arrays, f"{prefix}.calibration"),
            contamination=float(arrays[f"{prefix}.contamination"][0]),
        )
