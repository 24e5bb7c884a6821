"""Kafka loses records the stream had not read: retention past its offsets, the topic deleted and recreated.

Documented behaviour (Settings.stream_fail_on_data_loss, default true): the stream stops with an ERROR that
says what happened and how to go on (`btc-anomaly stream` exits 2; a restart from the checkpoint would fail
the same way, so it does not loop). After retention, restarted once with the setting off it skips the gap;
after the topic was recreated, the transactions query's checkpoint is removed and the new topic is read
from the start (the lake's dedup absorbs what it has already). Each
phase ends with the lake holding every record Kafka still had, once.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from kafka import TopicPartition
from kafka.admin import KafkaAdminClient

from btc_anomaly.config import Settings
from btc_anomaly.processing import delta_reader
from btc_anomaly.processing.stream import StreamFailed, StreamRunner
from helpers.stream import create_topic, looped_records, publish, run_forever_in_thread, wait_for

pytestmark = pytest.mark.integration

PARTITIONS = 3


def _records(n: int, skip: int) -> list[tuple[bytes, bytes]]:
    return [(h.encode(), v) for h, v, _ in list(looped_records(skip + n))[skip:]]


def _stored(settings: Settings) -> list[str]:
    return delta_reader.read_arrow(settings.lake_table("transactions"), columns=["hash"])["hash"].to_pylist()


def _fails_and_stops(runner: StreamRunner) -> StreamFailed:
    """run_forever until the data loss stops it: it must raise, not restart the query in a loop."""
    thread, outcome = run_forever_in_thread(runner)
    try:
        wait_for(lambda: not thread.is_alive(), 180, what="the stream to stop on data loss")
    finally:
        runner.stop_event.set()
        thread.join(120)
    assert len(outcome) == 1 and isinstance(outcome[0], StreamFailed), outcome
    return outcome[0]


def test_records_lost_before_the_stream_read_them(
    spark: Any, kafka_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = kafka_settings.model_copy(
        update={
            "lake_root": tmp_path / "lake",
            "stream_trigger_s": 0.5,
            "stream_metrics_port": 0,
            "stream_scoring": False,
        }
    )
    skip_gap = s.model_copy(update={"stream_fail_on_data_loss": False})
    first, lost, after, recreated = (_records(300, 300 * i) for i in range(4))
    create_topic(s.kafka_bootstrap, s.topic, PARTITIONS)
    publish(s.kafka_bootstrap, s.topic, first)
    StreamRunner(s, spark).run_available_now(stats=False)
    assert sorted(_stored(s)) == sorted(k.decode() for k, _ in first)

    # Retention runs past offsets the stream has not read: what it had not read of `lost` is gone.
    publish(s.kafka_bootstrap, s.topic, lost)
    admin = KafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    try:
        ends = {
            TopicPartition(s.topic, p): o
            for p, o in _end_offsets(s.kafka_bootstrap, s.topic, PARTITIONS).items()
        }
        admin.delete_records(ends)
    finally:
        admin.close()
    publish(s.kafka_bootstrap, s.topic, after)
    caplog.set_level(logging.ERROR, logger="btc_anomaly.processing.stream")
    failed = _fails_and_stops(StreamRunner(s, spark))
    assert "stream_fail_on_data_loss" in str(failed) and "BTC_ANOMALY_STREAM_FAIL_ON_DATA_LOSS=false" in str(
        failed
    )
    assert any("no longer holds records" in r.getMessage() for r in caplog.records), caplog.text
    assert sorted(_stored(s)) == sorted(k.decode() for k, _ in first), "nothing written after the gap"

    # The operator's way out: skip the gap once; what Kafka still holds arrives, once.
    StreamRunner(skip_gap, spark).run_available_now(stats=False)
    assert sorted(_stored(s)) == sorted(k.decode() for k, _ in first + after)

    # The topic deleted and recreated (offsets start again at 0): the same stop, the same way out.
    admin = KafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    try:
        admin.delete_topics([s.topic])
    finally:
        admin.close()
    wait_for(lambda: s.topic not in _topics(s.kafka_bootstrap), 60, what="topic deletion")
    create_topic(s.kafka_bootstrap, s.topic, PARTITIONS)
    publish(s.kafka_bootstrap, s.topic, recreated)
    caplog.clear()
    failed = _fails_and_stops(StreamRunner(s, spark))
    assert any("no longer holds records" in r.getMessage() for r in caplog.records), caplog.text
    checkpoint = s.checkpoint_path / "transactions"
    assert str(checkpoint) in str(failed)
    shutil.rmtree(checkpoint)  # the way out the error gives for a recreated topic
    StreamRunner(s, spark).run_available_now(stats=False)
    stored = _stored(s)
    assert len(stored) == len(set(stored)), "a record was stored twice"
    assert sorted(stored) == sorted(k.decode() for k, _ in first + after + recreated)


def _end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        return {tp.partition: o for tp, o in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()


def _topics(bootstrap: str) -> set[str]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        return set(admin.list_topics())
    finally:
        admin.close()
