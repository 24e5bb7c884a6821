"""`btc-anomaly detect` reports on itself: a failing stage does not stop the others, is counted and logged
once with its traceback, and the metrics endpoint, the healthcheck and `--once` say whether polls succeed.

Real deltalake lakes in a temporary folder and a real HTTP metrics endpoint; a stage fails for real (a
table whose Delta log is corrupt), nothing is mocked.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pandas as pd
import pytest
from prometheus_client import REGISTRY
from typer.testing import CliRunner, Result

from btc_anomaly.cli import app
from btc_anomaly.config import Settings, get_settings
from btc_anomaly.detectors.service import DetectService
from btc_anomaly.monitoring import metrics as m
from btc_anomaly.monitoring.detect_health import healthcheck
from btc_anomaly.monitoring.exposition import serve_metrics
from btc_anomaly.processing import tables
from btc_anomaly.runtime.kafka_broker import free_port
from helpers.detectors import (
    RecordingNotifier,
    burst_members,
    restamp,
    run_detect_once,
    settings,
    write_transactions,
)

T0 = pd.Timestamp("2026-01-01T00:00:00Z")


def _value(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _corrupt_stats_table(lake: Path) -> None:
    """A tx_stats_1m whose Delta log cannot be parsed: the windows stage raises at every poll."""
    log = lake / tables.STATS_1M / "_delta_log"
    log.mkdir(parents=True)
    (log / "00000000000000000000.json").write_text("{not a delta log\n")


def _lake_with_a_burst(lake: Path) -> None:
    write_transactions(lake, restamp(burst_members()[:4], T0, 3.0))


def test_a_failing_stage_is_counted_logged_once_and_the_others_still_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lake = tmp_path / "lake"
    _lake_with_a_burst(lake)
    _corrupt_stats_table(lake)
    notifier = RecordingNotifier()
    service = DetectService(settings(lake_root=lake), notifier)
    failures = _value("btc_detect_poll_failures_total", stage="windows")
    polls = _value("btc_detect_poll_duration_seconds_count")
    m.DETECT_LAST_SUCCESS.set(123.0)

    with caplog.at_level(logging.INFO, logger="btc_anomaly.detectors.service"):
        first = service.poll()
        second = service.poll()

    assert set(first.failures) == {"windows"} and not first.ok
    # The bursts stage ran anyway: the burst is in the lake and alerted.
    assert first.bursts_new == 1 and any("coordinated fan-out burst" in t for t in notifier.texts)
    assert set(second.failures) == {"windows"}
    assert _value("btc_detect_poll_failures_total", stage="windows") == failures + 2
    assert _value("btc_detect_poll_duration_seconds_count") == polls + 2
    assert _value("btc_detect_consecutive_failed_polls") == 2
    assert _value("btc_detect_last_success_timestamp_seconds") == 123.0  # no clean poll yet
    # One traceback for the run of identical failures, not one per poll.
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert "windows stage failed" in errors[0].getMessage()

    # The table is repaired (removed: the stream has not written it yet): the next poll is clean.
    for f in (lake / tables.STATS_1M / "_delta_log").iterdir():
        f.unlink()
    (lake / tables.STATS_1M / "_delta_log").rmdir()
    (lake / tables.STATS_1M).rmdir()
    caplog.clear()
    clean_from = time.time()
    with caplog.at_level(logging.INFO, logger="btc_anomaly.detectors.service"):
        third = service.poll()
    assert third.ok
    assert _value("btc_detect_consecutive_failed_polls") == 0
    # Stamped by this poll: no earlier than the clock just before it (and no later than just after).
    assert clean_from <= _value("btc_detect_last_success_timestamp_seconds") <= time.time()
    assert any("windows stage recovered after 2 failed polls" in r.getMessage() for r in caplog.records)


def test_rows_read_written_and_alerts_are_counted(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    _lake_with_a_burst(lake)
    read = _value("btc_detect_rows_read_total", table="transactions")
    written = _value("btc_detect_rows_written_total", table="coordinated_bursts", op="insert")
    alerts = _value("btc_detect_alerts_total", kind="burst")

    r = DetectService(settings(lake_root=lake), RecordingNotifier()).poll()

    assert r.ok and r.bursts_new == 1
    assert _value("btc_detect_rows_read_total", table="transactions") == read + 4
    assert _value("btc_detect_rows_written_total", table="coordinated_bursts", op="insert") == written + 1
    assert _value("btc_detect_alerts_total", kind="burst") == alerts + 1


def test_healthcheck_reads_the_services_own_metrics() -> None:
    port = free_port()
    s = Settings.model_construct(detect_metrics_port=port, detect_healthcheck_max_age_s=120.0)
    ok, why = healthcheck(s, timeout_s=2)
    assert not ok and "does not answer" in why
    server = serve_metrics(port, "btc_detect_", addr="127.0.0.1")
    try:
        m.DETECT_LAST_SUCCESS.set(time.time() - 5)
        m.DETECT_CONSECUTIVE_FAILURES.set(0)
        ok, why = healthcheck(s)
        assert ok, why
        # Polls keep failing: the last success ages past the limit.
        m.DETECT_LAST_SUCCESS.set(time.time() - 300)
        m.DETECT_CONSECUTIVE_FAILURES.set(30)
        ok, why = healthcheck(s)
        assert not ok and "no successful poll for 300 s" in why and "30 failed polls in a row" in why

        assert _cli_healthcheck(port).exit_code == 1
        m.DETECT_LAST_SUCCESS.set(time.time())
        result = _cli_healthcheck(port)
        assert result.exit_code == 0, result.output
        assert "detect healthy" in result.output
    finally:
        server.shutdown()
        server.server_close()
        m.DETECT_CONSECUTIVE_FAILURES.set(0)
    ok, why = healthcheck(Settings.model_construct(detect_metrics_port=0))
    assert not ok and "is 0" in why


def _cli_healthcheck(port: int) -> Result:
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(
            app, ["detect", "--healthcheck"], env={"BTC_ANOMALY_DETECT_METRICS_PORT": str(port)}
        )
    finally:
        get_settings.cache_clear()


def test_detect_once_exits_1_when_a_stage_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lake = tmp_path / "lake"
    _lake_with_a_burst(lake)
    _corrupt_stats_table(lake)
    result = run_detect_once(monkeypatch, lake)
    assert result.exit_code == 1, result.output
    out = json.loads(result.output.strip().splitlines()[-1])
    assert out["failed_stages"] == ["windows"] and out["bursts_new"] == 1
