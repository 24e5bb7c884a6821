"""MLflow pyfunc over a ``ModelBundle``: what ``models:/btc-anomaly-iforest@champion`` loads.

Input: a feature frame with the ``FEATURES_FULL`` columns (``compute_features`` output; prevout
columns NaN when unknown). Output: anomaly_score, is_anomaly, threshold, model_kind per row.
Loading reads only NumPy arrays and JSON (no sklearn), and compiles/loads the scorer kernels once.

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

    def load_context(self, context: Any) -> None:
        self.bundle = ModelBundle.load(context.artifacts[ARTIFACT_KEY])
        self.bundle.warm_up()

    # Only a DataFrame hint: MLflow 3 then skips hint-based signatures (ours is logged) without warnings.
    def predict(self, context, model_input: pd.DataFrame, params=None):  # type: ignore[no-untyped-def]
        features = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        features = features.reindex(columns=FEATURES_FULL).astype(np.float64)
        return self.bundle.score_features(features)
