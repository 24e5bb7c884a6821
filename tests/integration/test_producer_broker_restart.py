"""A broker restart in the middle of a paced replay loses nothing (dedicated broker, not the session one)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
from kafka import KafkaConsumer

from btc_anomaly.config import PROJECT_ROOT, Settings
from btc_anomaly.ingestion.producer import ProducerStats, TxProducer, run_producer
from btc_anomaly.ingestion.replay_source import read_lines
from btc_anomaly.runtime.kafka_broker import KafkaBroker

pytestmark = pytest.mark.integration

SAMPLE = PROJECT_ROOT / "data" / "sample" / "transactions.jsonl.gz"


@pytest.mark.parametrize(
    "delivery_timeout_ms",
    [
        # Shorter than the outage: batches expire inside kafka-python; the client is replaced and re-sends.
        4_000,
        # The default outlasts the outage: kafka-python's own idempotent retries deliver everything.
        120_000,
    ],
)
def test_broker_stop_and_start_mid_run_loses_nothing(
    own_broker: KafkaBroker, tmp_path: Path, delivery_timeout_ms: int
) -> None:
    expected = list(read_lines([SAMPLE]))
    settings = Settings(
        kafka_bootstrap=own_broker.bootstrap,
        topic="btc.transactions",
        dlq_topic="btc.transactions.dlq",
        state_dir=tmp_path / "state",
        producer_metrics_port=0,
        producer_delivery_timeout_ms=delivery_timeout_ms,
        producer_max_block_ms=2_000,
    )
    producer = TxProducer(settings)
    stop = threading.Event()
    result: dict[str, ProducerStats | BaseException] = {}

    def run() -> None:
        try:
            # 41 blocks x 600 s / 1500 ≈ 16 s of paced replay, so the outage falls in the middle.
            result["stats"] = run_producer(settings, "replay", speed=1500, stop=stop, producer=producer)
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while producer.stats.published < 1000:
        assert time.monotonic() < deadline, "nothing published before the outage"
        time.sleep(0.05)
    own_broker.stop()
    sent_before_restart = producer.stats.sent
    time.sleep(6)  # longer than the delivery timeout
    own_broker.start(timeout_s=120)
    thread.join(120)
    assert not thread.is_alive()
    assert "error" not in result, result.get("error")
    producer.close()
    stats = producer.stats

    assert sent_before_restart < len(expected)  # the outage really was mid-run
    assert stats.sent == len(expected)
    assert stats.published >= len(expected)
    if delivery_timeout_ms < 6_000:
        assert stats.client_resets >= 1  # batches expired during the outage: the re-send path was used
    else:
        assert stats.client_resets == 0
    consumer = KafkaConsumer(
        settings.topic,
        bootstrap_servers=own_broker.bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=3000,
    )
    keys = Counter(r.key.decode() for r in consumer)
    consumer.close()
    assert set(keys) == {orjson.loads(line)["hash"] for line in expected}  # nothing lost
    duplicates = sum(keys.values()) - len(keys)
    print(f"requeued {stats.requeued}, duplicates after the restart: {duplicates}")
