"""Mahalanobis distance of a feature vector from the training window, one model per forest kind.

Fitted at training time on the same rows and features as each forest (``model/train.py``) and stored in
the model bundle (``bundle.json``, key ``mahalanobis``), so it is versioned and promoted with the forests.
The covariance is the Ledoit-Wolf shrinkage estimate: flags that never vary in a window (e.g. no
nonstandard outputs) make the sample covariance singular, and shrinkage keeps the inverse finite
without letting one never-seen flag dominate every distance.

The distance is reported raw (``d = sqrt((x - mean)^T P (x - mean))``) and enters the risk score relative
to the training rows' own distance quantiles (``q99``, ``q999``), so its scale does not depend on the
number of features (see ``risk.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

FIT_MAX_ROWS = 200_000  # a sample this size pins the covariance and the 99.9th percentile of d
SMALL_ROWS = 64  # up to this many rows, one (rows, k, k) product instead of NumPy's k*k calls


@dataclass
class MahalanobisModel:
    feature_names: list[str]
    mean: np.ndarray  # (k,)
    precision: np.ndarray  # (k, k)
    q50: float
    q99: float
    q999: float
    rows: int

    @classmethod
    def fit(cls, X: np.ndarray, feature_names: list[str], seed: int = 0) -> MahalanobisModel:
        from sklearn.covariance import LedoitWolf

        X = np.asarray(X, dtype=np.float64)
        if len(X) > FIT_MAX_ROWS:
            X = X[np.random.default_rng(seed).choice(len(X), FIT_MAX_ROWS, replace=False)]
        lw = LedoitWolf().fit(X)
        model = cls(
            feature_names=list(feature_names),
            mean=lw.location_,
            precision=lw.precision_,
            q50=0.0,
            q99=0.0,
            q999=0.0,
            rows=len(X),
        )
        d = model.distance(X)
        model.q50, model.q99, model.q999 = (float(v) for v in np.percentile(d, [50, 99, 99.9]))
        return model

    def distance(self, X: np.ndarray) -> np.ndarray:
        """Distance per row, bit-identical whatever the batch: the quadratic form is summed in one fixed
        order (``sum_a (sum_b d_b P_ba) d_a``, b and a ascending) with plain multiplies and adds. BLAS or
        einsum reductions pick their order by batch shape and memory alignment, so a transaction scored
        alone and in a batch could differ in the last bit. Few rows: one (rows, k, k) product summed by
        ``np.add.accumulate`` (strictly left to right, so its last element is that sum); more rows: k
        running (rows, k) sums, which do not hold a k*k array per row."""
        D = np.asarray(X, dtype=np.float64) - self.mean
        n, k = D.shape
        if n <= SMALL_ROWS:
            y = np.add.accumulate(D[:, :, None] * self.precision[None, :, :], axis=1)[:, -1, :]
            quad = np.add.accumulate(y * D, axis=1)[:, -1]
            return np.sqrt(np.maximum(quad, 0.0))
        y = np.zeros((n, k))
        term = np.empty((n, k))
        for b in range(k):  # y[:, a] += d_b * P_ba, for every a at once
            np.multiply(D[:, b, None], self.precision[b][None, :], out=term)
            y += term
        yd = np.ascontiguousarray((y * D).T)  # one contiguous vector per feature
        quad = np.zeros(n)
        for a in range(k):
            quad += yd[a]
        return np.sqrt(np.maximum(quad, 0.0))

    def to_dict(self) -> dict[str, Any]:
        return {
            "feature_names": self.feature_names,
            "mean": self.mean.tolist(),
            "precision": self.precision.tolist(),
            "q50": self.q50,
            "q99": self.q99,
            "q999": self.q999,
            "rows": self.rows,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MahalanobisModel:
        return cls(
            feature_names=list(d["feature_names"]),
            mean=np.asarray(d["mean"], dtype=np.float64),
            precision=np.asarray(d["precision"], dtype=np.float64),
            q50=float(d["q50"]),
            q99=float(d["q99"]),
            q999=float(d["q999"]),
            rows=int(d["rows"]),
        )
