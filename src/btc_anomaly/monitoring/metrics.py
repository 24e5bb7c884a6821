"""Every Prometheus metric of btc-anomaly: names, help texts and labels, defined once.

Services import the objects from here instead of declaring their own, so a dashboard or alert rule can
be checked against one file. Names carry the service prefix (``btc_producer_``, ...). prometheus-client
appends ``_total`` to counters on exposition, so counter names below are given without it.

Everything is registered in prometheus-client's default registry, which is what
``prometheus_client.start_http_server`` exposes.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# --- producer (ingestion/producer.py and its sources) ------------------------------------------------

PRODUCER_FETCHED = Counter(
    "btc_producer_fetched",
    "Transactions received from a source (before dedup), by source.",
    ["source"],
)
PRODUCER_PUBLISHED = Counter(
    "btc_producer_published",
    "Transactions acknowledged by Kafka (acks=all) on the transactions topic.",
)
PRODUCER_DUPLICATES = Counter(
    "btc_producer_duplicates_skipped",
    "Transactions not published because the same (hash, confirmed) was already sent in this run.",
)
PRODUCER_DLQ = Counter(
    "btc_producer_dlq",
    "Records that could not become a canonical transaction, sent to the dead-letter topic, by source.",
    ["source"],
)
PRODUCER_ERRORS = Counter(
    "btc_producer_errors",
    "Errors by kind: failed HTTP attempts (http_429, http_5xx, http_4xx, timeout, connect, html, bad_json), "
    "polls given up after retries (poll_failed), WebSocket drops (ws_disconnect), "
    "Kafka sends re-queued (kafka_send), records Kafka refuses for good, dead-lettered (kafka_rejected), "
    "WebSocket pushes dropped while the source queue is full (source_dropped).",
    ["kind"],
)
PRODUCER_REQUEUED = Counter(
    "btc_producer_requeued",
    "Kafka sends that failed or timed out and were queued again (never dropped).",
)
PRODUCER_CLIENT_RESETS = Counter(
    "btc_producer_kafka_client_resets",
    "Kafka clients replaced after a delivery failure (everything unacknowledged is re-sent).",
)
PRODUCER_LAST_PUBLISH = Gauge(
    "btc_producer_last_publish_timestamp_seconds",
    "Unix time of the last Kafka acknowledgement on the transactions topic.",
)
PRODUCER_LAST_FETCH = Gauge(
    "btc_producer_last_fetch_success_timestamp_seconds",
    "Unix time of the last successful fetch from a source, by source.",
    ["source"],
)
PRODUCER_WS_CONNECTED = Gauge(
    "btc_producer_ws_connected",
    "1 while the Blockchain.com WebSocket is connected, else 0.",
)
PRODUCER_QUEUE_DEPTH = Gauge(
    "btc_producer_queue_depth",
    "Items waiting inside the producer, by queue: source (hand-over from an async source), ws (WebSocket "
    "pushes), retry (Kafka sends to repeat). Each is bounded except retry, which holds at most what was in flight.",
    ["queue"],
)
PRODUCER_REST_FALLBACK = Gauge(
    "btc_producer_rest_fallback_active",
    "1 while REST polling stands in for a WebSocket that has been down too long, else 0.",
)

ERROR_KINDS = (
    "http_429",
    "http_5xx",
    "http_4xx",
    "timeout",
    "connect",
    "html",
    "bad_json",
    "poll_failed",
    "ws_disconnect",
    "kafka_send",
    "kafka_rejected",
    "source_dropped",
)


def producer_error(kind: str, n: int = 1) -> None:
    PRODUCER_ERRORS.labels(kind=kind).inc(n)


# Export every error kind from the start, so rate() and alert rules see a 0 series instead of none.
for _kind in ERROR_KINDS:
    PRODUCER_ERRORS.labels(kind=_kind)
for _queue in ("source", "ws", "retry"):
    PRODUCER_QUEUE_DEPTH.labels(queue=_queue)

# --- stream (processing/stream.py, exported by processing/metrics_listener.py) -----------------------

STREAM_INPUT_ROWS = Counter(
    "btc_stream_input_rows",
    "Records read by a streaming query (Kafka records for `transactions`, inserts for `tx_stats`), by query.",
    ["query"],
)
STREAM_INPUT_ROWS_PER_SECOND = Gauge(
    "btc_stream_input_rows_per_second",
    "Arrival rate of the last micro-batch (rows/s between the starts of the last two batches), by query.",
    ["query"],
)
STREAM_PROCESSED_ROWS_PER_SECOND = Gauge(
    "btc_stream_processed_rows_per_second",
    "Processing rate of the last micro-batch (rows / batch duration), by query.",
    ["query"],
)
STREAM_BATCH_DURATION = Histogram(
    "btc_stream_batch_duration_seconds",
    "Wall time of one micro-batch (read, parse, dedup, write, commit), by query.",
    ["query"],
    buckets=(0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0),
)
STREAM_BATCH_INPUT_ROWS = Gauge(
    "btc_stream_batch_input_rows",
    "Rows in the last micro-batch, by query.",
    ["query"],
)
STREAM_LAST_BATCH = Gauge(
    "btc_stream_last_batch_timestamp_seconds",
    "Unix time the last micro-batch finished (also idle triggers), by query.",
    ["query"],
)
STREAM_KAFKA_LAG = Gauge(
    "btc_stream_kafka_offsets_behind_latest",
    "Kafka records not yet read, from the source progress: stat = max / avg / min over partitions.",
    ["stat"],
)
STREAM_QUARANTINED = Counter(
    "btc_stream_quarantined_rows",
    "Kafka records that were not a valid canonical transaction (written to the quarantine table).",
)
STREAM_STATE_ROWS = Gauge(
    "btc_stream_state_rows",
    "Rows held in streaming state (open windows of `tx_stats`), by query.",
    ["query"],
)
STREAM_LATE_ROWS = Counter(
    "btc_stream_late_rows_dropped",
    "Rows ignored by the window aggregates because they arrived after the watermark, by query.",
    ["query"],
)
STREAM_QUERY_ACTIVE = Gauge(
    "btc_stream_query_active",
    "1 while a streaming query runs, 0 after it stopped or failed, by query.",
    ["query"],
)
STREAM_QUERY_FAILURES = Counter(
    "btc_stream_query_failures",
    "Streaming queries that terminated with an exception, by query.",
    ["query"],
)
STREAM_MAINTENANCE_FAILURES = Counter(
    "btc_stream_maintenance_failures",
    "Compactions (op=compact), index builds (op=index) and VACUUMs (op=vacuum) of the stream's tables that "
    "failed, by table; retried at the next due time.",
    ["table", "op"],
)
STREAM_PREDICTIONS = Counter(
    "btc_stream_predictions",
    "Transactions scored by the stream's scoring query, by label (anomaly/normal) and model_kind.",
    ["label", "model_kind"],
)
STREAM_REGISTRY_FAILURES = Gauge(
    "btc_stream_registry_consecutive_failures",
    "Checks of the champion alias by the stream (every model_reload_s: the scoring query's, or the wait for a "
    "first champion) that failed in a row: the model registry is unreachable; 0 after one that succeeded. A "
    "running scoring query goes on with the champion it loaded.",
)


# --- api (api/: FastAPI service; several uvicorn workers share PROMETHEUS_MULTIPROC_DIR) -------------
# Gauges say how they combine across worker processes (multiprocess_mode); ignored in a single process.

API_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
API_SCORE_BUCKETS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.9, 1.0)

API_REQUESTS = Counter(
    "btc_api_requests",
    "HTTP requests answered, by method, route template (<unmatched> for unknown paths) and status code.",
    ["method", "route", "status"],
)
API_LATENCY = Histogram(
    "btc_api_request_duration_seconds",
    "Time from request start to the last response byte, by method, route template and status code.",
    ["method", "route", "status"],
    buckets=API_LATENCY_BUCKETS,
)
API_PREDICTIONS = Counter(
    "btc_api_predictions",
    "Transactions scored, by label (anomaly | normal) and forest (full | structural).",
    ["label", "model_kind"],
)
API_SCORES = Histogram(
    "btc_api_anomaly_score",
    "anomaly_score of every transaction scored, by forest (full | structural).",
    ["model_kind"],
    buckets=API_SCORE_BUCKETS,
)
API_MODEL_INFO = Gauge(
    "btc_api_model_info",
    "1 for the model version a worker is serving (name, version, alias), 0 for one it has replaced.",
    ["name", "version", "alias"],
    multiprocess_mode="livemax",
)
API_MODEL_LOADED_AT = Gauge(
    "btc_api_model_loaded_timestamp_seconds",
    "Unix time the serving model was loaded (newest over live workers).",
    multiprocess_mode="livemax",
)
API_MODEL_RELOADS = Counter(
    "btc_api_model_reloads",
    "Model loads after an alias change or a forced reload, by result (success | failure).",
    ["result"],
)
API_RAW_ITEMS = Counter(
    "btc_api_raw_items",
    "Raw hex transactions received by /predict/raw, by result (scored | invalid).",
    ["result"],
)
API_PREVOUT_LOOKUPS = Counter(
    "btc_api_prevout_lookups",
    "Parent transactions needed by /predict/raw, by result: fetched, cached, not_found, cached_not_found "
    "(a recent not-found answer, not asked again), failed, rate_limited (the source answered 429), skipped "
    "(over the per-request cap, lookups disabled or the source paused).",
    ["result"],
)
API_PREVOUT_PAUSED_UNTIL = Gauge(
    "btc_api_prevout_paused_until_timestamp_seconds",
    "Unix time until which /predict/raw does not ask the prevout source (circuit breaker after failures or a "
    "429); in the past while lookups run.",
    multiprocess_mode="livemax",
)


# --- dashboard (dashboard/: Dash app, one process; served at /metrics of the dashboard's own server) ---

DASHBOARD_CALLBACKS = (
    "refresh_panels",
    "table_page",
    "detail",
    "model_page",
    "reset_threshold",
)
DASHBOARD_CALLBACK_LATENCY = Histogram(
    "btc_dashboard_callback_duration_seconds",
    "Server time of one Dash callback (Delta cache check, queries, figure building), by callback.",
    ["callback"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.5, 5.0, 10.0),
)
DASHBOARD_CALLBACK_ERRORS = Counter(
    "btc_dashboard_callback_errors",
    "Dash callbacks that raised (the page shows an error state instead of the panel), by callback.",
    ["callback"],
)
DASHBOARD_DELTA_FILES_READ = Counter(
    "btc_dashboard_delta_files_read",
    "Delta data files read into the dashboard's cache (new files only: unchanged ones are reused), by table.",
    ["table"],
)
DASHBOARD_CACHED_ROWS = Gauge(
    "btc_dashboard_cached_rows",
    "Scored rows held in the dashboard's in-memory cache, by table.",
    ["table"],
)
DASHBOARD_MLFLOW_UP = Gauge(
    "btc_dashboard_mlflow_up",
    "1 when the dashboard's last MLflow registry poll succeeded, else 0.",
)

# Export every callback's error series from the start, so rate() and alert rules see 0 instead of none.
for _callback in DASHBOARD_CALLBACKS:
    DASHBOARD_CALLBACK_ERRORS.labels(callback=_callback)

# --- trainer (`btc-anomaly train --every`, served on Settings.trainer_metrics_port; monitoring/trainer.py) -
# A one-shot `btc-anomaly train` sets these too but exits before anything could scrape them.

TRAINER_RESULTS = ("success", "failure")
TRAINER_OUTCOMES = ("promoted", "forced", "refused", "unchanged", "skipped")

TRAINER_RUNS = Counter(
    "btc_trainer_runs",
    "Training runs finished, by result (success | failure).",
    ["result"],
)
TRAINER_CONSECUTIVE_FAILURES = Gauge(
    "btc_trainer_consecutive_failures",
    "Scheduled training runs that failed in a row (0 after a success).",
)
TRAINER_LAST_SUCCESS = Gauge(
    "btc_trainer_last_success_timestamp_seconds",
    "Unix time the last successful training run finished (0 = none yet in this process).",
)
TRAINER_LAST_DURATION = Gauge(
    "btc_trainer_last_run_duration_seconds",
    "Wall time of the last successful run: read, features, fit, MLflow log, register and gate.",
)
TRAINER_ROWS = Gauge(
    "btc_trainer_training_rows",
    "Rows in the last successful training window, by model_kind (full = with prevouts, structural = all).",
    ["model_kind"],
)
TRAINER_ANOMALY_RATE = Gauge(
    "btc_trainer_training_anomaly_rate",
    "Share of its training window the version just trained flags, by model_kind (full | structural | all).",
    ["model_kind"],
)
TRAINER_MODEL_VERSION = Gauge(
    "btc_trainer_model_version",
    "Registry version number the last successful run registered (the challenger).",
)
TRAINER_PROMOTIONS = Counter(
    "btc_trainer_promotion_decisions",
    "Promotion gate outcomes of training runs: promoted, forced, refused, unchanged (already the champion), "
    "skipped (--no-promote).",
    ["outcome"],
)
TRAINER_GATE_CHECK = Gauge(
    "btc_trainer_gate_check_passed",
    "Last promotion gate decision: 1 if the check passed, 0 if it failed, by check.",
    ["check"],
)
TRAINER_CHAMPION_VERSION = Gauge(
    "btc_trainer_champion_version",
    "Registry version number behind the champion alias (0 = no champion), read after every run.",
)
TRAINER_CHAMPION_CREATED = Gauge(
    "btc_trainer_champion_created_timestamp_seconds",
    "Unix time the champion version was registered, i.e. trained (stale-champion alert).",
)
TRAINER_CHAMPION_PROMOTED = Gauge(
    "btc_trainer_champion_promoted_timestamp_seconds",
    "Unix time the promotion gate made the current champion champion (0 = unknown).",
)
TRAINER_CHAMPION_ANOMALY_RATE = Gauge(
    "btc_trainer_champion_training_anomaly_rate",
    "Share of its own training window the champion flags, by model_kind (full | structural): the "
    "reference of the anomaly-rate drift alert.",
    ["model_kind"],
)

for _result in TRAINER_RESULTS:
    TRAINER_RUNS.labels(result=_result)
for _outcome in TRAINER_OUTCOMES:
    TRAINER_PROMOTIONS.labels(outcome=_outcome)

# --- notifier (monitoring/notifier.py: Slack-compatible anomaly webhook, in whichever process scores) -----

NOTIFIER_MESSAGES = Counter(
    "btc_notifier_messages",
    "Webhook messages delivered (HTTP 2xx), by kind (anomaly | summary | alert).",
    ["kind"],
)
NOTIFIER_SUMMARISED = Counter(
    "btc_notifier_summarised",
    "Anomalies held back by the rate limit and folded into a summary message instead.",
)
NOTIFIER_DROPPED = Counter(
    "btc_notifier_dropped",
    "Notifications never sent, by reason (queue_full: the caller outpaced the sender; shutdown).",
    ["reason"],
)
NOTIFIER_FAILURES = Counter(
    "btc_notifier_failures",
    "Webhook posts that failed, by reason (http_4xx, http_5xx, http_429, timeout, connect, error).",
    ["reason"],
)
NOTIFIER_QUEUE = Gauge(
    "btc_notifier_queue_size",
    "Notifications waiting for the sender thread.",
    multiprocess_mode="livesum",
)

NOTIFIER_KINDS = ("anomaly", "summary", "alert")
NOTIFIER_DROP_REASONS = ("queue_full", "shutdown")
NOTIFIER_FAILURE_REASONS = ("http_4xx", "http_5xx", "http_429", "timeout", "connect", "error")
for _kind in NOTIFIER_KINDS:
    NOTIFIER_MESSAGES.labels(kind=_kind)
for _reason in NOTIFIER_DROP_REASONS:
    NOTIFIER_DROPPED.labels(reason=_reason)
for _reason in NOTIFIER_FAILURE_REASONS:
    NOTIFIER_FAILURES.labels(reason=_reason)

# --- detect (`btc-anomaly detect`, detectors/service.py; served on Settings.detect_metrics_port) ---------

DETECT_STAGES = ("windows", "bursts", "risky")  # the stages of one poll, in order
DETECT_ALERT_KINDS = ("window", "burst", "transaction")

DETECT_POLL_DURATION = Histogram(
    "btc_detect_poll_duration_seconds",
    "Wall time of one detect poll (read the lake, run the detectors, upsert, queue the alerts), failed "
    "stages included.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0),
)
DETECT_MAINTENANCE_FAILURES = Counter(
    "btc_detect_maintenance_failures",
    "Compaction + VACUUM runs of detect's tables that failed, by table; retried at the next due time.",
    ["table"],
)
DETECT_POLL_FAILURES = Counter(
    "btc_detect_poll_failures",
    "Detect poll stages that raised, by stage (windows | bursts | risky); the other stages of the "
    "poll still ran.",
    ["stage"],
)
DETECT_LAST_SUCCESS = Gauge(
    "btc_detect_last_success_timestamp_seconds",
    "Unix time the last detect poll with no failed stage finished (the start of the poll loop until the "
    "first one).",
)
DETECT_CONSECUTIVE_FAILURES = Gauge(
    "btc_detect_consecutive_failed_polls",
    "Detect polls in a row with at least one failed stage (0 after a clean poll).",
)
DETECT_ROWS_READ = Counter(
    "btc_detect_rows_read",
    "Delta rows the detectors read, by table (tx_stats_1m, transactions, scored_transactions).",
    ["table"],
)
DETECT_ROWS_WRITTEN = Counter(
    "btc_detect_rows_written",
    "Rows the detectors upserted, by table (window_anomalies | coordinated_bursts) and op (insert | "
    "update: a burst that grew).",
    ["table", "op"],
)
DETECT_ALERTS = Counter(
    "btc_detect_alerts",
    "Alerts the detectors handed to the webhook notifier, by kind (window: a flagged 1-minute window, "
    "burst: a new coordinated burst, transaction: a risky scored transaction).",
    ["kind"],
)

for _stage in DETECT_STAGES:
    DETECT_POLL_FAILURES.labels(stage=_stage)
for _table in ("tx_stats_1m", "transactions", "scored_transactions"):
    DETECT_ROWS_READ.labels(table=_table)
for _table, _op in (
    ("window_anomalies", "insert"),
    ("coordinated_bursts", "insert"),
    ("coordinated_bursts", "update"),
):
    DETECT_ROWS_WRITTEN.labels(table=_table, op=_op)
for _kind in DETECT_ALERT_KINDS:
    DETECT_ALERTS.labels(kind=_kind)

# --- label sets known in advance ----------------------------------------------------------------------
# Every labelled counter an alert rule or Grafana panel reads is created at 0 for each label value known
# in advance (above for errors, callbacks, trainer and notifier; here the rest), so that rate() and
# increase() return 0 before the first event instead of no data (an empty panel, an alert that cannot
# evaluate). tests/unit/test_monitoring_config.py checks that no such counter is left out.
# API_REQUESTS is the exception: its route x status values are open-ended, and the first scrape of
# /metrics creates a series.

PRODUCER_SOURCES = ("rest", "ws", "replay", "block")  # ingestion/: the producer's sources
STREAM_QUERIES = ("transactions", "tx_stats", "scoring")  # processing/: the stream's query names
# processing/tables.py: STREAM_TABLES (all vacuumed; the two date-partitioned ones also compacted), DETECT_TABLES
STREAM_TABLES = ("transactions", "quarantine", "tx_stats_1m", "tx_stats_5m", "scored_transactions")
STREAM_COMPACTED_TABLES = ("transactions", "scored_transactions")
# processing/tables.py: INDEX_TABLES, rebuilt by the transactions query's compaction and vacuumed with the rest
STREAM_INDEX_TABLES = ("address_index",)
DETECT_TABLES = ("window_anomalies", "coordinated_bursts")
PREDICTION_LABELS = ("anomaly", "normal")
MODEL_KINDS = ("full", "structural")
API_RELOAD_RESULTS = ("success", "failure")
API_RAW_RESULTS = ("scored", "invalid")
API_PREVOUT_RESULTS = (
    "fetched",
    "cached",
    "not_found",
    "cached_not_found",
    "failed",
    "rate_limited",
    "skipped",
)

for _source in PRODUCER_SOURCES:
    PRODUCER_FETCHED.labels(source=_source)
    PRODUCER_DLQ.labels(source=_source)
for _query in STREAM_QUERIES:
    STREAM_INPUT_ROWS.labels(query=_query)
    STREAM_LATE_ROWS.labels(query=_query)
    STREAM_QUERY_FAILURES.labels(query=_query)
for _table in STREAM_TABLES:
    STREAM_MAINTENANCE_FAILURES.labels(table=_table, op="vacuum")
for _table in STREAM_COMPACTED_TABLES:
    STREAM_MAINTENANCE_FAILURES.labels(table=_table, op="compact")
for _table in STREAM_INDEX_TABLES:
    STREAM_MAINTENANCE_FAILURES.labels(table=_table, op="vacuum")
    STREAM_MAINTENANCE_FAILURES.labels(table=_table, op="index")
for _table in DETECT_TABLES:
    DETECT_MAINTENANCE_FAILURES.labels(table=_table)
for _label in PREDICTION_LABELS:
    for _model_kind in MODEL_KINDS:
        API_PREDICTIONS.labels(label=_label, model_kind=_model_kind)
        STREAM_PREDICTIONS.labels(label=_label, model_kind=_model_kind)
for _result in API_RELOAD_RESULTS:
    API_MODEL_RELOADS.labels(result=_result)
for _result in API_RAW_RESULTS:
    API_RAW_ITEMS.labels(result=_result)
for _result in API_PREVOUT_RESULTS:
    API_PREVOUT_LOOKUPS.labels(result=_result)
