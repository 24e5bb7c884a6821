"""Every knob of btc-anomaly, in one pydantic-settings object.

Each field reads the environment variable ``BTC_ANOMALY_<FIELD NAME>`` (upper case) and may also come
from a ``.env`` file in the working directory. ``btc-anomaly config`` prints the values in force;
``btc-anomaly config --markdown`` prints the reference table used in the README.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
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
    kafka_retention_hours: int = Field(168, description="log.retention.hours of the local broker's topics.")
    kafka_retention_bytes: int = Field(
        1_073_741_824,
        description="log.retention.bytes of the local broker (per partition): records go by time or by size, "
        "whichever comes first, so a flood or a stalled consumer cannot fill the disk.",
    )
    topic: str = Field("btc.transactions", description="Topic of canonical transactions (key = tx hash).")
    dlq_topic: str = Field(
        "btc.transactions.dlq", description="Dead-letter topic for records that cannot be parsed."
    )
    topic_partitions: int = Field(3, description="Partitions when the producer creates the topics.")

    # --- Blockchain.com sources ------------------------------------------------------------------------
    blockchain_base_url: str = Field(
        "https://blockchain.info", description="Base URL of the Blockchain.com REST API."
    )
    blockchain_ws_url: str = Field(
        "wss://ws.blockchain.info/inv", description="Blockchain.com WebSocket push feed."
    )
    poll_interval_s: float = Field(
        10.0, description="Seconds between REST polls of unconfirmed transactions."
    )
    http_timeout_s: float = Field(15.0, description="Timeout of one HTTP request to the source API.")
    retry_max_attempts: int = Field(6, description="Attempts per HTTP request before it counts as failed.")
    retry_max_wait_s: float = Field(
        60.0, description="Upper bound of the exponential backoff between retries."
    )
    retry_base_s: float = Field(
        0.5, description="First backoff between HTTP retries; doubles per attempt up to retry_max_wait_s."
    )
    ws_ping_interval_s: float = Field(30.0, description="Seconds between `ping` ops on the WebSocket feed.")
    ws_fallback_after_s: float = Field(
        120.0, description="Seconds the WebSocket may stay down before REST polling takes over."
    )
    ws_reconnect_base_s: float = Field(
        1.0, description="First WebSocket reconnect delay; doubles per failed attempt, with jitter."
    )
    ws_reconnect_max_s: float = Field(60.0, description="Upper bound of the WebSocket reconnect delay.")
    fetch_blocks: bool = Field(
        True, description="Also fetch each new block (/rawblock) so confirmations update block_height."
    )

    # --- producer --------------------------------------------------------------------------------------
    dedup_capacity: int = Field(
        500_000, description="Hashes remembered to skip re-publishing (bounded LRU; ~100 B per hash)."
    )
    producer_compression: str = Field(
        "lz4", description="Kafka compression: lz4, gzip, snappy, zstd or none."
    )
    producer_linger_ms: int = Field(20, description="Kafka producer linger.ms (batching delay).")
    producer_batch_size: int = Field(262_144, description="Kafka producer batch.size in bytes.")
    producer_metrics_port: int = Field(9201, description="Prometheus port of the producer (0 = off).")
    producer_source: Literal["rest", "ws", "replay", "blocks"] = Field(
        "ws", description="Source of `btc-anomaly produce` when --source is not given."
    )
    producer_delivery_timeout_ms: int = Field(
        120_000,
        description="Kafka delivery.timeout.ms; when a send expires the client is replaced and everything "
        "unacknowledged is sent again.",
    )
    producer_max_block_ms: int = Field(
        10_000, description="How long a send may block on a missing broker before the record is queued again."
    )
    producer_source_queue_max: int = Field(
        10_000,
        description="Most items waiting between a live source (WebSocket, REST) and the Kafka sender. When it is "
        'full, REST polls wait; WebSocket pushes are dropped and counted (errors_total{kind="source_dropped"}).',
    )
    first_seen_max_skew_s: float = Field(
        7_200.0,
        description="How far past now a record's first_seen may be (clock skew; Bitcoin accepts block times "
        "2 h ahead). Later, or before 2009-01-03, the producer dead-letters and the stream quarantines it.",
    )
    replay_path: Path = Field(
        PROJECT_ROOT / "data" / "sample" / "transactions.jsonl.gz",
        description="Canonical transactions replayed by `--source replay`.",
    )
    replay_speed: float = Field(
        0.0,
        description="Replay speed: 1 = real time (each block's txs spread over 600 s), N = N times faster, "
        "0 = as fast as possible.",
    )
    replay_loop: bool = Field(False, description="Loop the replay forever (fresh hashes each loop).")

    # --- model / MLflow ---------------------------------------------------------------------------------
    mlflow_dir: Path | None = Field(
        None, description="State of `btc-anomaly mlflow` (sqlite db + artifacts); empty = <state_dir>/mlflow."
    )
    mlflow_host: str = Field("127.0.0.1", description="Address `btc-anomaly mlflow` binds.")
    mlflow_port: int = Field(5000, description="Port of `btc-anomaly mlflow`.")
    mlflow_tracking_uri: str = Field(
        "http://127.0.0.1:5000",
        description="MLflow tracking/registry URI used by train, promote and scoring.",
    )
    mlflow_experiment: str = Field("btc-anomaly", description="MLflow experiment of the training runs.")
    model_name: str = Field(
        "btc-anomaly-iforest", description="Registered model (full + structural forests)."
    )
    model_train_table: Path | None = Field(
        None, description="Delta table to train from; empty = <lake>/transactions."
    )
    model_train_window: str = Field(
        "",
        description="Training window, e.g. 24h or 7d, ending at --until or else at the newest first_seen "
        "in the table; empty = the whole table.",
    )
    model_train_max_rows: int = Field(
        1_000_000, description="Cap on training rows; above it the most recent rows are kept."
    )
    iforest_n_estimators: int = Field(100, description="IsolationForest trees.")
    iforest_max_samples: int = Field(256, description="IsolationForest rows per tree.")
    iforest_contamination: float = Field(
        0.01, description="Expected anomaly share; sets the threshold (training-score quantile)."
    )
    iforest_random_state: int = Field(42, description="IsolationForest seed.")
    scorer_backend: str = Field(
        "auto", description="Compiled forest evaluator: auto (numba if installed), numba or numpy."
    )
    explain_top_k: int = Field(3, description="Features named in each anomaly's reasons.")
    fee_market_window_s: float = Field(
        1800.0,
        gt=0,
        description="Fee market a transaction's fee rate is read against: the median fee rate of the "
        "`tx_stats_1m` windows of this many seconds up to the newest one (stream and API alike).",
    )
    fee_market_max_age_s: float = Field(
        21600.0,
        gt=0,
        description="Windows older than this (by wall clock) do not count as the current fee market; "
        "without any, scoring uses the model's training-window reference.",
    )
    fee_market_refresh_s: float = Field(
        60.0, gt=0, description="Seconds between re-reads of the fee market from `tx_stats_1m`."
    )
    model_reload_s: float = Field(
        60.0, description="Seconds between checks of the champion alias by long-running scorers."
    )
    gate_min_train_rows: int = Field(1000, description="Promotion gate: minimum training rows.")
    gate_rate_tolerance: float = Field(
        2.0, description="Promotion gate: training anomaly rate within [contamination/x, contamination*x]."
    )
    gate_reference_max_flag_rate: float = Field(
        0.05, description="Promotion gate: max share of the bundled reference transactions flagged."
    )
    gate_min_rank_corr: float = Field(
        0.6, description="Promotion gate: min Spearman correlation with the champion on the reference set."
    )
    gate_canary_min_flagged: float = Field(
        0.8, description="Promotion gate: share of the bundled canary transactions that must be flagged."
    )
    gate_benchmark_tolerance: float = Field(
        0.02,
        description="Promotion gate: how far the challenger's benchmark canonical ROC-AUC, precision at 50 "
        "and 8-field ROC-AUC may fall below the champion's (absolute).",
    )
    gate_benchmark_min_roc_auc: float = Field(
        0.90, description="Promotion gate: minimum benchmark ROC-AUC (canonical path) of any challenger."
    )

    # --- stream / lake ----------------------------------------------------------------------------------
    lake_root: Path | None = Field(
        None, description="Root folder of the Delta Lake tables; empty = <state_dir>/lake."
    )
    checkpoint_dir: Path | None = Field(
        None,
        description="Structured Streaming checkpoints of `btc-anomaly stream`; empty = <lake>/_checkpoints.",
    )
    spark_master: str = Field(
        "local[*]", description="Spark master URL of the stream (local[N] or a cluster)."
    )
    spark_driver_memory: str = Field("2g", description="Spark driver heap (local mode: all of Spark).")
    spark_shuffle_partitions: int = Field(
        4,
        description="spark.sql.shuffle.partitions (and Delta snapshot partitions); keep near the core count.",
    )
    spark_ui: bool = Field(False, description="Serve the Spark web UI of the stream.")
    spark_log_level: str = Field("WARN", description="Log level of Spark's JVM logger.")
    stream_trigger_s: float = Field(
        1.0, description="Micro-batch interval of the transactions query in seconds (0 = back to back)."
    )
    stream_stats_trigger_s: float = Field(
        60.0,
        description="Micro-batch interval of the window-aggregate query (tx_stats_1m / tx_stats_5m); it "
        "competes with the transactions query for cores, so not more often than the windows need.",
    )
    stream_scoring: bool = Field(
        True,
        description="Score new transactions with the champion into scored_transactions (starts once a "
        "champion exists; the alias is re-checked every model_reload_s seconds).",
    )
    stream_notify: bool = Field(
        False,
        description="Also send each scored batch's forest anomalies to the webhook (rate limited). Off: "
        "`btc-anomaly detect` sends one alert per severe transaction with the rules and lists that fired.",
    )
    stream_score_trigger_s: float = Field(
        1.0, description="Micro-batch interval of the scoring query in seconds (0 = back to back)."
    )
    stream_starting_offsets: str = Field(
        "earliest",
        description="Kafka offsets of a stream without checkpoint: earliest, latest or Spark's JSON offsets.",
    )
    stream_max_offsets_per_trigger: int = Field(
        200_000, description="Upper bound of Kafka records per micro-batch (0 = no bound)."
    )
    stream_max_records_per_task: int = Field(
        25_000,
        description="Kafka's maxRecordsPerPartition: a large batch is read in tasks of at most this many "
        "records, so 3 Kafka partitions keep every core busy (0 = one task per Kafka partition).",
    )
    stream_kafka_fetch_max_wait_ms: int = Field(
        10,
        description="Kafka consumer fetch.max.wait.ms of the stream's source. The consumer prefetches past "
        "the end of the log after each read and the broker holds that request this long; the next "
        "micro-batch's read waited for it (Kafka's 500 ms default made a 30-row read 0.2-0.6 s).",
    )
    stream_compact_every: int = Field(
        100,
        description="After this many micro-batches that wrote rows, the transactions and scoring queries "
        "compact the date partitions they wrote, between two batches (0 = never): Delta OPTIMIZE of the "
        "files under 16 MB for `transactions`, a sorted rewrite of each partition for `scored_transactions` "
        "(anomalies first, see lake_row_group_rows).",
    )
    lake_row_group_rows: int = Field(
        16_384,
        ge=1_024,
        description="Rows per Parquet row group in the files the stream's compaction writes. Readers skip row "
        "groups by their statistics: `scored_transactions` is compacted clustered (anomalies first, then by "
        "first_seen), so `GET /anomalies` reads a day's anomaly row group(s), not the whole day.",
    )
    lake_vacuum_retention_h: float = Field(
        168.0,
        ge=0,
        description="Delta VACUUM deletes data files that left a table more than this many hours ago (every "
        "table the stream and `btc-anomaly detect` write). It bounds time travel and must exceed the longest "
        "stop of a change-feed reader (the stream's stats and scoring queries) and the longest lake read.",
    )
    lake_vacuum_every_s: float = Field(
        3600.0,
        ge=0,
        description="Seconds between two VACUUM runs of the lake maintenance (the stream's compactor, detect's "
        "poll loop); 0 = never.",
    )
    stream_fail_on_data_loss: bool = Field(
        True,
        description="Stop the stream when Kafka deleted offsets it had not read yet (retention, topic reset).",
    )
    stream_watermark: str = Field(
        "10 minutes",
        description="Event-time (first_seen) lateness accepted by the window aggregates; later rows are not counted.",
    )
    stream_dedup_lookback_days: int = Field(
        30,
        description="Dedup looks for a tx's stored copy only in date partitions this many days before the "
        "batch's oldest first_seen; the stream's index of stored hashes holds about twice that span, 12 bytes "
        "a tx (0 = the whole table: exact forever, but the index holds every hash and a MERGE scans them all).",
    )
    stream_metrics_port: int = Field(9202, description="Prometheus port of `btc-anomaly stream` (0 = off).")

    # --- API ---------------------------------------------------------------------------------------------
    api_host: str = Field(
        "127.0.0.1", description="Address `btc-anomaly api` binds (0.0.0.0 in a container)."
    )
    api_port: int = Field(5001, description="Port of `btc-anomaly api`.")
    allowed_hosts: str = Field(
        "localhost,127.0.0.1,::1,api,dashboard",
        description="Host header values the API and the dashboard answer, comma-separated (others get 400); "
        "`*` = any. The defaults cover local runs and the compose service names.",
    )
    api_workers: int = Field(
        1, description="uvicorn worker processes of `btc-anomaly api`; /metrics aggregates all of them."
    )
    api_model_alias: str = Field(
        "champion", description="Registry alias the API serves; re-checked every model_reload_s seconds."
    )
    api_key: SecretStr | None = Field(
        None, description="X-API-Key required by POST /admin/reload; empty = that endpoint is disabled (403)."
    )
    api_max_batch: int = Field(
        10_000, description="Most transactions in one /predict or /predict/raw request (413 above)."
    )
    api_max_body_bytes: int = Field(
        32 * 1024 * 1024, description="Most request body bytes, declared or streamed (413 above)."
    )
    api_max_batch_ios: int = Field(
        2_000_000,
        description="Most inputs + outputs over all transactions of one /predict request (8-field bodies count "
        "their declared counts; 413 above).",
    )
    api_resolve_prevouts: bool = Field(
        True,
        description="/predict/raw looks up prevouts with Blockchain.com /rawtx of each parent transaction.",
    )
    api_prevout_timeout_s: float = Field(
        2.0,
        description="Timeout of one /rawtx prevout lookup (one attempt); a request waits at most twice that.",
    )
    api_prevout_max_parents: int = Field(
        64, description="Parent transactions looked up per /predict/raw request; the rest stay unresolved."
    )
    api_prevout_concurrency: int = Field(8, description="Parallel /rawtx prevout lookups per worker.")
    api_prevout_not_found_ttl_s: float = Field(
        600.0,
        description="A parent /rawtx answered not-found is not looked up again for this many seconds (0 = always).",
    )
    api_scored_table: Path | None = Field(
        None, description="Delta table of /anomalies and /transactions; empty = <lake>/scored_transactions."
    )
    api_anomalies_max_limit: int = Field(1000, description="Largest `limit` GET /anomalies accepts.")
    api_lake_window_h: float = Field(
        24.0,
        gt=0,
        description="Time window (hours of first_seen, ending at the newest row) that GET /anomalies, "
        "/addresses and /transactions read when the request gives no `since`; a lake read never scans a "
        "whole table.",
    )
    api_lake_max_window_h: float = Field(
        168.0,
        gt=0,
        description="Widest [since, until) window a lake endpoint reads, in hours; a wider request gets a 422. "
        "/transactions/{hash} searches this much history back from the newest row.",
    )
    api_registry_timeout_s: int = Field(
        10, description="HTTP timeout of the API's MLflow registry calls (alias checks, model downloads)."
    )
    api_scorer_backend: str = Field(
        "numpy",
        description="Forest evaluator of the API workers (empty = scorer_backend). numpy: as fast as numba on "
        "the API's small batches and ~110 MB less per worker; numba pays off above ~1,000 rows per request.",
    )
    api_startup_wait_s: float = Field(
        60.0,
        description="A worker starts answering once its first model check is done, or after this many seconds.",
    )
    api_metrics_dir: Path | None = Field(
        None,
        description="PROMETHEUS_MULTIPROC_DIR of `btc-anomaly api` (wiped at start); empty = a fresh temporary "
        "folder per run.",
    )
    api_access_log: bool = Field(
        False, description="uvicorn access log of `btc-anomaly api` (costs latency)."
    )

    # --- dashboard ---------------------------------------------------------------------------------------
    dashboard_host: str = Field(
        "127.0.0.1", description="Address `btc-anomaly dashboard` binds (0.0.0.0 in a container)."
    )
    dashboard_port: int = Field(8050, description="Port of `btc-anomaly dashboard`.")
    dashboard_threads: int = Field(
        8, description="Request threads of the dashboard server (one process: the Delta cache is shared)."
    )
    dashboard_refresh_s: float = Field(
        5.0, description="Seconds between live refreshes of the dashboard panels."
    )
    dashboard_default_window: Literal["15m", "1h", "24h", "all"] = Field(
        "1h", description="Time range the dashboard opens with."
    )
    dashboard_stale_after_s: float = Field(
        120.0,
        description="Pipeline freshness warning: seconds since the newest scored row before it is stale.",
    )
    dashboard_rate_window_s: float = Field(
        300.0, description="Trailing seconds (before now) of the live tx-per-minute KPI."
    )
    dashboard_scored_table: Path | None = Field(
        None, description="Delta table the dashboard charts; empty = <lake>/scored_transactions."
    )
    dashboard_cache_max_rows: int = Field(
        3_000_000,
        description="Most scored rows the dashboard keeps in memory (newest files first; about 120 B per row).",
    )
    dashboard_max_points: int = Field(
        5000, description="Most points the value/fee-rate scatter sends to the browser."
    )
    dashboard_max_anomaly_points: int = Field(
        2000, description="Most anomalies in the scatter (highest scores first); normals fill the rest."
    )
    dashboard_max_bins: int = Field(
        1500, description="Most time buckets per series; wider buckets (5m, 1h, 1d, ...) above it."
    )
    dashboard_ewma_span: int = Field(30, description="EWMA span (buckets) of the anomaly-rate band.")
    dashboard_ewma_k: float = Field(3.0, description="Half-width of the anomaly-rate band in EWMA std devs.")
    dashboard_page_size: int = Field(15, description="Rows per page of the top-anomalies table.")
    dashboard_explorer_url: str = Field(
        "https://mempool.space/tx/{hash}",
        description="Public explorer link of a transaction ({hash} is replaced).",
    )
    dashboard_mlflow_refresh_s: float = Field(
        60.0, description="Seconds between the dashboard's MLflow registry polls (in the background)."
    )
    dashboard_mlflow_timeout_s: float = Field(
        5.0,
        description="HTTP timeout of one dashboard MLflow call; a slow or down server never blocks a page.",
    )
    dashboard_max_versions: int = Field(20, description="Newest model versions listed on the model page.")

    # --- monitoring --------------------------------------------------------------------------------------
    trainer_metrics_port: int = Field(
        9203,
        description="Prometheus port of `btc-anomaly train --every` (0 = off; one-shot runs serve none).",
    )
    prometheus_binary: str = Field(
        "prometheus",
        description="Prometheus server run by `btc-anomaly prometheus` (Debian: /usr/bin/prometheus).",
    )
    prometheus_host: str = Field("127.0.0.1", description="Address `btc-anomaly prometheus` binds.")
    prometheus_port: int = Field(9090, description="Port of `btc-anomaly prometheus`.")
    prometheus_dir: Path | None = Field(
        None,
        description="TSDB and rendered config of `btc-anomaly prometheus`; empty = <state_dir>/prometheus.",
    )
    prometheus_scrape_interval_s: float = Field(
        15.0, description="Scrape and rule evaluation interval of `btc-anomaly prometheus`."
    )
    prometheus_retention: str = Field("15d", description="TSDB retention of `btc-anomaly prometheus`.")
    notify_webhook_url: SecretStr | None = Field(
        None, description="Slack-compatible incoming webhook for anomaly notifications; empty = off."
    )
    notify_rate_per_min: float = Field(
        6.0, description="Most webhook messages per minute (token bucket refill); the excess is summarised."
    )
    notify_burst: int = Field(
        3, description="Messages that may go out back to back before the rate limit holds the rest."
    )
    notify_queue_size: int = Field(
        1000,
        description="Notifications buffered for the sender thread; beyond it they are dropped (counted).",
    )
    notify_timeout_s: float = Field(5.0, description="HTTP timeout of one webhook post (never retried).")
    alertmanager_port: int = Field(
        9095,
        description="Port of a local Alertmanager that `btc-anomaly prometheus` sends alerts to (9093, its "
        "default, is the Kafka controller's here).",
    )
    alert_relay_port: int = Field(
        9096, description="Port of `btc-anomaly alert-relay` (Alertmanager webhook → notify_webhook_url)."
    )

    # --- detectors (rules, watchlists, risk score; `btc-anomaly detect`) ------------------------------------
    risk_detectors: bool = Field(
        True,
        description="Scoring also runs the rules, watchlists and Mahalanobis distance (else the risk score "
        "comes from the forest alone).",
    )
    watchlist_dir: Path | None = Field(
        PROJECT_ROOT / "data" / "labels",
        description="Folder with watchlists.yaml and the address lists it names; empty = no watchlists.",
    )
    detect_poll_s: float = Field(10.0, description="Seconds between the Delta polls of `btc-anomaly detect`.")
    detect_lookback: str = Field(
        "24h", description="History `btc-anomaly detect` reads for the EWMA windows (e.g. 24h, 7d)."
    )
    detect_ewma_span: int = Field(30, description="EWMA span, in 1-minute windows, of the window detector.")
    detect_ewma_threshold: float = Field(
        3.0,
        description="A window metric is anomalous when its z-score exceeds this many EW standard deviations "
        "(either sign).",
    )
    detect_ewma_min_windows: int = Field(
        10, description="Windows of history before the window detector flags anything."
    )
    detect_burst_window_s: float = Field(
        60.0, description="Sliding window of the coordinated-burst detector, in seconds of first_seen."
    )
    detect_burst_min_size: int = Field(
        3, description="Fewest similar high fan-in/fan-out transactions that make a coordinated burst."
    )
    detect_alert_severity: Literal["medium", "high", "severe"] = Field(
        "severe", description="Scored transactions at or above this severity produce an alert."
    )
    detect_metrics_port: int = Field(9204, description="Prometheus port of `btc-anomaly detect` (0 = off).")
    detect_healthcheck_max_age_s: float = Field(
        120.0,
        description="`btc-anomaly detect --healthcheck` fails when the last poll without a failed stage is "
        "older than this (the compose healthcheck; reads the detect metrics port).",
    )

    @property
    def lake_dir(self) -> Path:
        return self.lake_root or self.state_dir / "lake"

    @property
    def checkpoint_path(self) -> Path:
        return self.checkpoint_dir or self.lake_dir / "_checkpoints"

    @property
    def allowed_host_list(self) -> list[str]:
        """``allowed_hosts`` as the list the API's and the dashboard's Host checks take."""
        return [h.strip() for h in self.allowed_hosts.split(",") if h.strip()]

    def lake_table(self, name: str) -> Path:
        """Path of the Delta table ``name`` (transactions, quarantine, tx_stats_1m, ...) under the lake."""
        return self.lake_dir / name


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def settings_reference_markdown() -> str:
    """The configuration reference table (README) generated from the Settings fields."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        if isinstance(default, Path):
            with contextlib.suppress(ValueError):
                default = default.relative_to(PROJECT_ROOT)
        rows.append(f"| `{ENV_PREFIX}{name.upper()}` | `{default}` | {field.description or ''} |")
    return "\n".join(rows)
