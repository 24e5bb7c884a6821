"""The local broker really is a Kafka broker: topics, acks=all idempotent produce, consume, restart."""

from __future__ import annotations

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from btc_anomaly.runtime.kafka_broker import KafkaBroker

pytestmark = pytest.mark.integration


def test_produce_and_consume_round_trip(kafka_broker: KafkaBroker, topic_names: tuple[str, str]) -> None:
    topic, _ = topic_names
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    admin.close()
    producer = KafkaProducer(
        bootstrap_servers=kafka_broker.bootstrap, acks="all", enable_idempotence=True, compression_type="lz4"
    )
    sent = {f"k{i}".encode(): f"v{i}".encode() for i in range(500)}
    for k, v in sent.items():
        producer.send(topic, key=k, value=v)
    producer.flush()
    producer.close()
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka_broker.bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
    )
    got = {m.key: m.value for m in consumer}
    consumer.close()
    assert got == sent


def test_broker_logs_through_log4j(kafka_broker: KafkaBroker) -> None:
    log = (kafka_broker.log_dir / "server.log").read_text()
    assert "Kafka Server started" in log or "started (kafka.server" in log


def test_records_are_kept_by_time_and_by_size(kafka_broker: KafkaBroker) -> None:
    """The broker's own answer, not its properties file: both retention limits are in force."""
    from kafka.admin import ConfigResource, ConfigResourceType

    admin = KafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    try:
        answer = admin.describe_configs([ConfigResource(ConfigResourceType.BROKER, "1")], config_filter="all")
    finally:
        admin.close()
    [configs] = [by_name for by_type in answer.values() for by_name in by_type.values()]
    values = {key: (data.get("value") if isinstance(data, dict) else data) for key, data in configs.items()}
    assert values["log.retention.bytes"] == str(1024**3), values.get("log.retention.bytes")
    assert values["log.retention.hours"] == "168"
