"""Crash tolerance of `btc-anomaly stream` as its own process: kill -9 mid-replay, and a broker restart.

Both publish the sample looped with fresh hashes (the producer's replay), so every record is a new
transaction, and end with: every published hash stored once — 0 lost, 0 duplicates — and window
counts that add up to the same number (the aggregates are exactly once too).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from btc_anomaly.config import Settings
from btc_anomaly.processing import delta_reader
from btc_anomaly.runtime.kafka_broker import KafkaBroker, free_port
from helpers.stream import (
    create_topic,
    kill_stream,
    looped_records,
    producer,
    start_stream,
    stream_process_settings,
    wait_for,
)

pytestmark = pytest.mark.integration

FAULT_MESSAGES = int(os.environ.get("BTC_TEST_FAULT_MESSAGES", "100000"))
KILLS = 2  # one while it ingests, one while it scores: each restart costs a JVM start


def _publish(bootstrap: str, topic: str, records: list[tuple[str, bytes, int | None]]) -> None:
    p = producer(bootstrap)
    try:
        for h, value, partition in records:
            p.send(topic, key=h.encode(), value=value, partition=partition)
        p.flush()
    finally:
        p.close()


def _hashes(settings: Settings) -> list[str]:
    return delta_reader.read_arrow(settings.lake_table("transactions"), columns=["hash"])["hash"].to_pylist()


def _version(settings: Settings) -> int:
    return delta_reader.table_version(settings.lake_table("transactions")) or 0


def _window_total(settings: Settings, table: str) -> int:
    df = delta_reader.read_table(settings.lake_table(table), columns=["tx_count"])
    return int(df["tx_count"].sum())


def _assert_exactly_once(settings: Settings, expected: set[str]) -> None:
    stored = _hashes(settings)
    assert len(stored) == len(set(stored)), f"{len(stored) - len(set(stored))} duplicate hashes"
    missing = expected - set(stored)
    assert not missing, f"{len(missing)} published transactions lost"
    assert set(stored) == expected
    assert _window_total(settings, "tx_stats_1m") == len(expected)
    assert _window_total(settings, "tx_stats_5m") == len(expected)
    assert delta_reader.read_table(settings.lake_table("quarantine")).empty


@pytest.fixture
def fault_settings(kafka_settings: Settings, tmp_path: Path) -> Settings:
    return stream_process_settings(kafka_settings, tmp_path / "lake", stream_max_offsets_per_trigger=10_000)


def _scored_version(settings: Settings) -> int:
    return delta_reader.table_version(settings.lake_table("scored_transactions")) or -1


def _assert_scored_exactly_once(settings: Settings, expected: set[str]) -> None:
    scored = delta_reader.read_arrow(settings.lake_table("scored_transactions"), columns=["hash"])
    hashes = scored["hash"].to_pylist()
    assert len(hashes) == len(set(hashes)), f"{len(hashes) - len(set(hashes))} transactions scored twice"
    missing = expected - set(hashes)
    assert not missing, f"{len(missing)} stored transactions never scored"
    assert set(hashes) == expected


@pytest.mark.timeout(1800)  # three stream starts (two killed), scoring and the champion's training
def test_kill_9_mid_replay_loses_and_duplicates_nothing(
    fault_settings: Settings, champion_settings: Settings, tmp_path: Path
) -> None:
    """Killed while it ingests and again while it scores: ``transactions``, the windows and
    ``scored_transactions`` each end with every published hash once."""
    s = fault_settings.model_copy(
        update={
            "mlflow_tracking_uri": champion_settings.mlflow_tracking_uri,
            "model_name": champion_settings.model_name,
            "model_reload_s": 1.0,
            "stream_score_trigger_s": 0.0,
        }
    )
    records = list(looped_records(FAULT_MESSAGES))
    expected = {h for h, _, _ in records}
    assert len(expected) == FAULT_MESSAGES
    create_topic(s.kafka_bootstrap, s.topic)
    _publish(s.kafka_bootstrap, s.topic, records)
    log = tmp_path / "stream.log"
    rng = random.Random(7)
    for kill in range(KILLS):
        # The first kill after a commit of transactions, the others after one of scored_transactions:
        # each cuts off the queries at a random point of the batches that follow.
        version = _version if kill == 0 else _scored_version
        before = version(s)
        proc = start_stream(s, log)
        try:
            wait_for(
                lambda b=before, p=proc, v=version: v(s) > b or p.poll() is not None,
                400,
                what="a commit",
            )
            assert proc.poll() is None, f"stream exited with {proc.returncode}; see {log}"
            time.sleep(rng.uniform(0.0, 3.0))
        finally:
            kill_stream(proc)
        stored = len(_hashes(s))
        assert stored < FAULT_MESSAGES, f"kill {kill + 1} came after the replay was done; publish more"
    assert _scored_version(s) >= 0, "no kill came while the stream was scoring"
    proc = start_stream(s, log, "--available-now")
    assert proc.wait(timeout=900) == 0, f"final drain failed; see {log}"
    _assert_exactly_once(s, expected)
    _assert_scored_exactly_once(s, expected)


def _metric(port: int, name: str) -> float | None:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in body.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_broker_restart_under_running_stream(own_broker: KafkaBroker, tmp_path: Path) -> None:
    metrics_port = free_port()
    s = Settings(
        state_dir=tmp_path / "state",
        lake_root=tmp_path / "lake",
        kafka_bootstrap=own_broker.bootstrap,
        topic="btc.transactions.restart",
        spark_master="local[2]",
        spark_driver_memory="1g",
        stream_max_offsets_per_trigger=5_000,
        stream_trigger_s=0.5,
        stream_stats_trigger_s=2.0,
        stream_metrics_port=metrics_port,
    )
    records = list(looped_records(FAULT_MESSAGES // 2))
    first, second = records[: len(records) * 3 // 5], records[len(records) * 3 // 5 :]
    expected = {h for h, _, _ in records}
    create_topic(s.kafka_bootstrap, s.topic)
    _publish(s.kafka_bootstrap, s.topic, first)
    log = tmp_path / "stream.log"
    proc = start_stream(s, log)
    try:
        wait_for(lambda: _version(s) > 1 or proc.poll() is not None, 240, what="a first commit")
        assert proc.poll() is None, f"stream exited with {proc.returncode}; see {log}"
        own_broker.stop()
        time.sleep(5)  # long enough for the stream's consumers and offset fetches to fail
        own_broker.start(timeout_s=120)
        _publish(s.kafka_bootstrap, s.topic, second)
        wait_for(
            lambda: len(_hashes(s)) >= len(expected) or proc.poll() is not None,
            300,
            interval_s=2,
            what="all records in the lake",
        )
        assert proc.poll() is None, f"stream exited with {proc.returncode}; see {log}"
        wait_for(
            lambda: min(_window_total(s, t) for t in ("tx_stats_1m", "tx_stats_5m")) >= len(expected),
            120,
            what="window aggregates",
        )
        assert (_metric(metrics_port, 'btc_stream_input_rows_total{query="transactions"}') or 0) >= len(
            expected
        )
        assert _metric(metrics_port, "btc_stream_kafka_offsets_behind_latest") is not None
        assert _metric(metrics_port, "btc_stream_batch_duration_seconds_count") is not None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            kill_stream(proc)
    _assert_exactly_once(s, expected)
