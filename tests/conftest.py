"""Shared fixtures: one real Kafka broker per test session, on free ports, stopped afterwards."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from btc_anomaly.config import PROJECT_ROOT, Settings
from btc_anomaly.runtime.kafka_broker import KafkaBroker, free_port

FIXTURES = Path(__file__).parent / "fixtures"
SAMPLE = PROJECT_ROOT / "data" / "sample" / "transactions.jsonl.gz"


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    broker = KafkaBroker(
        data_dir=tmp_path_factory.mktemp("kafka"),
        jars_root=PROJECT_ROOT / ".jars",
        port=free_port(),
        controller_port=free_port(),
        heap="512m",
    )
    broker.start(timeout_s=120)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def topic_names() -> tuple[str, str]:
    """Fresh topic and DLQ names, so tests sharing the session broker never see each other's records."""
    suffix = uuid.uuid4().hex[:8]
    return f"btc.transactions.t{suffix}", f"btc.transactions.t{suffix}.dlq"


@pytest.fixture
def kafka_settings(kafka_broker: KafkaBroker, topic_names: tuple[str, str], tmp_path: Path) -> Settings:
    topic, dlq = topic_names
    return Settings(
        kafka_bootstrap=kafka_broker.bootstrap,
        topic=topic,
        dlq_topic=dlq,
        state_dir=tmp_path / "state",
        producer_metrics_port=0,
    )
