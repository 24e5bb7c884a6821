"""`btc-anomaly api` while the model registry is down (issue #19's fault suite): the served champion keeps
answering, every failed alias check is counted (btc_api_model_reloads_total{result="failure"}, the
BtcModelLoadFailing alert), and once MLflow is back the API loads the version the alias moved to meanwhile.

The API reaches MLflow through a TCP proxy the test cuts (tests/helpers/tcp_proxy.py), so the session's
server stays up for every other test. The two versions are copies of the session champion's bundle (same
files, same digest tag) under a model name of this test's own: the reload path is under test, not training.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from btc_anomaly.config import Settings
from btc_anomaly.runtime.kafka_broker import free_port
from helpers.api_server import ApiServer, api_env, sample_records
from helpers.tcp_proxy import proxy_to

pytestmark = pytest.mark.integration

POLL_S = 1.0
RECORD = sample_records(1)[0]
FAILURES = 'btc_api_model_reloads_total{result="failure"}'


def _copies_of_the_champion(settings: Settings, name: str, count: int) -> None:
    """``count`` versions of ``name``, each the session champion's bundle with its tags (digest included)."""
    client = MlflowClient(settings.mlflow_tracking_uri)
    champion = client.get_model_version_by_alias(settings.model_name, "champion")
    client.create_registered_model(name)
    for _ in range(count):
        client.create_model_version(
            name,
            source=champion.source,
            run_id=champion.run_id,
            tags=dict(champion.tags or {}),
            # MLflow 3: a `models:/<id>` source must name its logged model.
            model_id=champion.source.removeprefix("models:/")
            if champion.source.startswith("models:/")
            else None,
        )


def _served_version(url: str) -> tuple[int, str]:
    r = httpx.post(f"{url}/predict", json=RECORD, timeout=10)
    return r.status_code, r.json()["model"]["version"] if r.status_code == 200 else r.text


def _failures(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    lines = [line for line in text.splitlines() if line.startswith(FAILURES + " ")]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


def test_the_served_champion_outlives_a_registry_outage_and_the_move_loads_after(
    champion_settings: Settings, tmp_path: Path
) -> None:
    name = f"btc-anomaly-outage-{uuid.uuid4().hex[:8]}"
    _copies_of_the_champion(champion_settings, name, 2)
    registry = MlflowClient(champion_settings.mlflow_tracking_uri)
    registry.set_registered_model_alias(name, "champion", "1")
    (tmp_path / "lake").mkdir()
    with proxy_to(champion_settings.mlflow_tracking_uri) as proxy:
        server = ApiServer(
            port=free_port(),
            workdir=tmp_path,
            env=api_env(
                mlflow_tracking_uri=proxy.url,
                model_name=name,
                lake_root=tmp_path / "lake",
                state_dir=tmp_path / "state",
                model_reload_s=POLL_S,
            ),
        )
        server.start()
        try:
            assert _served_version(server.url) == (200, "1")
            before = _failures(server.url)

            proxy.cut()
            registry.set_registered_model_alias(name, "champion", "2")  # moved while the API cannot see it
            answers = []
            deadline = time.monotonic() + 8 * POLL_S
            while time.monotonic() < deadline:
                answers.append(_served_version(server.url))
                time.sleep(0.2)
            assert set(answers) == {(200, "1")}, set(answers)
            assert _failures(server.url) >= before + 2, "failed alias checks are not counted"
            assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200

            proxy.start()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and _served_version(server.url) != (200, "2"):
                time.sleep(0.2)
            assert _served_version(server.url) == (200, "2"), server.log_tail()
        finally:
            server.stop()
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]
    assert "model registry unreachable" in log
