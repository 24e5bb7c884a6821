"""The API before any model, with the registry down, and with several workers sharing the metrics."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import httpx
import pytest

from btc_anomaly.config import Settings
from btc_anomaly.runtime.kafka_broker import free_port
from btc_anomaly.runtime.mlflow_server import MlflowServer
from helpers.api_server import ApiServer, api_env, sample_records

pytestmark = pytest.mark.integration

RECORD = sample_records(1)[0]


def _server(tmp_path: Path, workers: int = 1, **settings: object) -> ApiServer:
    (tmp_path / "lake").mkdir(exist_ok=True)
    values = {
        "lake_root": tmp_path / "lake",
        "state_dir": tmp_path / "state",
        "model_reload_s": 1.0,
        **settings,
    }
    return ApiServer(port=free_port(), workdir=tmp_path, workers=workers, env=api_env(**values))


def test_empty_registry_is_503_until_a_model_exists(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    server = _server(
        tmp_path, mlflow_tracking_uri=mlflow_server.url, model_name=f"none-{uuid.uuid4().hex[:8]}"
    )
    server.start(ready=False)
    try:
        server.wait("/health", 30)
        with httpx.Client(base_url=server.url, timeout=10) as http:
            _wait_status(http, "no model registered yet: run btc-anomaly train")
            r = http.post("/predict", json=RECORD)
            assert r.status_code == 503
            assert r.json() == {"detail": "no model registered yet: run btc-anomaly train"}
            ready = http.get("/ready")
            assert ready.status_code == 503
            assert ready.json()["missing"] == ["no model registered yet: run btc-anomaly train"]
            assert http.get("/model").status_code == 503
            assert http.get("/anomalies").status_code == 200  # the lake side works without a model
    finally:
        server.stop()


def test_registry_down_starts_and_reports_not_ready(tmp_path: Path) -> None:
    registry = f"127.0.0.1:{free_port()}"
    server = _server(tmp_path, mlflow_tracking_uri=f"http://{registry}", model_name="whatever")
    server.start(ready=False)
    try:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            _wait_status(http, "model not loaded: model registry unreachable")
            assert http.get("/health").status_code == 200
            r = http.post("/predict", json=RECORD)
            assert r.status_code == 503
            assert r.json()["detail"].startswith("model not loaded: model registry unreachable")
            assert registry not in r.text, "the 503 of /predict names no upstream address"
            ready = http.get("/ready")
            assert ready.status_code == 503
            # Who is asked and what it answered are in the log, not in a body anyone on the port reads.
            assert registry not in ready.text and str(tmp_path) not in ready.text
        assert registry in server.log_tail(20_000)
    finally:
        server.stop()


def _wait_status(http: httpx.Client, prefix: str, timeout_s: float = 60.0) -> str:
    deadline = time.monotonic() + timeout_s
    status = ""
    while time.monotonic() < deadline:
        status = http.get("/ready").json()["model"]["status"]
        if status.startswith(prefix):
            return status
        time.sleep(0.2)
    raise AssertionError(f"model status stayed {status!r}")


def test_two_workers_share_metrics_and_reloads(champion_settings: Settings, tmp_path: Path) -> None:
    server = _server(
        tmp_path,
        workers=2,
        mlflow_tracking_uri=champion_settings.mlflow_tracking_uri,
        model_name=champion_settings.model_name,
        model_reload_s=3600,  # only the admin signal may trigger a reload in this test
        api_key="k",
    )
    server.start()
    try:
        n = 300
        with httpx.Client(base_url=server.url, timeout=30) as http:
            # Fresh connections spread requests over both workers.
            pids = {httpx.get(server.url + "/health").json()["pid"] for _ in range(40)}
            assert len(pids) == 2, "both workers answer"
            for _ in range(n):
                assert httpx.post(server.url + "/predict", json=RECORD).status_code == 200
            for _ in range(3):  # whichever worker answers /metrics, it reports every worker's counts
                text = http.get("/metrics").text
                assert (
                    _value(text, 'btc_api_requests_total{method="POST",route="/predict",status="200"}') == n
                )
                assert _value(text, 'btc_api_model_reloads_total{result="success"}') == 2
            r = http.post("/admin/reload", params={"force": "true"}, headers={"X-API-Key": "k"})
            assert r.status_code == 200 and r.json()["changed"]
            # The worker that got the request reloaded at once; the other follows the signal file.
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                reloads = _value(http.get("/metrics").text, 'btc_api_model_reloads_total{result="success"}')
                if reloads >= 4:
                    break
                time.sleep(0.2)
            time.sleep(2)  # and nobody reloads twice
            assert _value(http.get("/metrics").text, 'btc_api_model_reloads_total{result="success"}') == 4
            info = re.findall(r"btc_api_model_info\{[^}]*version=\"1\"\} (\S+)", http.get("/metrics").text)
            assert info == ["1.0"]
    finally:
        server.stop()


def _value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
