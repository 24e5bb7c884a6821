"""Faults of the producer process itself: a real `btc-anomaly produce` killed with SIGKILL mid-batch.

Nothing the replayed span holds may be missing from the topic after a restart; records the killed
process had delivered are delivered again (at-least-once), which the stream's dedup absorbs: every
hash is stored once however often it is in the topic
(tests/integration/test_stream.py::test_stream_sample_duplicates_quarantine_confirmation_and_windows
publishes 500 duplicates and asserts one row per hash).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition

from btc_anomaly.config import PROJECT_ROOT, Settings
from btc_anomaly.ingestion.replay_source import ReplaySource
from helpers.stream import SAMPLE, stream_env

pytestmark = pytest.mark.integration

REPLAY_S = 20.0  # the first run replays the sample paced over this long, so a kill lands mid-way


def _produce(settings: Settings, log: Path, speed: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "btc_anomaly.cli", "produce", "--source", "replay", "--speed", str(speed)],
        env=stream_env(settings),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the kill takes everything it started
        cwd=PROJECT_ROOT,
    )


def _topic_size(consumer: KafkaConsumer, topic: str) -> int:
    partitions = consumer.partitions_for_topic(topic) or set()
    ends = consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
    return sum(ends.values())


def _keys(consumer: KafkaConsumer, topic: str, expected: int) -> Counter[str]:
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or set()]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    keys: Counter[str] = Counter()
    while sum(keys.values()) < expected:
        batch = consumer.poll(timeout_ms=2_000)
        assert batch, f"topic ends after {sum(keys.values())} of {expected} records"
        for records in batch.values():
            keys.update(r.key.decode() for r in records)
    return keys


def test_kill_9_mid_batch_then_restart_loses_nothing(kafka_settings: Settings, tmp_path: Path) -> None:
    source = ReplaySource([SAMPLE])
    hashes = {t.hash for t in source.templates}
    log = tmp_path / "produce.log"
    consumer = KafkaConsumer(bootstrap_servers=kafka_settings.kafka_bootstrap, enable_auto_commit=False)
    try:
        first = _produce(kafka_settings, log, speed=source.loop_length / REPLAY_S)
        deadline = time.monotonic() + 60
        while first.poll() is None and _topic_size(consumer, kafka_settings.topic) < len(hashes) // 5:
            assert time.monotonic() < deadline, f"nothing published: {log.read_text()[-2000:]}"
            time.sleep(0.1)
        assert first.poll() is None, "the replay ended before the kill: make it slower"
        os.killpg(first.pid, signal.SIGKILL)
        assert first.wait(30) == -signal.SIGKILL
        before = _topic_size(consumer, kafka_settings.topic)
        assert 0 < before < len(hashes), "killed outside the batch"

        second = _produce(kafka_settings, log, speed=0)
        assert second.wait(60) == 0, log.read_text()[-2000:]
        total = _topic_size(consumer, kafka_settings.topic)
        keys = _keys(consumer, kafka_settings.topic, total)
    finally:
        consumer.close()

    missing = hashes - set(keys)
    assert not missing, f"{len(missing)} replayed transactions never reached the topic"
    assert set(keys) == hashes
    assert total == before + len(hashes)  # the restart re-sent everything once: duplicates, no loss
    assert sum(1 for n in keys.values() if n > 1) >= before
