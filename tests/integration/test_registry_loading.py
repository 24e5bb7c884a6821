"""Serving loads a registered version as data: no code from the registry runs, and the bundle files must
match the digest recorded at training (real MLflow server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from btc_anomaly.api.model_holder import ModelHolder
from btc_anomaly.config import Settings
from btc_anomaly.model.bundle import bundle_digest
from btc_anomaly.model.pyfunc import ARTIFACT_KEY
from btc_anomaly.model.registry import (
    CHAMPION,
    DIGEST_TAG,
    BundleRefused,
    client,
    load_version,
    log_bundle,
    use_tracking,
)
from btc_anomaly.model.scoring import cached_champion
from btc_anomaly.runtime.mlflow_server import MlflowServer
from helpers.api_server import sample_bundle

MARKER_ENV = "BTC_ANOMALY_TEST_REGISTRY_MARKER"
# What an attacker with write access to the registry stores as the version's model code: it would run in
# every process that loads the version through MLflow's pyfunc loader.
EVIL_CODE = f"""
import os
import pathlib

if os.environ.get({MARKER_ENV!r}):
    pathlib.Path(os.environ[{MARKER_ENV!r}]).write_text("registry code ran")

from mlflow.models import set_model

from btc_anomaly.model.pyfunc import BundlePyfunc

set_model(BundlePyfunc())
"""


@pytest.fixture(scope="module")
def settings(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    s = Settings(
        state_dir=tmp_path_factory.mktemp("registry-loading"),
        mlflow_tracking_uri=mlflow_server.url,
        mlflow_experiment=f"registry-loading-{uuid.uuid4().hex[:8]}",
        model_name=f"btc-anomaly-loading-{uuid.uuid4().hex[:8]}",
        scorer_backend="numpy",
        api_scorer_backend="numpy",
        model_reload_s=0.0,
    )
    use_tracking(s)
    mlflow.set_experiment(s.mlflow_experiment)
    yield s


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sample_bundle().save(tmp_path_factory.mktemp("bundle") / "bundle")


def _register(settings: Settings, bundle_dir: Path) -> str:
    with mlflow.start_run():
        info = log_bundle(settings, bundle_dir, signature=None, input_example=None, pip_requirements=[])
    return str(info.registered_model_version)


def _artifact_file(server: MlflowServer, settings: Settings, version: str, name: str) -> Path:
    """The stored copy of one bundle file of ``version`` in the server's artifact folder."""
    model_id = client(settings).get_model_version(settings.model_name, version).source.rsplit("/", 1)[-1]
    (path,) = [p for p in (server.data_dir / "artifacts").rglob(name) if model_id in p.parts]
    return path


def _failures() -> float:
    return REGISTRY.get_sample_value("btc_api_model_reloads_total", {"result": "failure"}) or 0.0


def test_version_code_never_runs_on_load(
    settings: Settings, bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = tmp_path / "model_code.py"
    code.write_text(EVIL_CODE)
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(code),
            artifacts={ARTIFACT_KEY: str(bundle_dir)},
            registered_model_name=settings.model_name,
        )
    version = str(info.registered_model_version)
    # The attacker can also write the matching digest: the bundle files themselves are genuine.
    client(settings).set_model_version_tag(
        settings.model_name, version, DIGEST_TAG, bundle_digest(bundle_dir)
    )
    marker = tmp_path / "marker"
    monkeypatch.setenv(MARKER_ENV, str(marker))

    loaded = load_version(settings, version)

    assert not marker.exists()
    assert loaded.version == version
    assert loaded.bundle.thresholds == sample_bundle().thresholds
    # Control: MLflow's pyfunc loader does run the stored code, so the check above means something.
    mlflow.pyfunc.load_model(f"models:/{settings.model_name}/{version}")
    assert marker.read_text() == "registry code ran"


def test_tampered_or_unverifiable_version_is_refused_and_served_one_stays(
    settings: Settings, bundle_dir: Path, mlflow_server: MlflowServer
) -> None:
    c = client(settings)
    good = _register(settings, bundle_dir)
    tampered = _register(settings, bundle_dir)
    # After registration, someone with write access to the artifact store edits the model's numbers.
    npz = _artifact_file(mlflow_server, settings, tampered, "detector.npz")
    arrays = dict(np.load(npz))
    key = next(iter(arrays))
    arrays[key] = arrays[key] * 0.5
    np.savez(npz, **arrays)
    doc_path = _artifact_file(mlflow_server, settings, tampered, "bundle.json")
    doc = json.loads(doc_path.read_text())
    doc["market_reference"] = 1e9
    doc_path.write_text(json.dumps(doc))
    unverifiable = _register(settings, bundle_dir)
    c.delete_model_version_tag(settings.model_name, unverifiable, DIGEST_TAG)

    with pytest.raises(BundleRefused, match="digest mismatch"):
        load_version(settings, tampered)
    with pytest.raises(BundleRefused, match=f"no {DIGEST_TAG} tag"):
        load_version(settings, unverifiable)

    # The API's holder and the stream's champion cache keep serving the version they have.
    holder = ModelHolder(settings.model_copy(update={"api_model_alias": CHAMPION}))
    c.set_registered_model_alias(settings.model_name, CHAMPION, good)
    assert holder.check().version == good
    assert cached_champion(settings).version == good
    for bad, reason in ((tampered, "digest mismatch"), (unverifiable, "no bundle.sha256 tag")):
        c.set_registered_model_alias(settings.model_name, CHAMPION, bad)
        before = _failures()
        result = holder.check()
        assert not result.changed
        assert holder.current is not None and holder.current.model.version == good
        assert holder.last_error is not None and reason in holder.last_error
        assert holder.status() == "ok"
        assert _failures() == before + 1
        assert cached_champion(settings).version == good

    # The commands that load a version by hand say why and exit 1 (no traceback).
    env = {k: v for k, v in os.environ.items() if not k.startswith("BTC_ANOMALY_")}
    env |= {
        "BTC_ANOMALY_MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
        "BTC_ANOMALY_MODEL_NAME": settings.model_name,
    }
    cli = [sys.executable, "-m", "btc_anomaly.cli"]
    for command in (["evaluate", "--version", str(tampered)], ["promote", str(tampered)]):
        done = subprocess.run(cli + command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 1, (command, done.stdout, done.stderr)
        assert "refused:" in done.stderr and "digest mismatch" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
