"""The dashboard the way the demo and compose run it: ``btc-anomaly dashboard`` (Procfile, Dockerfile.dashboard),
one gunicorn gthread worker built after the fork (``dashboard.app.serve``), over real HTTP.

The lake is the bundled sample scored by the session champion (a real MLflow server); the dashboard
process reads it and the registry through the same ``BTC_ANOMALY_*`` variables a user sets. One request
per page and per callback of the app's callback map (built from ``/_dash-dependencies`` and the layout as
the browser builds them: ``bench/dash_requests.py``), then the severity filter's wiring: the table answers
only the rows at or above the chosen severity, counted here from the scored frame with pandas.

Every callback catches its own exceptions and answers 200 with an error panel, so a 200 is not enough:
the test also requires ``btc_dashboard_callback_errors`` to stay at zero and the server log to hold no
traceback and no delta-rs "Forked process detected" panic.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from btc_anomaly.config import PROJECT_ROOT, Settings
from btc_anomaly.dashboard.demo import DemoLake, write_demo_lake
from btc_anomaly.dashboard.layout import ID
from btc_anomaly.detectors.risk import SEVERITIES
from btc_anomaly.runtime.kafka_broker import free_port

sys.path.insert(0, str(PROJECT_ROOT))  # bench/ belongs to the checkout, not to the installed package
from bench import dash_requests

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 120
BAD_LOG = re.compile(r"Traceback \(most recent call last\)|Forked process detected|(?:^|\s)ERROR(?:\s|:)")


@pytest.fixture(scope="module")
def lake(champion_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> DemoLake:
    from btc_anomaly.model.scoring import load_champion

    champion = load_champion(champion_settings)
    return write_demo_lake(
        tmp_path_factory.mktemp("dash-gunicorn") / "lake", champion_settings, model=champion
    )


@pytest.fixture(scope="module")
def served(
    champion_settings: Settings, lake: DemoLake, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """``btc-anomaly dashboard`` on a free port; yields (client, log path)."""
    workdir = tmp_path_factory.mktemp("dash-gunicorn-run")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BTC_ANOMALY_")}
    env.update(
        {
            "BTC_ANOMALY_DASHBOARD_HOST": "127.0.0.1",
            "BTC_ANOMALY_DASHBOARD_PORT": str(port),
            "BTC_ANOMALY_LAKE_ROOT": str(lake.root),
            "BTC_ANOMALY_STATE_DIR": str(workdir / "state"),
            "BTC_ANOMALY_MLFLOW_TRACKING_URI": champion_settings.mlflow_tracking_uri,
            "BTC_ANOMALY_MODEL_NAME": champion_settings.model_name,
            "BTC_ANOMALY_DASHBOARD_DEFAULT_WINDOW": "1h",
        }
    )
    log_path = workdir / "dashboard.log"
    cli = Path(sys.executable).with_name("btc-anomaly")  # the console script the Procfile runs
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(cli), "dashboard"], cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    client = dash_requests.HttpClient(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, (
                f"btc-anomaly dashboard exited {proc.returncode}:\n{log_path.read_text()}"
            )
            try:
                if client.get("/healthz").status_code == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (
                f"dashboard not up in {START_TIMEOUT_S}s:\n{log_path.read_text()}"
            )
            time.sleep(0.5)
        yield client, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def callback_errors(client: Any) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get("/metrics").data.decode()
    return {
        s.labels["callback"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "btc_dashboard_callback_errors_total" and s.value
    }


def test_it_runs_under_gunicorn(served: Any) -> None:
    _, log_path = served
    log = log_path.read_text(errors="replace")
    assert "Booting worker" in log and "gthread" in log, log[-2000:]


def test_every_page_and_callback_answers(served: Any, lake: DemoLake) -> None:
    client, log_path = served
    for path in ("/", "/model", "/healthz", "/_dash-layout", "/_dash-dependencies"):
        response = client.get(path)
        assert response.status_code == 200, (path, response.data[:300])
    assert b"react-entry-point" in client.get("/model").data
    assert b"btc_dashboard_" in client.get("/metrics").data

    callbacks = dash_requests.callbacks(client)
    values = dash_requests.layout_values(client)
    values[(ID.tick, "n_intervals")] = 1
    assert len(callbacks) >= 7
    for page in ("/", "/model"):
        values[(ID.url, "pathname")] = page
        for cb in callbacks:
            response = client.post("/_dash-update-component", json=cb.request(values))
            # 204: the callback chose not to update (PreventUpdate: e.g. the overview's tick on /model).
            assert response.status_code in (200, 204), (page, cb.output, response.data[:500])
            if response.status_code == 200:
                answered = response.json()["response"]
                assert {i for i, _ in cb.outputs} <= set(answered), (page, cb.output, list(answered))
    assert not callback_errors(client), callback_errors(client)
    bad = [line for line in log_path.read_text(errors="replace").splitlines() if BAD_LOG.search(line)]
    assert not bad, "\n".join(bad[:20])


@pytest.mark.parametrize("severity", ["", "medium", "high", "severe"])
def test_severity_filter_answers_the_rows_at_or_above_it(served: Any, lake: DemoLake, severity: str) -> None:
    client, _ = served
    table = dash_requests.find(dash_requests.callbacks(client), (ID.table, "data"))
    values = dash_requests.layout_values(client)
    values.update(
        {
            (ID.tick, "n_intervals"): 1,
            (ID.url, "pathname"): "/",
            (ID.window, "value"): "all",
            (ID.severity, "value"): severity,
        }
    )
    response = client.post("/_dash-update-component", json=table.request(values, (ID.severity, "value")))
    assert response.status_code == 200, response.data[:500]
    answer = response.json()["response"]
    rows, caption = answer[ID.table]["data"], answer[ID.table_caption]["children"]

    scored = lake.scored
    if severity:
        # Independent count: pandas over the scored frame, severities ranked by their documented order.
        rank = scored["severity"].map({s: i for i, s in enumerate(SEVERITIES)})
        expected = int((rank >= SEVERITIES.index(severity)).sum())
        assert all(SEVERITIES.index(r["severity"]) >= SEVERITIES.index(severity) for r in rows), rows
        what = f"transactions of severity {severity} or above"
    else:
        expected = int(scored["is_anomaly"].sum())
        what = "anomalies"
    if expected:
        assert caption.startswith(f"{expected:,} {what}"), caption
        assert rows
    else:
        assert caption == f"No {what} in this range.", caption
        assert rows == []
