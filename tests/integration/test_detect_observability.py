"""`btc-anomaly detect` under a real Prometheus: scraped, its dashboard panels and alert return data, and a
detector stage that keeps failing turns the healthcheck and BtcDetectStalled red (issue #19).

The real `btc-anomaly detect` process polls a deltalake lake holding a real burst of fan-outs every second;
Debian's Prometheus scrapes it every second with the committed alert rules (BtcDetectStalled's threshold
shortened to seconds). Then the lake's tx_stats_1m is made unreadable (a corrupt Delta log): the windows
stage fails at every poll while the bursts and risky stages go on, the failure counter rises, the
healthcheck fails, the alert goes pending. Repairing the table makes everything green again.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import yaml

from btc_anomaly.monitoring import prometheus_config as pc
from btc_anomaly.monitoring import promql
from btc_anomaly.processing import tables
from btc_anomaly.runtime.kafka_broker import free_port
from btc_anomaly.runtime.prometheus_server import PrometheusServer, find_binary
from helpers.detectors import burst_members, restamp, write_transactions

pytestmark = pytest.mark.integration

GRAFANA_DASHBOARDS = pc.PROJECT_ROOT / "grafana" / "dashboards"
STALL_AFTER_S = 8  # the test's BtcDetectStalled threshold (300 s in alerts.yml)
MAX_AGE_S = 6  # the test's BTC_ANOMALY_DETECT_HEALTHCHECK_MAX_AGE_S (120 s by default)


def _detect_queries() -> list[promql.Query]:
    queries = [*promql.dashboard_queries(GRAFANA_DASHBOARDS), *promql.rule_queries(pc.ALERTS_FILE)]
    return [q for q in queries if any(n.startswith("btc_detect_") for n in promql.metric_names(q.expr))]


def _rules(folder: Path) -> Path:
    doc = yaml.safe_load(pc.ALERTS_FILE.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "BtcDetectStalled":
                assert "> 300" in rule["expr"]
                rule["expr"] = rule["expr"].replace("> 300", f"> {STALL_AFTER_S}")
                rule["for"] = "0s"
    path = folder / "alerts.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _wait(what: str, check: Callable[[], bool], timeout_s: float, logs: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, RuntimeError, ValueError, KeyError, IndexError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what} not within {timeout_s:.0f} s\n{logs()}")


def _value(prometheus: PrometheusServer, expr: str) -> float:
    result = prometheus.query(expr)
    return float(result[0]["value"][1]) if result else float("nan")


def _alert_state(prometheus: PrometheusServer, name: str) -> str:
    states = [a["state"] for a in prometheus.api("alerts")["alerts"] if a["labels"]["alertname"] == name]
    return states[0] if states else "inactive"


@pytest.mark.timeout(300)
def test_detect_metrics_panels_alert_and_healthcheck_follow_its_polls(tmp_path: Path) -> None:
    binary = find_binary("prometheus")
    if binary is None:
        pytest.skip(
            "Debian's prometheus is not installed: apt-get install prometheus (`make test` installs it)"
        )
    lake = tmp_path / "lake"
    write_transactions(lake, restamp(burst_members()[:4], pd.Timestamp("2026-01-01T00:00:00Z"), 3.0))
    ports = {"detect": free_port(), "prometheus": free_port()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("BTC_ANOMALY_")}
    env.update(
        {
            "BTC_ANOMALY_LAKE_ROOT": str(lake),
            "BTC_ANOMALY_DETECT_METRICS_PORT": str(ports["detect"]),
            "BTC_ANOMALY_DETECT_POLL_S": "1",
            "BTC_ANOMALY_DETECT_HEALTHCHECK_MAX_AGE_S": str(MAX_AGE_S),
            "PYTHONUNBUFFERED": "1",
        }
    )
    log = tmp_path / "detect.log"
    detect = subprocess.Popen(
        [sys.executable, "-m", "btc_anomaly.cli", "detect"],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,  # no .env of the checkout
        start_new_session=True,
    )
    config = tmp_path / "prometheus.yml"
    config.write_text(
        pc.render(
            [pc.Job("detect", f"127.0.0.1:{ports['detect']}", "detect")],
            scrape_interval="1s",
            rule_files=[str(_rules(tmp_path))],
            self_target=f"127.0.0.1:{ports['prometheus']}",
        )
    )
    prometheus = PrometheusServer(
        config_file=config, data_dir=tmp_path / "prometheus", port=ports["prometheus"], binary=binary
    )

    def logs() -> str:
        return f"--- detect ---\n{log.read_text(errors='replace')[-4000:]}\n--- prometheus ---\n{prometheus.log_tail()}"

    def healthcheck() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "btc_anomaly.cli", "detect", "--healthcheck"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )

    try:
        prometheus.start(timeout_s=60)
        written = 'btc_detect_rows_written_total{job="detect", table="coordinated_bursts", op="insert"}'
        _wait("detect scraped with the burst written", lambda: _value(prometheus, written) >= 1, 90, logs)
        assert _value(prometheus, 'up{job="detect"}') == 1

        # Every detect panel and the alert return data, from job="detect".
        for q in _detect_queries():
            expr = promql.substitute_grafana(q.expr, {"$__rate_interval": "15s"})
            expr = promql.as_bool(expr) if q.kind == "alert" else expr
            assert prometheus.query(expr), f"{q.where}: no data for {expr!r}\n{logs()}"
        jobs = {r["metric"]["job"] for r in prometheus.query("count by (job) ({__name__=~'btc_detect_.*'})")}
        assert jobs == {"detect"}
        assert _value(prometheus, "max(btc_detect_consecutive_failed_polls)") == 0
        # (With the test's for: 0s, an evaluation before the first scrape may have fired it: no series yet.)
        _wait(
            "BtcDetectStalled inactive while polls succeed",
            lambda: _alert_state(prometheus, "BtcDetectStalled") == "inactive",
            30,
            logs,
        )
        ok = healthcheck()
        assert ok.returncode == 0 and "detect healthy" in ok.stdout, ok.stdout + ok.stderr

        # A stage that fails at every poll: counted, healthcheck and alert turn red, the process stays up.
        stats_log = lake / tables.STATS_1M / "_delta_log"
        stats_log.mkdir(parents=True)
        (stats_log / "00000000000000000000.json").write_text("{not a delta log\n")
        failures = 'btc_detect_poll_failures_total{job="detect", stage="windows"}'
        _wait("windows failures counted", lambda: _value(prometheus, failures) >= 3, 60, logs)
        _wait("healthcheck failing", lambda: healthcheck().returncode == 1, 60, logs)
        bad = healthcheck()
        assert "no successful poll for" in bad.stderr + bad.stdout
        _wait(
            "BtcDetectStalled pending or firing",
            lambda: _alert_state(prometheus, "BtcDetectStalled") in ("pending", "firing"),
            60,
            logs,
        )
        assert detect.poll() is None, logs()
        text = log.read_text(errors="replace")
        assert text.count("Traceback") == 1, logs()  # the first failure's, not one per poll
        assert "windows stage failed" in text

        shutil.rmtree(lake / tables.STATS_1M)
        _wait("healthcheck passing again", lambda: healthcheck().returncode == 0, 60, logs)
        assert "windows stage recovered" in log.read_text(errors="replace")
    finally:
        if detect.poll() is None:
            os.killpg(detect.pid, signal.SIGTERM)
            try:
                detect.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(detect.pid, signal.SIGKILL)
                detect.wait()
        prometheus.stop()
    assert detect.returncode == 0, logs()
