"""Streaming scoring: every new row of ``transactions`` → the champion → ``scored_transactions``.

A third streaming query of `btc-anomaly stream`. Its source is the change data feed of
``transactions`` (``insert`` changes only), like the window aggregates: every distinct hash arrives
exactly once, after dedup, so a transaction sent twice is scored once, and the Delta
source's offsets (table versions) are checkpointed. A confirmation (``block_height`` update) does not
re-score: the features do not depend on it.

Scoring is ``model.scoring.map_in_pandas_scorer`` inside ``mapInPandas``: the same ``score_frame``
(features.py + the compiled forests + explanations) the API calls, in Spark's Python workers. Each
worker keeps the champion it loaded and re-checks the registry alias every ``model_reload_s``
seconds, so a promotion reaches the stream without a restart (each row records the version that
scored it).

Exactly once: each micro-batch is scored once and kept (local checkpoint), then appended with Delta's
transaction identifier (query id + batch id), so a batch replayed after a crash commits nothing twice.
New columns of ``scored_arrow_schema()`` (a newer release) are added to the table (schema merge).

A registry outage does not stop scoring: each worker keeps the champion it loaded (a worker without
one fails its batch, and the runner restarts the query until the registry answers). The workers inherit
the process' MLflow client limits (``stream.registry_fails_fast``, set before the JVM starts), so a
re-check fails fast instead of holding the batch in MLflow's default retries (about four minutes). The
workers say so only in their log: the driver checks the alias on the same schedule (``watch_registry``),
and failures in a row are the metric ``btc_stream_registry_consecutive_failures`` and the alert
BtcStreamRegistryUnreachable.

Without a champion (fresh install, before the first training) the query is not started; the runner
checks the alias every ``model_reload_s`` and starts it once a champion exists. It then begins with a
snapshot of the whole table, so nothing ingested before the first model stays unscored.

The table is partitioned like ``transactions``: by ``date``, the UTC date of ``first_seen``, so the API's
time-window reads open one day's files. The query compacts the partitions it wrote every
``Settings.stream_compact_every`` batches and VACUUMs the stream's tables every
``Settings.lake_vacuum_every_s`` (maintenance.py). A table written unpartitioned by an older release is
rewritten partitioned once, before the query starts (``ensure_partitioned``).

With ``stream_notify``, each batch's forest anomalies also go to the rate-limited webhook notifier
from the driver, after the write (a notification never announces a row that is not in the lake). Off
by default: ``btc-anomaly detect`` already sends one alert per severe transaction with the rules and
watchlists that fired, restart-safe; the stream's messages are the raw forest view, for setups
without the detect service.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from btc_anomaly.config import Settings
from btc_anomaly.model.registry import CHAMPION
from btc_anomaly.model.scoring import map_in_pandas_scorer, scored_spark_schema
from btc_anomaly.monitoring.metrics import STREAM_PREDICTIONS, STREAM_REGISTRY_FAILURES
from btc_anomaly.monitoring.notifier import notify_anomalies
from btc_anomaly.processing import tables
from btc_anomaly.processing.parse import transaction_columns

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.streaming import StreamingQuery

    from btc_anomaly.processing.sinks import Lake

log = logging.getLogger(__name__)

SCORING_QUERY = "scoring"
SCORED = tables.SCORED
# Columns the notifier reads (see notifier.notify_anomalies); only anomalies leave the executors.
_NOTIFY_COLUMNS = ("hash", "anomaly_score", "model_kind", "model_version", "reasons", "output_value", "fee")
# At most this many anomalies of one batch are handed to the notifier: it summarises bursts anyway,
# and a backfill of a million rows must not pull thousands of rows into the driver.
NOTIFY_MAX_PER_BATCH = 200


def champion_exists(settings: Settings) -> bool:
    """Does the registry have a champion now? False when MLflow is unreachable (try again later).

    The runner asks every ``model_reload_s`` until the scoring query runs: a failure counts in
    ``STREAM_REGISTRY_FAILURES`` like the query's own checks (``watch_registry``), so a stream that
    cannot score because the registry stays down raises the same alert."""
    from btc_anomaly.model.registry import version_by_alias

    try:
        found = version_by_alias(settings, CHAMPION) is not None
    except Exception as exc:  # MLflow down or not yet up: not an error of the stream
        STREAM_REGISTRY_FAILURES.inc()
        log.info("cannot reach the model registry at %s (%s)", settings.mlflow_tracking_uri, exc)
        return False
    STREAM_REGISTRY_FAILURES.set(0)
    return found


def watch_registry(settings: Settings, query: StreamingQuery, stopping: threading.Event) -> threading.Thread:
    """Check the champion alias from the driver every ``model_reload_s`` while ``query`` runs, into
    ``STREAM_REGISTRY_FAILURES``. The workers' own checks keep the loaded champion when the registry is
    down and say so only in their log: this is the outage's metric."""
    from btc_anomaly.model.registry import version_by_alias

    def run() -> None:
        failures = 0
        while not stopping.wait(settings.model_reload_s):
            try:
                if not query.isActive:
                    return
            except Exception:  # the JVM is gone (shutdown)
                return
            try:
                version_by_alias(settings, CHAMPION)
            except Exception as exc:
                failures += 1
                STREAM_REGISTRY_FAILURES.set(failures)
                if failures == 1:
                    log.warning(
                        "model registry unreachable at %s (%s): scoring goes on with the loaded champion; "
                        "a promotion reaches the stream once it answers again",
                        settings.mlflow_tracking_uri,
                        str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__,
                    )
                continue
            if failures:
                log.info("model registry reachable again after %d failed checks", failures)
            failures = 0
            STREAM_REGISTRY_FAILURES.set(0)

    thread = threading.Thread(target=run, name="registry-watch", daemon=True)
    thread.start()
    return thread


