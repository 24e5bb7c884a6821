"""Metrics catalogue, Prometheus config and alert rules, Alertmanager config, Grafana dashboards.

promtool/amtool come from Debian's `prometheus` / `prometheus-alertmanager` packages (`make test` installs
them); the tests that need them skip with that message when they are missing.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from btc_anomaly.cli import app
from btc_anomaly.config import PROJECT_ROOT, Settings
from btc_anomaly.monitoring import grafana, metrics, promql
from btc_anomaly.monitoring import prometheus_config as pc
from btc_anomaly.monitoring.catalogue import catalogue, sample_names, service_of

PROM_DIR = PROJECT_ROOT / "monitoring" / "prometheus"
AM_DIR = PROJECT_ROOT / "monitoring" / "alertmanager"
GRAFANA = PROJECT_ROOT / "grafana"
SERVICES = {"producer", "stream", "trainer", "detect", "api", "dashboard", "notifier"}


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/bin")
    if path is None:
        package = "prometheus-alertmanager" if name == "amtool" else "prometheus"
        pytest.skip(f"{name} is not installed: apt-get install {package} (`make test` installs it)")
    return path


def run(*cmd: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def defaults() -> Settings:
    # Defaults only: no .env file, no BTC_ANOMALY_* variables of the machine running the tests.
    return Settings.model_construct()


# --- catalogue ---------------------------------------------------------------------------------------


def _registered_families() -> dict[str, tuple[str, str]]:
    """Every btc_* family prometheus-client itself collects (name → type, help), whichever module
    registered it: the catalogue is checked against this, not against the module it reads."""
    from prometheus_client import REGISTRY

    import btc_anomaly.api.telemetry  # every module that could define a metric
    import btc_anomaly.cli  # noqa: F401

    return {f.name: (f.type, f.documentation) for f in REGISTRY.collect() if f.name.startswith("btc_")}


def test_catalogue_lists_every_metric_object_once() -> None:
    docs = catalogue()
    assert {d.name: (d.type, d.help) for d in docs} == _registered_families()
    names = [d.name for d in docs]
    assert len(set(names)) == len(names)
    for d in docs:
        assert service_of(d.name) in SERVICES, d.name
        assert d.help.strip(), d.name
        assert not d.name.endswith("_total"), f"{d.name}: prometheus-client appends _total itself"


def test_metrics_markdown_is_generated_from_the_objects() -> None:
    result = CliRunner().invoke(app, ["metrics", "--markdown"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0] == "| metric | type | labels | meaning |"
    rows = {}
    for line in lines[2:]:
        name, kind = (cell.strip() for cell in line.strip("|").split(" | ")[:2])
        rows[name.strip("`")] = kind
    # One row per registered family, named as PromQL queries it (counters with the _total suffix).
    expected = {
        (name + "_total" if kind == "counter" else name): kind
        for name, (kind, _) in _registered_families().items()
    }
    assert rows == expected
    assert len(lines) == 2 + len(expected)
    assert "| `btc_trainer_champion_training_anomaly_rate` | gauge | `model_kind` |" in result.output
    assert "| `btc_producer_published_total` | counter | — |" in result.output
    assert "`btc_api_request_duration_seconds` | histogram | `method`, `route`, `status`" in result.output


# --- PromQL helpers ------------------------------------------------------------------------------------


def test_promql_metric_names() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, route) (rate(btc_api_request_duration_seconds_bucket{route=~"/p.*",'
        'status!="200"}[$__rate_interval]))) > 1 and on (job) up{job="api"} offset 5m or vector(0) '
        '/ ignoring(instance) group_left(version) {__name__="btc_api_model_info"} * 1e3'
    )
    assert promql.metric_names(expr) == {
        "btc_api_request_duration_seconds_bucket",
        "up",
        "btc_api_model_info",
    }


def test_promql_as_bool_leaves_matchers_alone() -> None:
    expr = 'sum(rate(x{status=~"5..", route!="/metrics"}[5m])) / y >= 0.05 and z == 1 or w<2'
    assert promql.as_bool(expr) == (
        'sum(rate(x{status=~"5..", route!="/metrics"}[5m])) / y >= bool 0.05 and z == bool 1 or w< bool2'
    )
    assert promql.as_bool("a > bool 1") == "a > bool 1"


# --- Prometheus ------------------------------------------------------------------------------------------


def test_committed_prometheus_configs_are_the_rendered_defaults() -> None:
    assert (PROM_DIR / "prometheus.yml").read_text() == pc.local_config(defaults()), (
        "regenerate: btc-anomaly prometheus --print-config > monitoring/prometheus/prometheus.yml"
    )
    assert (PROM_DIR / "prometheus.compose.yml").read_text() == pc.compose_config(defaults()), (
        "regenerate: btc-anomaly prometheus --print-config --compose > monitoring/prometheus/prometheus.compose.yml"
    )
    local = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    targets = {j["job_name"]: j["static_configs"][0]["targets"][0] for j in local["scrape_configs"]}
    assert targets == {
        "prometheus": "127.0.0.1:9090",
        "producer": "127.0.0.1:9201",
        "stream": "127.0.0.1:9202",
        "trainer": "127.0.0.1:9203",
        "detect": "127.0.0.1:9204",
        "api": "127.0.0.1:5001",
        "dashboard": "127.0.0.1:8050",
    }
    compose = yaml.safe_load((PROM_DIR / "prometheus.compose.yml").read_text())
    hosts = {j["job_name"]: j["static_configs"][0]["targets"][0] for j in compose["scrape_configs"]}
    assert hosts["api"] == "api:5001" and hosts["trainer"] == "trainer:9203"
    assert hosts["detect"] == "detect:9204"


def test_promtool_check_config(tmp_path: Path) -> None:
    promtool = tool("promtool")
    for name in ("prometheus.yml", "prometheus.compose.yml"):
        out = run(promtool, "check", "config", name, cwd=PROM_DIR)
        assert "SUCCESS" in out
    # What `btc-anomaly prometheus` writes for non-default Settings (absolute rule path, other ports).
    settings = Settings.model_construct(producer_metrics_port=19201, prometheus_scrape_interval_s=2.5)
    path = pc.write_runtime_config(settings, tmp_path)
    assert "127.0.0.1:19201" in path.read_text() and "scrape_interval: 2500ms" in path.read_text()
    run(promtool, "check", "config", str(path))


def test_promtool_check_and_unit_test_rules() -> None:
    promtool = tool("promtool")
    out = run(promtool, "check", "rules", "alerts.yml", cwd=PROM_DIR)
    # Every rule of the file is loaded (a rule promtool skips would be counted short).
    rules = sum(
        len(group["rules"]) for group in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"]
    )
    assert f"SUCCESS: {rules} rules found" in out
    run(promtool, "test", "rules", "alerts.test.yml", cwd=PROM_DIR)


def test_alert_rules_follow_the_conventions() -> None:
    rules = [r for g in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    tested = (PROM_DIR / "alerts.test.yml").read_text()
    for rule in rules:
        assert rule["alert"].startswith("Btc")
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert f"alertname: {rule['alert']}" in tested, f"{rule['alert']} has no promtool unit test"


def test_amtool_check_config() -> None:
    amtool = tool("amtool")
    for name in ("alertmanager.yml", "alertmanager.compose.yml"):
        out = run(amtool, "check-config", name, cwd=AM_DIR)
        assert "SUCCESS" in out
    config = yaml.safe_load((AM_DIR / "alertmanager.yml").read_text())
    (receiver,) = config["receivers"]
    assert (
        receiver["webhook_configs"][0]["url"]
        == f"http://127.0.0.1:{defaults().alert_relay_port}/alertmanager"
    )


# --- Grafana ---------------------------------------------------------------------------------------------


def _datasource_uid() -> str:
    doc = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (ds,) = doc["datasources"]
    assert ds["type"] == "prometheus"
    return ds["uid"]


def test_committed_dashboards_are_the_built_ones() -> None:
    built = grafana.build()
    committed = {p.name for p in (GRAFANA / "dashboards").glob("*.json")}
    assert committed == set(built)
    for name, obj in built.items():
        assert (GRAFANA / "dashboards" / name).read_text() == grafana.render(obj), (
            f"{name} differs: regenerate with `python -m btc_anomaly.monitoring.grafana`"
        )


def test_dashboards_are_valid_and_use_the_provisioned_datasource() -> None:
    uid = _datasource_uid()
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "btc-anomaly.yml").read_text())
    assert provider["providers"][0]["type"] == "file"
    uids = set()
    for path in sorted((GRAFANA / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36, path.name
        assert board["uid"] not in uids and board["title"]
        uids.add(board["uid"])
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        panels = [p for p in board["panels"] if p["type"] != "row"]
        assert panels
        for panel in panels:
            where = f"{path.name} / {panel['title']}"
            assert panel["datasource"] == {"type": "prometheus", "uid": uid}, where
            assert panel["targets"], where
            g = panel["gridPos"]
            assert g["x"] + g["w"] <= 24, where
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == uid, where
                assert target.get("expr", "").strip(), f"{where}: target {target.get('refId')} has no expr"


def test_every_query_uses_only_catalogued_metrics() -> None:
    known = sample_names()
    queries = [
        *promql.dashboard_queries(GRAFANA / "dashboards"),
        *promql.rule_queries(PROM_DIR / "alerts.yml"),
    ]
    assert len(queries) > 60
    unknown = {}
    for q in queries:
        names = promql.metric_names(q.expr)
        assert names, f"{q.where}: no metric in {q.expr!r}"
        if names - known:
            unknown[q.where] = sorted(names - known)
    assert not unknown, f"metrics not in monitoring/metrics.py: {unknown}"
    # And every alert expression still parses once the test's `bool` rewrite is applied.
    for q in queries:
        if q.kind == "alert":
            assert " bool " in promql.as_bool(q.expr)


def test_env_example_documents_the_grafana_password() -> None:
    text = (PROJECT_ROOT / ".env.example").read_text()
    assert "GF_SECURITY_ADMIN_PASSWORD=" in text
    line = next(x for x in text.splitlines() if x.startswith("GF_SECURITY_ADMIN_PASSWORD="))
    assert line == "GF_SECURITY_ADMIN_PASSWORD=", "no default admin password may be committed"


# --- exposition: pre-created series, one service's families per /metrics ---------------------------------

# Labelled counters whose label values cannot be known in advance (route x status); the first scrape of
# /metrics creates a btc_api_requests series anyway.
OPEN_LABELS = {"btc_api_requests"}


def _queried_names() -> set[str]:
    queries = [
        *promql.dashboard_queries(GRAFANA / "dashboards"),
        *promql.rule_queries(PROM_DIR / "alerts.yml"),
    ]
    return {n for q in queries for n in promql.metric_names(q.expr)}


def test_every_queried_labelled_counter_exists_before_its_first_event() -> None:
    """PromQL over a labelled counter returns nothing until a labelled series exists: each counter a rule
    or panel reads has its label sets created at 0 when monitoring/metrics.py is imported."""
    from prometheus_client import REGISTRY

    queried = _queried_names()
    samples = {(s.name, tuple(sorted(s.labels.items()))) for fam in REGISTRY.collect() for s in fam.samples}
    names = {name for name, _ in samples}
    missing = []
    for doc in catalogue():
        if doc.type != "counter" or not doc.labels or doc.name in OPEN_LABELS:
            continue
        if doc.query_name in queried and doc.query_name not in names:
            missing.append(doc.query_name)
    assert not missing, f"labelled counters read by rules/panels with no series before an event: {missing}"
    for query in metrics.STREAM_QUERIES:
        assert ("btc_stream_query_failures_total", (("query", query),)) in samples


def test_stream_query_names_are_the_streams() -> None:
    stream = pytest.importorskip("btc_anomaly.processing.stream")
    scoring = pytest.importorskip("btc_anomaly.processing.scoring_query")
    assert set(metrics.STREAM_QUERIES) == {stream.TX_QUERY, stream.STATS_QUERY, scoring.SCORING_QUERY}


def test_maintained_table_names_are_the_lakes() -> None:
    tables = pytest.importorskip("btc_anomaly.processing.tables")
    assert metrics.STREAM_TABLES == tables.STREAM_TABLES
    assert metrics.DETECT_TABLES == tables.DETECT_TABLES
    assert set(metrics.STREAM_COMPACTED_TABLES) == {tables.TRANSACTIONS, tables.SCORED}
    assert metrics.STREAM_INDEX_TABLES == tables.INDEX_TABLES


def test_each_service_exposes_only_its_families() -> None:
    from btc_anomaly.api.telemetry import render_metrics
    from btc_anomaly.monitoring.exposition import render

    def families(text: bytes) -> set[str]:
        return {
            line.split()[2].split("_")[1]
            for line in text.decode().splitlines()
            if line.startswith("# TYPE btc_")
        }

    assert families(render("btc_dashboard_")[0]) == {"dashboard"}
    assert families(render("btc_producer_")[0]) == {"producer"}
    assert families(render("btc_stream_", "btc_notifier_")[0]) == {"stream", "notifier"}
    assert families(render("btc_detect_", "btc_notifier_")[0]) == {"detect", "notifier"}
    assert families(render_metrics()[0]) == {"api", "notifier"}
    assert b"process_" in render("btc_trainer_")[0] or b"python_" in render("btc_trainer_")[0]


def test_services_serve_metrics_through_exposition() -> None:
    """No service starts prometheus_client's server or renders the whole registry itself."""
    src = PROJECT_ROOT / "src" / "btc_anomaly"
    offenders = []
    for path in src.rglob("*.py"):
        if path.parent.name == "monitoring" and path.name == "exposition.py":
            continue
        text = path.read_text()
        if "start_http_server(" in text or "generate_latest()" in text:
            offenders.append(str(path.relative_to(src)))
    assert not offenders, f"use monitoring.exposition.serve_metrics/render: {offenders}"


# --- start-up logs: waiting for Kafka is not an error -------------------------------------------------------


def test_kafka_connection_errors_are_silent_only_while_waiting_for_kafka(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A real kafka-python client against a closed port logs "Connection failed" at ERROR; inside
    waiting_for_kafka() (producer start-up, the broker's readiness probe) those records are dropped."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    from btc_anomaly.monitoring.kafka_logging import waiting_for_kafka
    from btc_anomaly.runtime.kafka_broker import free_port

    def attempt() -> list[logging.LogRecord]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="kafka"), pytest.raises(KafkaError):
            KafkaAdminClient(
                bootstrap_servers=f"127.0.0.1:{free_port()}",
                request_timeout_ms=1500,
                bootstrap_timeout_ms=1500,
            )
        return [r for r in caplog.records if r.name.startswith("kafka.") and r.levelno >= logging.WARNING]

    with waiting_for_kafka():
        assert attempt() == []
    # After the wait kafka-python logs as it always does: a broker lost later is still an ERROR.
    assert any(r.levelno == logging.ERROR for r in attempt())
