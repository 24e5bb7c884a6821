"""The pyfunc loader: loading a version does not load numba; warm-up is explicit and happens once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow.pyfunc
import pytest

from btc_anomaly.config import PROJECT_ROOT
from btc_anomaly.model.pyfunc import ARTIFACT_KEY, MODEL_CODE, BundlePyfunc
from helpers.api_server import sample_bundle


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pyfunc")
    bundle_dir = sample_bundle().save(root / "bundle")
    mlflow.pyfunc.save_model(
        str(root / "model"), python_model=str(MODEL_CODE), artifacts={ARTIFACT_KEY: str(bundle_dir)}
    )
    return root / "model"


def test_loading_does_not_compile_and_scoring_still_works(saved_model: Path) -> None:
    # A fresh process: this one may have imported numba already.
    code = f"""
import json, sys, time
import mlflow.pyfunc
from btc_anomaly.features import compute_features
from btc_anomaly.model.reference import reference_transactions
t0 = time.perf_counter()
model = mlflow.pyfunc.load_model({str(saved_model)!r})
loaded_s = time.perf_counter() - t0
after_load = "numba" in sys.modules
scored = model.predict(compute_features(reference_transactions()))
print(json.dumps({{"after_load": after_load, "rows": len(scored), "loaded_s": loaded_s}}))
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
    assert result["after_load"] is False
    assert result["rows"] == 500


def test_warm_up_runs_once_per_backend(saved_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = mlflow.pyfunc.load_model(str(saved_model)).unwrap_python_model()
    assert isinstance(model, BundlePyfunc)
    calls: list[str] = []
    monkeypatch.setattr(
        model.bundle, "warm_up", lambda: calls.append(next(iter(model.bundle.forests.values())).backend)
    )
    model.bundle.set_backend("numpy")
    model.warm_up()
    model.warm_up()
    assert calls == ["numpy"]
    model.bundle.set_backend("auto")
    model.warm_up()
    model.warm_up()
    assert calls == ["numpy", "auto"]