@dataclass(frozen=True)
class ScoredBatch:
    notified: int  # anomalies handed to the notifier
    oldest: dt.date | None  # oldest date partition written (None: no row)


def write_scored(
    scored: DataFrame, path: str, app_id: str, batch_id: int, notify: bool = False
) -> ScoredBatch:
    """Append one scored micro-batch into its date partitions (idempotent per batch id)."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    # Scored once: the write and the anomaly query below must see the same rows (and scored_at).
    # The session time zone is UTC (spark_session.py), so the date is first_seen's UTC date.
    kept = scored.withColumn(tables.DATE_COLUMN, F.to_date("first_seen")).localCheckpoint(
        eager=True, storageLevel=StorageLevel.MEMORY_AND_DISK
    )
    (
        kept.write.format("delta")
        .mode("append")
        .partitionBy(*tables.PARTITION_COLUMNS[SCORED])
        .option("mergeSchema", "true")
        .option("txnAppId", app_id)
        .option("txnVersion", str(batch_id))
        .save(path)
    )
    counts = (
        kept.groupBy("is_anomaly", "model_kind")
        .agg(F.count(F.lit(1)).alias("count"), F.min(tables.DATE_COLUMN).alias("oldest"))
        .collect()
    )
    dates = [row["oldest"] for row in counts if row["oldest"] is not None]
    oldest = min(dates) if dates else None
    for row in counts:
        label = "anomaly" if row["is_anomaly"] else "normal"
        STREAM_PREDICTIONS.labels(label=label, model_kind=row["model_kind"]).inc(row["count"])
    if not notify:
        return ScoredBatch(0, oldest)
    rows = (
        kept.where("is_anomaly")
        .orderBy(F.desc("anomaly_score"))
        .select(*[c for c in _NOTIFY_COLUMNS if c in kept.columns])
        .limit(NOTIFY_MAX_PER_BATCH)
        .collect()
    )
    notify_anomalies((r.asDict() for r in rows), source="stream")
    return ScoredBatch(len(rows), oldest)


def ensure_partitioned(spark: SparkSession, path: str) -> bool:
    """Rewrite a ``scored_transactions`` written unpartitioned (releases before the date partitions) into
    date partitions, in one commit; True when it did. Runs before the scoring query starts, so no writer
    competes; readers keep their snapshot, and the old files stay for time travel until VACUUM."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    if not DeltaTable.isDeltaTable(spark, path):
        return False
    wanted = tables.PARTITION_COLUMNS[SCORED]
    current = DeltaTable.forPath(spark, path).detail().first()["partitionColumns"]
    if list(current) == wanted:
        return False
    log.warning(
        "%s is partitioned by %s (an older release): rewriting it partitioned by %s, once",
        path,
        list(current) or "nothing",
        wanted,
    )
    rows = spark.read.format("delta").load(path)
    if tables.DATE_COLUMN in rows.columns:
        rows = rows.drop(tables.DATE_COLUMN)
    (
        rows.withColumn(tables.DATE_COLUMN, F.to_date("first_seen"))
        .write.format("delta")
        .mode("overwrite")
        .option("overwriteSchema", "true")
        .partitionBy(*wanted)
        .save(path)
    )
    return True


def start_scoring_query(
    spark: SparkSession,
    settings: Settings,
    lake: Lake,
    *,
    available_now: bool = False,
    stopping: threading.Event | None = None,
) -> StreamingQuery:
    from btc_anomaly.processing.maintenance import Compactor
    from btc_anomaly.processing.sinks import inserted_transactions, streaming_query_id
    from btc_anomaly.processing.stream import interruptible, trigger_options

    scorer = map_in_pandas_scorer(
        settings.mlflow_tracking_uri,
        settings.model_name,
        alias=CHAMPION,
        overrides={
            "model_reload_s": settings.model_reload_s,
            "scorer_backend": settings.scorer_backend,
            # The workers read the fee market from this stream's own lake (model/context.py).
            "lake_root": str(lake.root),
            "fee_market_window_s": settings.fee_market_window_s,
            "fee_market_max_age_s": settings.fee_market_max_age_s,
            "fee_market_refresh_s": settings.fee_market_refresh_s,
        },
    )
    scored = inserted_transactions(spark, lake, transaction_columns()).mapInPandas(
        scorer, schema=scored_spark_schema()
    )
    path = lake.table(SCORED)
    ensure_partitioned(spark, path)
    # The transactions query VACUUMs every table.
    compactor = Compactor(path, settings.stream_compact_every, row_group_rows=settings.lake_row_group_rows)

    def handle(batch: DataFrame, batch_id: int) -> None:
        written = write_scored(
            batch,
            path,
            f"{streaming_query_id(batch.sparkSession)}:{SCORED}",
            batch_id,
            settings.stream_notify,
        )
        compactor.wrote(written.oldest)
        compactor.run_if_due(batch.sparkSession)

    stopping = stopping or threading.Event()
    query = (
        scored.writeStream.queryName(SCORING_QUERY)
        .option("checkpointLocation", lake.checkpoint(SCORING_QUERY))
        .trigger(**trigger_options(settings.stream_score_trigger_s, available_now))
        .foreachBatch(interruptible(handle, stopping))
        .start()
    )
    if not available_now:
        watch_registry(settings, query, stopping)
    return query
