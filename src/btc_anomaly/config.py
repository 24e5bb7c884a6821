"""Every knob of btc-anomaly, in one pydantic-settings object.

Each field reads the environment variable ``BTC_ANOMALY_<FIELD NAME>`` (upper case) and may also come
from a ``.env`` file in the working directory. ``btc-anomaly config`` prints the values in force;
``btc-anomaly config --markdown`` prints the reference table used in the README.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "BTC_ANOMALY_"


def _project_root() -> Path:
    """The checkout root when running from source (where jvm/pom.xml lives), else the working directory."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "jvm" / "pom.xml").is_file():
            return parent
    return Path.cwd()


PROJECT_ROOT = _project_root()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # --- local state -------------------------------------------------------------------------------
    state_dir: Path = Field(
        PROJECT_ROOT / "var", description="Root folder for local runtime state (broker logs, lake, MLflow)."
    )
    jars_dir: Path = Field(
        PROJECT_ROOT / ".jars", description="Where `make jars` put the Maven-resolved JVM jars."
    )

    # --- Kafka ---------------------------------------------------------------------------------------
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers for clients.")
    kafka_host: str = Field("127.0.0.1", description="Address the local broker (`btc-anomaly kafka`) binds.")
    kafka_port: int = Field(9092, description="Client listener port of the local broker.")
    kafka_controller_port: int = Field(9093, description="KRaft controller port of the local broker.")
    kafka_heap: str = Field("512m", description="JVM heap (-Xmx) of the local broker.")
    topic: str = Field("btc.transactions", description="Topic of canonical transactions (key = tx hash).")
    dlq_topic: str = Field("btc.transactions.dlq", description="Dead-letter topic for records that cannot be parsed.")
    topic_partitions: int = Field(3, description="Partitions when the producer creates the topics.")

    # --- Blockchain.com sources ------------------------------------------------------------------------
    blockchain_base_url: str = Field(
        "https://blockchain.info", description="Base URL of the Blockchain.com REST API."
    )
    blockchain_ws_url: str = Field(
        "wss://ws.blockchain.info/inv", description="Blockchain.com WebSocket push feed."
    )
    poll_interval_s: float = Field(10.0, description="Seconds between REST polls of unconfirmed transactions.")
    http_timeout_s: float = Field(15.0, description="Timeout of one HTTP request to the source API.")
    retry_max_attempts: int = Field(6, description="Attempts per HTTP request before it counts as failed.")
    retry_max_wait_s: float = Field(60.0, description="Upper bound of the exponential backoff between retries.")
    ws_ping_interval_s: float = Field(30.0, description="Seconds between `ping` ops on the WebSocket feed.")
    ws_fallback_after_s: float = Field(
        120.0, description="Seconds the WebSocket may stay down before REST polling takes over."
    )
    fetch_blocks: bool = Field(
        True, description="Also fetch each new block (/rawblock) so confirmations update block_height."
    )

    # --- producer --------------------------------------------------------------------------------------
    dedup_capacity: int = Field(
        500_000, description="Hashes remembered to skip re-publishing (bounded LRU; ~100 B per hash)."
    )
    producer_compression: str = Field("lz4", description="Kafka compression: lz4, gzip, snappy, zstd or none.")
    producer_linger_ms: int = Field(20, description="Kafka producer linger.ms (batching delay).")
    producer_batch_size: int = Field(262_144, description="Kafka producer batch.size in bytes.")
    producer_metrics_port: int = Field(9201, description="Prometheus port of the producer (0 = off).")
    replay_path: Path = Field(
        PROJECT_ROOT / "data" / "sample" / "transactions.jsonl.gz",
        description="Canonical transactions replayed by `--source replay`.",
    )
    replay_speed: float = Field(
        0.0, description="Replay speed: 1 = real time by tx timestamps, N = N times faster, 0 = as fast as possible."
    )
    replay_loop: bool = Field(False, description="Loop the replay forever (fresh hashes each loop).")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def settings_reference_markdown() -> str:
    """The configuration reference table (README) generated from the Settings fields."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        if isinstance(default, Path):
            try:
                default = default.relative_to(PROJECT_ROOT)
            except ValueError:
                pass
        rows.append(f"| `{ENV_PREFIX}{name.upper()}` | `{default}` | {field.description or ''} |")
    return "\n".join(rows)
