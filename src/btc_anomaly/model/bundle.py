"""The versioned model: two compiled forests (full + structural) and their training statistics.

One registered MLflow model version holds both forests, so they are trained on the same window,
promoted together and can never be mixed across versions. Rows whose prevout features are all
known go to the *full* forest; the rest (raw hex without a prevout lookup, coinbases) go to the
*structural* forest, which is trained on every row of the window with ``FEATURES_STRUCTURAL`` only.

On disk (the MLflow pyfunc artifact ``bundle/``)::

    bundle.json            feature version, feature lists, training info, feature stats, and (bundles
                           trained since the detectors issue) the Mahalanobis mean/precision per kind
    full.npz               CompiledForest (NumPy arrays only: serving needs no sklearn)
    structural.npz
    full.skops             the fitted sklearn IsolationForest, for audit and parity checks
    structural.skops

``btc_anomaly.model.pyfunc.BundlePyfunc`` is the MLflow pyfunc: input is a feature frame with the ``FEATURES_FULL`` columns
(prevout columns NaN when unknown), output is anomaly_score, is_anomaly, threshold, model_kind.
Canonical transactions go through ``btc_anomaly.model.scoring.score_frame`` instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from btc_anomaly.detectors.mahalanobis import MahalanobisModel
from btc_anomaly.features import FEATURE_VERSION, FEATURES_FULL, FEATURES_PREVOUT, FEATURES_STRUCTURAL
from btc_anomaly.model.explain import FeatureStats, explain
from btc_anomaly.model.scorer import Backend, CompiledForest, warm_up

KINDS = ("full", "structural")
FEATURES_OF = {"full": FEATURES_FULL, "structural": FEATURES_STRUCTURAL}
SKOPS_TRUSTED = ["sklearn.tree._tree.Tree"]
OUTPUT_COLUMNS = ("anomaly_score", "is_anomaly", "threshold", "model_kind")


@dataclass
class ModelBundle:
    forests: dict[str, CompiledForest]
    stats: dict[str, FeatureStats]
    info: dict[str, Any] = field(default_factory=dict)
    sklearn_models: dict[str, Any] = field(default_factory=dict, repr=False)  # only right after training
    # Mahalanobis distance per kind (detectors/mahalanobis.py); None for bundles saved before it existed,
    # which still load and score: the risk score then lacks that signal and says so.
    mahalanobis: dict[str, MahalanobisModel] | None = None

    def full_rows(self, features: pd.DataFrame) -> np.ndarray:
        """Rows the full forest can score: every prevout feature known."""
        return ~np.isnan(features[FEATURES_PREVOUT].to_numpy(dtype=np.float64)).any(axis=1)

    def score_features(self, features: pd.DataFrame) -> pd.DataFrame:
        """anomaly_score, is_anomaly, threshold, model_kind for a ``compute_features`` frame."""
        n = len(features)
        X = features[FEATURES_FULL].to_numpy(dtype=np.float32)
        full = ~np.isnan(X[:, len(FEATURES_STRUCTURAL) :]).any(axis=1)
        score = np.empty(n)
        threshold = np.empty(n)
        kind = np.where(full, "full", "structural").astype(object)
        for name, mask in (("full", full), ("structural", ~full)):
            if not mask.any():
                continue
            forest = self.forests[name]
            # FEATURES_STRUCTURAL is the leading block of FEATURES_FULL, so both are column slices.
            rows = X[:, : len(forest.feature_names)] if mask.all() else X[mask, : len(forest.feature_names)]
            score[mask] = forest.anomaly_score(rows)
            threshold[mask] = forest.threshold
        return pd.DataFrame(
            {
                "anomaly_score": score,
                "is_anomaly": score > threshold,
                "threshold": threshold,
                "model_kind": kind,
            },
            index=features.index,
        )

    def explain_features(
        self, features: pd.DataFrame, kinds: np.ndarray, top_k: int = 3
    ) -> list[list[dict[str, Any]]]:
        """Top contributing features with reasons, per row, using each row's own forest."""
        out: list[list[dict[str, Any]]] = [[] for _ in range(len(features))]
        for name in KINDS:
            idx = np.flatnonzero(kinds == name)
            if not len(idx):
                continue
            forest = self.forests[name]
            X = features[forest.feature_names].to_numpy(dtype=np.float64)[idx]
            items = explain(forest, self.stats[name], X, top_k=top_k)
            for i, it in zip(idx, items, strict=True):
                out[i] = it
        return out

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
        for name in KINDS:
            self.forests[name].save(path / f"{name}.npz")
            model = self.sklearn_models.get(name)
            if model is not None:
                import skops.io as sio

                sio.dump(model, path / f"{name}.skops")
        doc = {
            "feature_version": FEATURE_VERSION,
            "features": {k: FEATURES_OF[k] for k in KINDS},
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
        forests = {k: CompiledForest.load(path / f"{k}.npz", backend=backend) for k in KINDS}
        for k in KINDS:
            if forests[k].feature_names != FEATURES_OF[k]:
                raise ValueError(f"{k} forest features differ from FEATURES_{k.upper()}")
        stats = {k: FeatureStats.from_dict(doc["stats"][k]) for k in KINDS}
        mahalanobis = None
        if doc.get("mahalanobis"):
            mahalanobis = {k: MahalanobisModel.from_dict(v) for k, v in doc["mahalanobis"].items()}
            for k, m in mahalanobis.items():
                if m.feature_names != FEATURES_OF[k]:
                    raise ValueError(f"{k} Mahalanobis features differ from FEATURES_{k.upper()}")
        return cls(forests=forests, stats=stats, info=doc.get("info", {}), mahalanobis=mahalanobis)

    @staticmethod
    def load_sklearn(path: str | Path, kind: str) -> Any:
        """The fitted sklearn IsolationForest stored next to the compiled one (needs skops)."""
        import skops.io as sio

        return sio.load(Path(path) / f"{kind}.skops", trusted=SKOPS_TRUSTED + _skops_extra(path, kind))


def _skops_extra(path: str | Path, kind: str) -> list[str]:
    import skops.io as sio

    # Only sklearn's own types may be trusted implicitly; anything else in the file is an error.
    untrusted = sio.get_untrusted_types(file=Path(path) / f"{kind}.skops")
    unknown = [t for t in untrusted if not t.startswith(("sklearn.", "numpy.")) and t not in SKOPS_TRUSTED]
    if unknown:
        raise ValueError(f"refusing to load {kind}.skops: untrusted types {unknown}")
    return untrusted
