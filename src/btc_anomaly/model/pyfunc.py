"""MLflow pyfunc over a ``ModelBundle``: what ``models:/btc-anomaly-iforest@champion`` loads.

Input: a feature frame with the ``FEATURES_FULL`` columns (``compute_features`` output; prevout
columns NaN when unknown). Output: anomaly_score, is_anomaly, threshold, model_kind per row.
Loading reads only NumPy arrays and JSON (no sklearn) and does not touch numba: importing it and loading
the compiled kernels (LLVM, ~110 MB and ~1-2 s in a fresh process) is left to whoever scores. A serving
process calls ``warm_up`` once after choosing its backend (the API with the numpy backend never loads
numba at all); other users (the promotion gate, batch scoring) compile on their first call, once.

Logged as "models from code" (``MODEL_CODE`` is the file MLflow stores and runs at load time), so
no pickled Python object is stored in the registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from btc_anomaly.features import FEATURES_FULL
from btc_anomaly.model.bundle import ModelBundle

ARTIFACT_KEY = "bundle"
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")


class BundlePyfunc(mlflow.pyfunc.PythonModel):
    bundle: ModelBundle
    _warm_backends: set[str]

    def load_context(self, context: Any) -> None:
        self.bundle = ModelBundle.load(context.artifacts[ARTIFACT_KEY])
        self._warm_backends = set()

    def warm_up(self) -> None:
        """Compile or load the scorer kernels for the bundle's current backend now, not on the first
        request; repeated calls (same backend) do nothing."""
        backends = {forest.backend for forest in self.bundle.forests.values()}
        key = ",".join(sorted(backends))
        if key not in self._warm_backends:
            self.bundle.warm_up()
            self._warm_backends.add(key)

    # Only a DataFrame hint: MLflow 3 then skips hint-based signatures (ours is logged) without warnings.
    def predict(self, context, model_input: pd.DataFrame, params=None):  # type: ignore[no-untyped-def]
        features = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        features = features.reindex(columns=FEATURES_FULL).astype(np.float64)
        return self.bundle.score_features(features)
