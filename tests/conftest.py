"""Shared fixtures: one real Kafka broker per test session, on free ports, stopped afterwards."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from btc_anomaly.config import PROJECT_ROOT, Settings
from btc_anomaly.runtime.kafka_broker import KafkaBroker, free_port
from btc_anomaly.runtime.mlflow_server import MlflowServer

FIXTURES = Path(__file__).parent / "fixtures"
SAMPLE = PROJECT_ROOT / "data" / "sample" / "transactions.jsonl.gz"


def _running_broker(data_dir: Path, heap: str) -> Iterator[KafkaBroker]:
    broker = KafkaBroker(
        data_dir=data_dir,
        jars_root=PROJECT_ROOT / ".jars",
        port=free_port(),
        controller_port=free_port(),
        heap=heap,
    )
    broker.start(timeout_s=120)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    yield from _running_broker(tmp_path_factory.mktemp("kafka"), heap="512m")


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[KafkaBroker]:
    """A broker of one test only, for tests that stop and restart it under a running client."""
    yield from _running_broker(tmp_path / "kafka", heap="384m")


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


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One real MLflow tracking + registry server (sqlite, local artifacts) per session, on a free port."""
    server = MlflowServer(data_dir=tmp_path_factory.mktemp("mlflow"), port=free_port())
    server.start(timeout_s=180)
    try:
        yield server
    finally:
        server.stop()


# --- a trained champion and the prediction API (api/) -----------------------------------------------------


@pytest.fixture(scope="session")
def sample_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Delta lake whose ``transactions`` table holds the bundled sample (5,274 real transactions)."""
    import gzip

    import pyarrow as pa
    from deltalake import write_deltalake

    from btc_anomaly.schema import Transaction, arrow_schema

    root = tmp_path_factory.mktemp("sample-lake")
    rows = [
        Transaction.model_validate_json(line).model_dump()
        for line in gzip.decompress(SAMPLE.read_bytes()).splitlines()
    ]
    write_deltalake(str(root / "transactions"), pa.Table.from_pylist(rows, schema=arrow_schema()))
    return root


@pytest.fixture(scope="session")
def champion_settings(
    mlflow_server: MlflowServer, sample_lake: Path, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    """Settings of a model trained on the sample and promoted to ``champion`` by the gate (once per session).

    The model has a name of its own; tests that move its aliases must use their own model instead.
    """
    from btc_anomaly.model.train import train

    settings = Settings(
        state_dir=tmp_path_factory.mktemp("champion-state"),
        lake_root=sample_lake,
        mlflow_tracking_uri=mlflow_server.url,
        model_name=f"btc-anomaly-iforest-{uuid.uuid4().hex[:8]}",
    )
    result = train(settings, decided_by="pytest@session", progress=False)
    assert result.decision is not None and result.decision.promoted, result.decision
    return settings


@pytest.fixture(scope="session")
def api_blockchain() -> Iterator[object]:
    """The Blockchain.com stand-in serving /rawtx for the parents of the historical segwit/taproot txs."""
    from fakes.blockchain_com import FakeBlockchainCom
    from helpers.api_server import historical_cases, rawtx_object

    with FakeBlockchainCom() as fake:
        for case in historical_cases():
            for prev in case["prev_transactions"]:
                obj = rawtx_object(prev["transaction"])
                fake.rawtx[obj["hash"]] = obj
        yield fake


@pytest.fixture(scope="session")
def api_server(
    champion_settings: Settings, api_blockchain: object, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[object]:
    """`btc-anomaly api` (1 worker) serving the session champion; its lake has a scored_transactions table."""
    from helpers.api_server import ApiServer, api_env, write_scored_table

    write_scored_table(champion_settings)
    server = ApiServer(
        port=free_port(),
        workdir=tmp_path_factory.mktemp("api"),
        env=api_env(
            mlflow_tracking_uri=champion_settings.mlflow_tracking_uri,
            model_name=champion_settings.model_name,
            lake_root=champion_settings.lake_dir,
            state_dir=champion_settings.state_dir,
            blockchain_base_url=api_blockchain.base_url,  # type: ignore[attr-defined]
            api_key="test-admin-key",
            api_max_body_bytes=8 * 1024 * 1024,
            api_prevout_timeout_s=2.0,
            # The sample spans 2011-2025: the lake reads cover it whole (tests/integration/test_lake_bounds.py
            # tests the bounds).
            api_lake_window_h=131_400,
            api_lake_max_window_h=131_400,
        ),
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- Spark (processing/) ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def spark(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The one SparkSession of the test session: local[2], Kafka source + Delta from .jars, no network."""
    from btc_anomaly.processing.spark_session import build_session

    settings = Settings(
        state_dir=tmp_path_factory.mktemp("spark"),
        spark_master="local[2]",
        spark_shuffle_partitions=4,
        spark_driver_memory="2g",
    )
    session = build_session(settings, app_name="btc-anomaly-tests")
    try:
        yield session
    finally:
        session.stop()
