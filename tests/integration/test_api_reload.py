"""Hot reload under load: the champion alias moves while clients keep sending; no request fails and the
responses switch to the new version (2 workers, each polling the alias every second)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from btc_anomaly.config import Settings
from btc_anomaly.model.promotion import promote
from btc_anomaly.model.train import train
from btc_anomaly.runtime.kafka_broker import free_port
from btc_anomaly.runtime.mlflow_server import MlflowServer
from helpers.api_server import ApiServer, api_env, sample_records, summary_body

pytestmark = pytest.mark.integration

RECORDS = sample_records(400)
POLL_S = 1.0
SETTLE_S = 2 * POLL_S + 3  # a poll, the load of the new version (busy 2-core machine), margin


@pytest.fixture(scope="module")
def two_versions(
    mlflow_server: MlflowServer, sample_lake: Path, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    """v1 champion, v2 (another seed) registered as challenger only, under a model name of their own."""
    settings = Settings(
        state_dir=tmp_path_factory.mktemp("reload-state"),
        lake_root=sample_lake,
        mlflow_tracking_uri=mlflow_server.url,
        model_name=f"btc-anomaly-reload-{uuid.uuid4().hex[:8]}",
    )
    assert train(settings, decided_by="pytest", progress=False).decision.promoted
    v2 = train(settings.model_copy(update={"iforest_random_state": 7}), promote=False, progress=False)
    assert v2.version == "2"
    return settings


async def _load(
    url: str, stop: threading.Event, log: list[tuple[float, float, int, str]], errors: list[str]
) -> None:
    bodies = [*RECORDS[:50], *(summary_body(r) for r in RECORDS[50:100])]

    async def client_loop(k: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            i = k
            while not stop.is_set():
                started = time.monotonic()
                try:
                    r = await http.post("/predict", json=bodies[i % len(bodies)])
                    version = r.json()["model"]["version"] if r.status_code == 200 else ""
                    log.append((started, time.monotonic(), r.status_code, version))
                except Exception as exc:  # every failure counts, transport errors included
                    errors.append(f"{type(exc).__name__}: {exc}")
                i += 4

    await asyncio.gather(*(client_loop(k) for k in range(4)))


def test_reload_under_load(two_versions: Settings, tmp_path: Path) -> None:
    (tmp_path / "lake").mkdir()
    server = ApiServer(
        port=free_port(),
        workdir=tmp_path,
        workers=2,
        env=api_env(
            mlflow_tracking_uri=two_versions.mlflow_tracking_uri,
            model_name=two_versions.model_name,
            lake_root=tmp_path / "lake",
            state_dir=tmp_path / "state",
            model_reload_s=POLL_S,
        ),
    )
    server.start()
    stop = threading.Event()
    log: list[tuple[float, float, int, str]] = []
    errors: list[str] = []
    loader = threading.Thread(target=lambda: asyncio.run(_load(server.url, stop, log, errors)), daemon=True)
    try:
        loader.start()
        time.sleep(2.0)
        decision = promote(two_versions, "2", decided_by="pytest")  # the gate moves the alias
        assert decision.promoted, decision.summary
        promoted_at = time.monotonic()
        deadline = promoted_at + 60
        while time.monotonic() < deadline and not any(v == "2" for *_, v in log[-20:]):
            time.sleep(0.1)
        time.sleep(SETTLE_S + 5)  # keep sending after both workers must have switched
    finally:
        stop.set()
        loader.join(30)
        server.stop()

    assert not errors, errors[:5]
    assert log, "the load generator sent nothing"
    statuses = {status for _, _, status, _ in log}
    assert statuses == {200}, statuses
    versions = [v for *_, v in log]
    assert set(versions) == {"1", "2"}
    first_v2 = min(start for start, _, _, v in log if v == "2")
    # Each worker switches within one poll (+ load time) of the alias move: nothing old after that.
    settle = max(first_v2, promoted_at) + SETTLE_S
    late_v1 = [(s, v) for s, _, _, v in log if s > settle and v == "1"]
    assert not late_v1, f"{len(late_v1)} v1 answers after the switch settled"
    assert sum(1 for s, *_ in log if s > settle) > 20
    assert "Traceback" not in server.log_tail(100_000)
