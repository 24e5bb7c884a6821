"""MLflow pyfunc over a ``ModelBundle``: what the MLflow UI shows for a version and what
``mlflow models serve -m models:/btc-anomaly-iforest@champion`` runs for a user who chooses to.

Our own loaders never go through it: the API, the stream, the promotion gate and ``evaluate`` read the
bundle's files as data after checking their digest (``registry.load_version``), because MLflow's pyfunc
loader executes the code file stored with the version ("models from code": ``MODEL_CODE``), and whoever
can write to the registry chooses that file. It stays logged for the UI (signature, input example) and for
``mlflow models serve``; no pickled Python object is stored.

Input: a feature frame with the ``FEATURES_FULL`` columns (``compute_features`` output; prevout
columns NaN when unknown). Output: anomaly_score, is_anomaly, threshold, model_kind per row.
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

    # Only a DataFrame hint: MLflow 3 then skips hint-based signatures (ours is logged) without warnings.
    def predict(self, context, model_input: pd.DataFrame, params=None):  # type: ignore[no-untyped-def]
        features = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        features = features.reindex(columns=FEATURES_FULL).astype(np.float64)
        return self.bundle.score_features(features)
