"""The versioned model: a detector per forest kind (tails + compiled forest) and the training statistics.

One registered MLflow model version holds both kinds, so they are trained on the same window,
promoted together and can never be mixed across versions. Rows whose prevout features are all
known go to the *full* detector; the rest (raw hex without a prevout lookup, coinbases) go to the
*structural* one, trained on every row of the window with ``FEATURES_STRUCTURAL`` only. Each detector
(``detector.py``) combines per-feature tail probabilities with an isolation forest into one calibrated
``anomaly_score = 1 - p``, flagged above ``1 - contamination``.

On disk (the MLflow pyfunc artifact ``bundle/``)::

    bundle.json            feature version, feature lists, training info, feature stats, the fee-market
                           reference and the Mahalanobis mean/precision per kind
    full.npz               CompiledForest (NumPy arrays only: serving needs no sklearn)
    structural.npz
    detector.npz           tail distributions, forest clip bounds and calibrations of both kinds
    full.skops             the fitted sklearn IsolationForest, for audit and parity checks
    structural.skops

``bundle_digest`` is the SHA-256 the registry records at training (``registry.DIGEST_TAG``) and checks
before serving loads a version: the bundle is data (JSON + NumPy arrays), loaded without running code.

Scoring goes through ``btc_anomaly.model.core`` (stream, API, gate, evaluation alike).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from btc_anomaly.detectors.mahalanobis import MahalanobisModel
from btc_anomaly.features import FEATURE_VERSION, FEATURES_FULL, FEATURES_PREVOUT, FEATURES_STRUCTURAL
from btc_anomaly.model.detector import KindDetector, Parts, forest_features
from btc_anomaly.model.explain import FeatureStats
from btc_anomaly.model.scorer import Backend, CompiledForest, warm_up

KINDS = ("full", "structural")
FEATURES_OF = {"full": FEATURES_FULL, "structural": FEATURES_STRUCTURAL}
FOREST_FEATURES_OF = {k: forest_features(v) for k, v in FEATURES_OF.items()}
SKOPS_TRUSTED = ["sklearn.tree._tree.Tree"]
OUTPUT_COLUMNS = ("anomaly_score", "is_anomaly", "threshold", "model_kind")
_PREVOUT_COLS = [FEATURES_FULL.index(f) for f in FEATURES_PREVOUT]


@dataclass
class MatrixScores:
    """``ModelBundle.score_matrix`` for a batch: per row score, threshold and kind, and per kind the rows
    it scored with their evidence (``detector.Parts``) for explanations."""

    score: np.ndarray
    threshold: np.ndarray
    kinds: np.ndarray  # object array of "full" / "structural"
    parts: dict[str, tuple[np.ndarray, Parts]]  # kind -> (row indices, parts of those rows)
    market: np.ndarray  # the fee-market rate each row was scored against (sat/vB)


@dataclass
class ModelBundle:
    detectors: dict[str, KindDetector]
    stats: dict[str, FeatureStats]
    info: dict[str, Any] = field(default_factory=dict)
    sklearn_models: dict[str, Any] = field(default_factory=dict, repr=False)  # only right after training
    # Mahalanobis distance per kind (detectors/mahalanobis.py) on the forest's features.
    mahalanobis: dict[str, MahalanobisModel] | None = None
    # Median fee rate (sat/vB) of the newest part of the training window: the fee market a transaction is
    # read against when no fresher one is known (model/context.py).
    market_reference: float = float("nan")

    @property
    def forests(self) -> dict[str, CompiledForest]:
        return {k: d.forest for k, d in self.detectors.items()}

    @property
    def thresholds(self) -> dict[str, float]:
        return {k: d.threshold for k, d in self.detectors.items()}

    def score_matrix(self, matrix: np.ndarray, market: np.ndarray | float | None = None) -> MatrixScores:
        """Scores of a ``features.feature_matrix`` (``FEATURES_FULL`` columns) against a fee market
        (sat/vB, per row or one for all; None = ``market_reference``)."""
        n = len(matrix)
        market_rows = np.broadcast_to(
            np.asarray(self.market_reference if market is None else market, dtype=np.float64), (n,)
        ).copy()
        market_rows[~np.isfinite(market_rows)] = self.market_reference
        full = ~np.isnan(matrix[:, _PREVOUT_COLS]).any(axis=1)
        score = np.empty(n)
        threshold = np.empty(n)
        kinds = np.where(full, "full", "structural").astype(object)
        parts: dict[str, tuple[np.ndarray, Parts]] = {}
        for kind, mask in (("full", full), ("structural", ~full)):
            if not mask.any():
                continue
            det = self.detectors[kind]
            width = len(det.feature_names)  # FEATURES_STRUCTURAL is the leading block of FEATURES_FULL
            rows = np.flatnonzero(mask)
            X = matrix[:, :width] if mask.all() else matrix[rows, :width]
            s, p = det.score(X, market_rows if mask.all() else market_rows[rows])
            score[rows] = s
            threshold[rows] = det.threshold
            parts[kind] = (rows, p)
        return MatrixScores(score, threshold, kinds, parts, market_rows)

    def score_features(
        self, features: pd.DataFrame, market: np.ndarray | float | None = None
    ) -> pd.DataFrame:
        """anomaly_score, is_anomaly, threshold, model_kind for a ``compute_features`` frame."""
        m = self.score_matrix(features[FEATURES_FULL].to_numpy(dtype=np.float64), market)
        return pd.DataFrame(
            {
                "anomaly_score": m.score,
                "is_anomaly": m.score > m.threshold,
                "threshold": m.threshold,
                "model_kind": m.kinds,
            },
            index=features.index,
        )

    def set_backend(self, backend: Backend) -> None:
        for forest in self.forests.values():
            forest.backend = backend

    def warm_up(self) -> None:
        for forest in self.forests.values():
            warm_up(forest)

    # --- persistence ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        for name in KINDS:
            self.detectors[name].forest.save(path / f"{name}.npz")
            arrays.update(self.detectors[name].to_arrays(name))
            model = self.sklearn_models.get(name)
            if model is not None:
                import skops.io as sio

                sio.dump(model, path / f"{name}.skops")
        np.savez(path / "detector.npz", **arrays)
        doc = {
            "feature_version": FEATURE_VERSION,
            "features": {k: FEATURES_OF[k] for k in KINDS},
            "forest_features": {k: FOREST_FEATURES_OF[k] for k in KINDS},
            "market_reference": self.market_reference,
            "info": self.info,
            "stats": {k: self.stats[k].to_dict() for k in KINDS},
        }
        if self.mahalanobis:
            doc["mahalanobis"] = {k: m.to_dict() for k, m in self.mahalanobis.items()}
        (path / "bundle.json").write_text(json.dumps(doc, indent=1, default=str))
        return path

    @classmethod
    def load(cls, path: str | Path, backend: Backend = "auto") -> ModelBundle:
        path = Path(path)
        doc = json.loads((path / "bundle.json").read_text())
        if doc["feature_version"] != FEATURE_VERSION:
            raise ValueError(
                f"model was trained with feature version {doc['feature_version']}, this code computes "
                f"version {FEATURE_VERSION}: retrain"
            )
        arrays = dict(np.load(path / "detector.npz"))
        detectors = {}
        for k in KINDS:
            forest = CompiledForest.load(path / f"{k}.npz", backend=backend)
            if forest.feature_names != FOREST_FEATURES_OF[k]:
                raise ValueError(f"{k} forest features differ from this code's forest features")
            detectors[k] = KindDetector.from_arrays(arrays, k, FEATURES_OF[k], forest)
        stats = {k: FeatureStats.from_dict(doc["stats"][k]) for k in KINDS}
        mahalanobis = None
        if doc.get("mahalanobis"):
            mahalanobis = {k: MahalanobisModel.from_dict(v) for k, v in doc["mahalanobis"].items()}
            for k, m in mahalanobis.items():
                if m.feature_names != FOREST_FEATURES_OF[k]:
                    raise ValueError(f"{k} Mahalanobis features differ from the forest's")
        return cls(
            detectors=detectors,
            stats=stats,
            info=doc.get("info", {}),
            mahalanobis=mahalanobis,
            market_reference=float(doc.get("market_reference", float("nan"))),
        )

    @staticmethod
    def load_sklearn(path: str | Path, kind: str) -> Any:
        """The fitted sklearn IsolationForest stored next to the compiled one (needs skops)."""
        import skops.io as sio

        return sio.load(Path(path) / f"{kind}.skops", trusted=SKOPS_TRUSTED + _skops_extra(path, kind))


def bundle_digest(path: str | Path) -> str:
    """SHA-256 over every file under ``path``: for each file in sorted relative-path order, its POSIX
    relative path, a NUL, the hex SHA-256 of its bytes and a newline. A changed, added, removed or
    renamed file changes the digest."""
    root = Path(path)
    total = hashlib.sha256()
    files = sorted((f.relative_to(root).as_posix(), f) for f in root.rglob("*") if f.is_file())
    for name, file in files:
        with file.open("rb") as fh:
            one = hashlib.file_digest(fh, "sha256").hexdigest()
        total.update(f"{name}\0{one}\n".encode())
    return total.hexdigest()


def _skops_extra(path: str | Path, kind: str) -> list[str]:
    import skops.io as sio

    # Only sklearn's own types may be trusted implicitly; anything else in the file is an error.
    untrusted = sio.get_untrusted_types(file=Path(path) / f"{kind}.skops")
    unknown = [t for t in untrusted if not t.startswith(("sklearn.", "numpy.")) and t not in SKOPS_TRUSTED]
    if unknown:
        raise ValueError(f"refusing to load {kind}.skops: untrusted types {unknown}")
    return untrusted
