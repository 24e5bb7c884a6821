"""The Dash app without a browser: callbacks over HTTP (Flask test client), /metrics, the empty-lake and
broken-lake states, MLflow being down, the detail panel and input parsing."""

from __future__ import annotations

import datetime as dt
import json
import socket
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from prometheus_client import REGISTRY

from btc_anomaly.config import Settings
from btc_anomaly.dashboard.app import create_app
from btc_anomaly.dashboard.demo import DemoLake, write_demo_lake
from btc_anomaly.dashboard.lake import to_us
from btc_anomaly.dashboard.layout import ID
from btc_anomaly.dashboard.model_info import ModelInfo
from btc_anomaly.dashboard.views import (
    DashboardState,
    detail_for_point,
    filters_from_inputs,
    now_utc,
    render_detail,
    render_overview,
    render_table,
)


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fail_fast_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")


def _settings(root: Path, **kw: Any) -> Settings:
    values: dict[str, Any] = {
        "state_dir": root / "state",
        "lake_root": root / "lake",
        "mlflow_tracking_uri": f"http://127.0.0.1:{_dead_port()}",
    }
    return Settings(**{**values, **kw})


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> DemoLake:
    root = tmp_path_factory.mktemp("dash-app")
    return write_demo_lake(root / "lake", Settings())


def _callback_payload(
    app: Any, output_ids: list[str], inputs: list[dict[str, Any]], state: list[dict[str, Any]], changed: str
) -> dict[str, Any]:
    outputs = [{"id": o.split(".")[0], "property": o.split(".")[1]} for o in output_ids]
    return {
        "output": ".." + "...".join(output_ids) + "..",
        "outputs": outputs,
        "inputs": inputs,
        "changedPropIds": [changed],
        "state": state,
    }


def _refresh_payload(app: Any, window: str = "all", threshold: float = 0.6) -> dict[str, Any]:
    outputs = [
        f"{ID.kpis}.children",
        f"{ID.banner}.children",
        f"{ID.timeseries}.figure",
        f"{ID.histogram}.figure",
        f"{ID.scatter}.figure",
        f"{ID.threshold_label}.children",
        f"{ID.view_key}.data",
        f"{ID.updated}.children",
    ]
    inputs = [
        {"id": ID.tick, "property": "n_intervals", "value": 1},
        {"id": ID.window, "property": "value", "value": window},
        {"id": ID.custom_start, "property": "value", "value": None},
        {"id": ID.custom_end, "property": "value", "value": None},
        {"id": ID.threshold, "property": "value", "value": threshold},
        {"id": ID.min_value, "property": "value", "value": 0},
    ]
    state = [
        {"id": ID.model_threshold, "property": "data", "value": None},
        {"id": ID.view_key, "property": "data", "value": None},
        {"id": ID.url, "property": "pathname", "value": "/"},
    ]
    return _callback_payload(app, outputs, inputs, state, f"{ID.tick}.n_intervals")


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_refresh_callback_over_http_and_metrics(tmp_path: Path, lake: DemoLake) -> None:
    app = create_app(_settings(tmp_path, lake_root=lake.root))
    client = app.server.test_client()
    assert client.get("/").status_code == 200
    layout = client.get("/_dash-layout").get_json()
    assert ID.threshold in json.dumps(layout)
    before = _metric("btc_dashboard_callback_duration_seconds_count", callback="refresh_panels")
    response = client.post("/_dash-update-component", json=_refresh_payload(app, threshold=0.55))
    assert response.status_code == 200, response.data[:500]
    body = response.get_json()["response"]
    kpis = json.dumps(body[ID.kpis]["children"])
    expected = int((lake.scored["anomaly_score"] > 0.55).sum())
    assert f"{expected:,}" in kpis
    assert body[ID.scatter]["figure"]["data"], "scatter has no traces"
    assert _metric("btc_dashboard_callback_duration_seconds_count", callback="refresh_panels") == before + 1
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and metrics.mimetype == "text/plain"
    text = metrics.get_data(as_text=True)
    assert 'btc_dashboard_callback_duration_seconds_bucket{callback="refresh_panels"' in text
    assert 'btc_dashboard_callback_errors_total{callback="refresh_panels"}' in text
    assert client.get("/healthz").status_code == 200


