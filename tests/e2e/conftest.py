"""Fixtures of the e2e tests: the shared `make demo` stack (``demo_stack.py``) and the test order."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from demo_stack import DETECT_POLL_S, LAST, SERVICES, STARTUP_BUDGET_S, DemoStack, http

from btc_anomaly.config import PROJECT_ROOT
from btc_anomaly.runtime.kafka_broker import free_port


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The Ctrl-C test right after the last e2e test, not at the end of the session: it stops the shared
    stack, which would otherwise run (and take CPU) through every later tier of the suite."""
    here = Path(__file__).parent
    last = [i for i in items if i.nodeid.endswith(LAST)]
    if not last:
        return
    rest = [i for i in items if i not in last]
    e2e = [n for n, i in enumerate(rest) if here in i.path.parents]
    at = e2e[-1] + 1 if e2e else len(rest)
    items[:] = rest[:at] + last + rest[at:]


@pytest.fixture(scope="session")
def demo_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoStack]:
    from fakes.blockchain_com import FakeBlockchainCom

    if shutil.which("make") is None:
        pytest.skip("needs make")
    # The outside world is faked: /predict/raw's prevout lookups (a README example) go to the recorded
    # Blockchain.com stand-in, not the internet.
    with FakeBlockchainCom() as blockchain:
        yield from _demo(tmp_path_factory.mktemp("demo"), blockchain.base_url)


def _demo(tmp_path: Path, blockchain_url: str) -> Iterator[DemoStack]:
    marker = uuid.uuid4().hex
    ports = {name: free_port() for name in SERVICES}
    env = {
        **os.environ,
        "BTC_DEMO_TEST_MARKER": marker,
        "BTC_ANOMALY_KAFKA_PORT": str(ports["kafka"]),
        "BTC_ANOMALY_KAFKA_CONTROLLER_PORT": str(ports["controller"]),
        "BTC_ANOMALY_KAFKA_BOOTSTRAP": f"127.0.0.1:{ports['kafka']}",
        "BTC_ANOMALY_MLFLOW_PORT": str(ports["mlflow"]),
        "BTC_ANOMALY_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['mlflow']}",
        "BTC_ANOMALY_API_PORT": str(ports["api"]),
        "BTC_ANOMALY_DASHBOARD_PORT": str(ports["dashboard"]),
        "BTC_ANOMALY_PROMETHEUS_PORT": str(ports["prometheus"]),
        "BTC_ANOMALY_PRODUCER_METRICS_PORT": str(ports["producer"]),
        "BTC_ANOMALY_STREAM_METRICS_PORT": str(ports["stream"]),
        "BTC_ANOMALY_TRAINER_METRICS_PORT": str(ports["trainer"]),
        "BTC_ANOMALY_DETECT_METRICS_PORT": str(ports["detect"]),
        "BTC_ANOMALY_DETECT_POLL_S": str(DETECT_POLL_S),
        "BTC_ANOMALY_ALERTMANAGER_PORT": str(ports["alertmanager"]),
        # Shorter waits than a user's defaults: the test has a budget, the stack logic is the same.
        "BTC_ANOMALY_MODEL_RELOAD_S": "5",
        "FIRST_TRAINING_RETRY_S": "5",
        "BTC_ANOMALY_SPARK_DRIVER_MEMORY": "1g",
        "BTC_ANOMALY_BLOCKCHAIN_BASE_URL": blockchain_url,
    }
    for key in [k for k in env if k.startswith("BTC_ANOMALY_") and k.endswith(("_DIR", "_ROOT", "_TABLE"))]:
        env.pop(key)  # a developer's lake/state overrides would point the stack elsewhere
    log_path = tmp_path / "demo.log"
    started = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                "make",
                "--no-print-directory",
                "demo",
                f"DEMO_STATE={tmp_path / 'state'}",
                "DEMO_ENV_FILE=/dev/null",
                "SPEED=60",
            ],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: SIGINT to it is Ctrl-C in its terminal
        )
    stack = DemoStack(proc, marker, ports, log_path, tmp_path / "state")
    try:
        anomalies: object = None
        while time.monotonic() - started < STARTUP_BUDGET_S:
            if proc.poll() is not None:
                pytest.fail(f"make demo exited early ({proc.returncode}):\n{stack.tail()}")
            status, anomalies = http(f"{stack.api}/anomalies?limit=20")
            if status == 200 and isinstance(anomalies, dict) and anomalies.get("count", 0) > 0:
                stack.first_scored_s = time.monotonic() - started
                stack.first_anomalies = anomalies
                break
            time.sleep(3)
        else:
            pytest.fail(
                f"no scored anomalies within {STARTUP_BUDGET_S}s (last /anomalies: {anomalies!r})\n{stack.tail()}"
            )
        yield stack
    finally:
        stack.stop()
