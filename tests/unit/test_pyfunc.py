"""Loading a bundle as data reads no numba (warm-up is the serving process's choice), and the pyfunc logged
for the MLflow UI and `mlflow models serve` still loads and scores the same bundle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow.pyfunc
import pytest

from btc_anomaly.config import PROJECT_ROOT
from btc_anomaly.model.pyfunc import ARTIFACT_KEY, MODEL_CODE
from helpers.api_server import sample_bundle


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pyfunc")
    bundle_dir = sample_bundle().save(root / "bundle")
    mlflow.pyfunc.save_model(
        str(root / "model"), python_model=str(MODEL_CODE), artifacts={ARTIFACT_KEY: str(bundle_dir)}
    )
    return root / "model"


def test_data_load_does_not_compile_and_the_pyfunc_scores_the_same(saved_model: Path) -> None:
    # A fresh process: this one may have imported numba already.
    bundle_dir = saved_model / "artifacts" / ARTIFACT_KEY
    code = f"""
import json, sys
import mlflow.pyfunc
from btc_anomaly.features import compute_features
from btc_anomaly.model.bundle import ModelBundle
from btc_anomaly.model.reference import reference_transactions
bundle = ModelBundle.load({str(bundle_dir)!r})
after_load = "numba" in sys.modules
features = compute_features(reference_transactions())
ours = bundle.score_features(features)
served = mlflow.pyfunc.load_model({str(saved_model)!r}).predict(features)
same = bool((ours["anomaly_score"].to_numpy() == served["anomaly_score"].to_numpy()).all())
print(json.dumps({{"after_load": after_load, "rows": len(served), "same": same}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=PROJECT_ROOT,
        timeout=300,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"after_load": False, "rows": 500, "same": True}