def test_empty_lake_is_a_waiting_state(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    app = create_app(settings)
    state: DashboardState = app.dashboard_state  # type: ignore[attr-defined]
    app.layout()  # the page itself renders without a lake
    filters, problem = filters_from_inputs("1h", None, None, 0.6, 0, None)
    view = render_overview(state, filters, now_utc(), model_threshold=None)
    assert problem is None
    assert "Waiting for data" in json.dumps(view.banner, default=str)
    for fig in (view.timeseries, view.histogram, view.scatter):
        assert fig["data"] == [] and "Waiting for data" in fig["layout"]["annotations"][0]["text"]
    table = render_table(state, filters, now_utc())
    assert table.rows == [] and table.caption == "Waiting for data."
    response = app.server.test_client().post("/_dash-update-component", json=_refresh_payload(app))
    assert response.status_code == 200
    assert "banner-waiting" in json.dumps(response.get_json()["response"][ID.banner])


def test_unreadable_lake_shows_an_error_banner_and_counts_it(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    log_dir = settings.lake_table("scored_transactions") / "_delta_log"
    log_dir.mkdir(parents=True)
    (log_dir / "00000000000000000000.json").write_text("this is not a delta log\n")
    app = create_app(settings)
    before = _metric("btc_dashboard_callback_errors_total", callback="refresh_panels")
    response = app.server.test_client().post("/_dash-update-component", json=_refresh_payload(app))
    assert response.status_code == 200
    assert "banner-error" in json.dumps(response.get_json()["response"][ID.banner])
    assert _metric("btc_dashboard_callback_errors_total", callback="refresh_panels") == before + 1


def test_mlflow_down_is_reported_not_raised(tmp_path: Path, lake: DemoLake, fail_fast_mlflow: None) -> None:
    settings = _settings(tmp_path, lake_root=lake.root)
    state = DashboardState.from_settings(settings)
    snap = state.models.poll_now()
    assert snap.champion is None and snap.error and "unreachable" in snap.error
    filters, _ = filters_from_inputs("all", None, None, None, None, None)
    view = render_overview(state, filters, now_utc(), model_threshold=None)
    assert "unreachable" in json.dumps(view.kpis, default=str)
    state.models.stop()


@pytest.mark.timeout(120)
def test_a_hanging_mlflow_never_blocks_a_page(tmp_path: Path, fail_fast_mlflow: None) -> None:
    """A server that accepts connections and never answers: get() returns and says so. With an hour-long
    MLflow timeout, a get() that waited for the server would hang the test into its timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        patient = ModelInfo(
            Settings(
                state_dir=tmp_path,
                mlflow_tracking_uri=f"http://127.0.0.1:{listener.getsockname()[1]}",
                dashboard_mlflow_timeout_s=3600,
            )
        )
        patient.refresh_soon()
        for _ in range(20):
            assert patient.get().champion is None  # answered while the refresh still waits
            time.sleep(0.05)
        patient.stop()

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        settings = Settings(
            state_dir=tmp_path,
            mlflow_tracking_uri=f"http://127.0.0.1:{listener.getsockname()[1]}",
            dashboard_mlflow_timeout_s=0.5,
        )
        info = ModelInfo(settings)
        info.refresh_soon()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            snap = info.get()
            if snap.error and "not answering" in snap.error:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"never reported the hanging server: {snap}")
        info.stop()


def test_detail_panel_shows_inputs_outputs_and_reasons(tmp_path: Path, lake: DemoLake) -> None:
    state = DashboardState.from_settings(_settings(tmp_path, lake_root=lake.root))
    row = lake.scored.sort_values("anomaly_score").iloc[-1]
    us = to_us(pd.Timestamp(row["first_seen"]).to_pydatetime())
    panel = json.dumps(render_detail(state, row["hash"], us), default=str)
    assert row["hash"] in panel and "mempool.space/tx/" + row["hash"] in panel
    for reason in row["reasons"]:
        assert json.dumps(reason)[1:-1] in panel
    tx = lake.transactions.set_index("hash").loc[row["hash"]]
    assert f"Inputs ({tx['input_count']:,})" in panel and f"Outputs ({tx['output_count']:,})" in panel
    first_output = tx["outputs"][0]
    assert (first_output["address"] or "") in panel
    missing = json.dumps(render_detail(state, "f" * 64, us), default=str)
    assert "Not found in the lake" in missing


def test_filters_from_inputs() -> None:
    f, problem = filters_from_inputs("custom", "2021-07-23", "2021-07-24 06:00", 0.61, "0.5", 0.6)
    assert problem is None and f.window == "custom" and f.threshold == 0.61 and f.min_value_btc == 0.5
    assert f.start == dt.datetime(2021, 7, 23, tzinfo=dt.UTC)
    assert f.end == dt.datetime(2021, 7, 24, 6, tzinfo=dt.UTC)
    assert filters_from_inputs("1h", None, None, 0.6, None, 0.6)[0].threshold is None  # the model's own
    bad, problem = filters_from_inputs("custom", "yesterday-ish", None, 0.6, None, None)
    assert problem and bad.start is None
    assert filters_from_inputs("nonsense", None, None, None, "x", None)[0].window == "1h"


def test_scatter_point_click_finds_its_transaction(tmp_path: Path, lake: DemoLake) -> None:
    """Scatter points carry (first_seen µs, score) instead of hashes; the server finds the row back."""
    state = DashboardState.from_settings(_settings(tmp_path, lake_root=lake.root))
    filters, _ = filters_from_inputs("all", None, None, None, None, None)
    fig = render_overview(state, filters, now_utc(), model_threshold=None).scatter
    anomalous = next(t for t in fig["data"] if t["name"] == "anomalous")
    ts_us, score = anomalous["customdata"][0]
    expected = lake.scored[
        (lake.scored["first_seen"].dt.as_unit("us").astype("int64") == ts_us)
        & ((lake.scored["anomaly_score"] - score).abs() < 1e-5)
    ]["hash"]
    assert len(expected) == 1
    panel = json.dumps(detail_for_point(state, ts_us, score), default=str)
    assert expected.iloc[0] in panel and "Why it was flagged" in panel
    assert "no longer" in json.dumps(detail_for_point(state, 1, 0.5), default=str)


def test_the_dashboard_never_imports_pyspark() -> None:
    import subprocess
    import sys

    code = (
        "import sys, btc_anomaly.dashboard.app, btc_anomaly.dashboard.demo, btc_anomaly.dashboard.callbacks; "
        "assert 'pyspark' not in sys.modules, 'pyspark imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_host_header_outside_allowed_hosts_is_400(tmp_path: Path) -> None:
    client = create_app(_settings(tmp_path)).server.test_client()
    for base in ("http://localhost", "http://127.0.0.1:8050", "http://dashboard:8050"):
        assert client.get("/healthz", base_url=base).status_code == 200, base
    for base in ("http://evil.example", "http://dashboard.evil.example:8050"):
        assert client.get("/", base_url=base).status_code == 400, base
        assert client.get("/healthz", base_url=base).status_code == 400, base
    anyone = create_app(_settings(tmp_path, allowed_hosts="*")).server.test_client()
    assert anyone.get("/healthz", base_url="http://evil.example").status_code == 200
