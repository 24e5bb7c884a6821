"""`btc-anomaly stream`: Kafka → Spark Structured Streaming → Delta Lake.

Three streaming queries share one SparkSession:

* ``transactions`` — Spark's Kafka source on ``Settings.topic``; each micro-batch is parsed and validated
  in Spark SQL (parse.py), valid rows are deduplicated into ``transactions`` (new hashes appended, stored
  ones MERGEd), the others appended to ``quarantine`` (sinks.py; the exactly-once argument is there);
* ``tx_stats`` — the change data feed of ``transactions`` aggregated into 1 and 5 minute event-time
  windows with a watermark, upserted into ``tx_stats_1m`` / ``tx_stats_5m`` (aggregates.py).
* ``scoring`` — the same change data feed scored by the champion into ``scored_transactions``, once a
  champion exists (scoring_query.py).

Each query has its own checkpoint under ``Settings.checkpoint_path``; a restart (after a crash, a kill
-9 or a deploy) resumes both exactly where they stopped. A query that fails (e.g. the broker is gone
longer than the Kafka client retries) is restarted from its checkpoint with backoff, so the process
keeps going through broker restarts; a supervisor only has to restart it when the process dies.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from btc_anomaly.config import Settings
from btc_anomaly.monitoring.metrics import STREAM_QUARANTINED
from btc_anomaly.processing.aggregates import GRANULARITIES_S, upsert_stats, windowed
from btc_anomaly.processing.parse import parse
from btc_anomaly.processing.scoring_query import SCORING_QUERY, champion_exists, start_scoring_query
from btc_anomaly.processing.sinks import (
    TRANSACTIONS,
    BatchResult,
    Lake,
    compact,
    ensure_tables,
    inserted_transactions,
    streaming_query_id,
    write_batch,
)
from btc_anomaly.processing.stored_hashes import StoredHashes

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.streaming import StreamingQuery

log = logging.getLogger(__name__)

TX_QUERY = "transactions"
STATS_QUERY = "tx_stats"
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
STOP_TIMEOUT_S = 60.0


def kafka_source(spark: SparkSession, settings: Settings) -> DataFrame:
    reader = (
        spark.readStream.format("kafka")
        .option("kafka.bootstrap.servers", settings.kafka_bootstrap)
        .option("subscribe", settings.topic)
        .option("startingOffsets", settings.stream_starting_offsets)
        .option("failOnDataLoss", str(settings.stream_fail_on_data_loss).lower())
        .option("includeHeaders", "false")
        .option("kafka.fetch.max.wait.ms", str(settings.stream_kafka_fetch_max_wait_ms))
    )
    if settings.stream_max_offsets_per_trigger > 0:
        reader = reader.option("maxOffsetsPerTrigger", str(settings.stream_max_offsets_per_trigger))
    if settings.stream_max_records_per_task > 0:
        reader = reader.option("maxRecordsPerPartition", str(settings.stream_max_records_per_task))
    return reader.load()


def trigger_options(interval_s: float, available_now: bool) -> dict[str, object]:
    if available_now:
        return {"availableNow": True}
    return {"processingTime": f"{max(interval_s, 0.0)} seconds"}


BatchHook = Callable[[int, BatchResult], None]


def start_transactions_query(
    spark: SparkSession,
    settings: Settings,
    lake: Lake,
    *,
    available_now: bool = False,
    on_batch: BatchHook | None = None,
) -> StreamingQuery:
    compactor = Compactor(lake.table(TRANSACTIONS), settings.stream_compact_every)
    # One index per query run: it is loaded from the table by the run's first batch (stored_hashes.py).
    stored = StoredHashes()

    def handle(batch: DataFrame, batch_id: int) -> None:
        started = time.perf_counter()
        result = write_batch(
            batch,
            lake,
            batch_id,
            streaming_query_id(batch.sparkSession),
            stored,
            settings.stream_dedup_lookback_days,
        )
        compactor.wrote(result.oldest)
        STREAM_QUARANTINED.inc(result.quarantined)
        log.info(
            "batch %d: %d inserted, %d updated, %d quarantined in %.2f s (%s)",
            batch_id,
            result.inserted,
            result.updated,
            result.quarantined,
            time.perf_counter() - started,
            ", ".join(f"{k} {v:.2f}" for k, v in result.seconds.items()),
        )
        if on_batch is not None:
            on_batch(batch_id, result)
        compactor.run_if_due(batch.sparkSession)

    return (
        parse(kafka_source(spark, settings))
        .writeStream.queryName(TX_QUERY)
        .option("checkpointLocation", lake.checkpoint(TX_QUERY))
        .trigger(**trigger_options(settings.stream_trigger_s, available_now))
        .foreachBatch(handle)
        .start()
    )


@dataclass
class Compactor:
    """Compacts the date partitions the transactions query wrote, every ``every`` batches that wrote.

    A small batch writes one file, and every reader, index load and MERGE opens the files of the
    partitions it reads, so they must not pile up. Compacting in the query's own batch handler,
    between two batches, never competes with the query's commits, and the batch that trips it is not
    slowed by a rewrite inside its own commit (Delta's auto compaction, see
    sinks.TRANSACTIONS_PROPERTIES)."""

    path: str
    every: int
    since: dt.date | None = None  # oldest partition written since the last compaction
    batches: int = 0  # batches that wrote since the last compaction

    def wrote(self, oldest: dt.date | None) -> None:
        if oldest is not None:
            self.since = oldest if self.since is None else min(self.since, oldest)
            self.batches += 1

    def run_if_due(self, spark: SparkSession) -> None:
        if self.every <= 0 or self.since is None or self.batches < self.every:
            return
        started = time.perf_counter()
        try:
            replaced = compact(spark, self.path, self.since)
        except Exception:
            # Maintenance only: the batch is written, so the stream goes on; retried after ``every`` more.
            log.exception("compaction of transactions from %s failed", self.since)
            self.batches = 0
            return
        log.info(
            "compacted transactions from %s: %d files replaced in %.2f s",
            self.since,
            replaced,
            time.perf_counter() - started,
        )
        self.since = None
        self.batches = 0


def start_stats_query(
    spark: SparkSession, settings: Settings, lake: Lake, *, available_now: bool = False
) -> StreamingQuery:
    paths = {g: lake.table(name) for g, name in GRANULARITIES_S.items()}
    inserts = inserted_transactions(
        spark, lake, ["first_seen", "output_value", "fee", "vsize", "input_count", "output_count"]
    )

    def handle(batch: DataFrame, batch_id: int) -> None:
        started = time.perf_counter()
        upserted = upsert_stats(batch, paths)
        log.info(
            "stats batch %d: %d window rows upserted in %.2f s",
            batch_id,
            upserted,
            time.perf_counter() - started,
        )

    return (
        windowed(inserts, settings.stream_watermark)
        .writeStream.queryName(STATS_QUERY)
        .outputMode("update")
        .option("checkpointLocation", lake.checkpoint(STATS_QUERY))
        .trigger(**trigger_options(settings.stream_stats_trigger_s, available_now))
        .foreachBatch(handle)
        .start()
    )


def stop_gracefully(query: StreamingQuery, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Stop between micro-batches when possible: stopping interrupts a running batch, which is safe
    (it is replayed on restart) but wastes its work and makes Spark log the interruption at length."""
    deadline = time.monotonic() + timeout_s
    while query.isActive and query.status.get("isTriggerActive") and time.monotonic() < deadline:
        time.sleep(0.1)
    if query.isActive:
        query.stop()


@dataclass
class StreamRunner:
    """Starts, supervises and stops the queries of `btc-anomaly stream`."""

    settings: Settings
    spark: SparkSession
    on_batch: BatchHook | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        # The supervisor loop checks the registry for a champion: an outage must not hold it (and the
        # restart of a failed query) in MLflow's default retries, which back off for minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.lake = Lake.from_settings(self.settings)
        self.lake.root.mkdir(parents=True, exist_ok=True)
        ensure_tables(self.spark, self.lake)

    def run_available_now(self, stats: bool = True, scoring: bool | None = False) -> None:
        """Drain what Kafka holds now into the lake, then return (tests, backfills, batch jobs).

        ``scoring``: also score the new rows (None = when enabled in Settings and a champion exists)."""
        q = start_transactions_query(
            self.spark, self.settings, self.lake, available_now=True, on_batch=self.on_batch
        )
        q.awaitTermination()
        if stats:
            s = start_stats_query(self.spark, self.settings, self.lake, available_now=True)
            s.awaitTermination()
        if scoring is None:
            scoring = self.settings.stream_scoring and champion_exists(self.settings)
        if scoring:
            start_scoring_query(self.spark, self.settings, self.lake, available_now=True).awaitTermination()

    def run_forever(self) -> None:
        """Run the queries until ``stop_event`` is set (scoring from the first champion on); restart a
        failed query from its checkpoint."""
        starters: dict[str, Callable[[], StreamingQuery]] = {
            TX_QUERY: lambda: start_transactions_query(
                self.spark, self.settings, self.lake, on_batch=self.on_batch
            ),
            STATS_QUERY: lambda: start_stats_query(self.spark, self.settings, self.lake),
            SCORING_QUERY: lambda: start_scoring_query(self.spark, self.settings, self.lake),
        }
        queries = {name: starters[name]() for name in (TX_QUERY, STATS_QUERY)}
        failures = dict.fromkeys(starters, 0)
        restart_at: dict[str, float] = {}
        next_champion_check = 0.0
        try:
            while not self.stop_event.is_set():
                self.stop_event.wait(1.0)
                if (
                    self.settings.stream_scoring
                    and SCORING_QUERY not in queries
                    and time.monotonic() >= next_champion_check
                ):
                    # Scoring waits for the first champion (no model is not an error: see scoring_query).
                    next_champion_check = time.monotonic() + self.settings.model_reload_s
                    if champion_exists(self.settings):
                        queries[SCORING_QUERY] = starters[SCORING_QUERY]()
                        log.info("champion found: scoring query started")
                for name, q in list(queries.items()):
                    if q.isActive:
                        if q.lastProgress and q.lastProgress.get("numInputRows", 0) > 0:
                            failures[name] = 0
                        continue
                    if name not in restart_at:
                        exc = q.exception()
                        wait = RESTART_BACKOFF_S[min(failures[name], len(RESTART_BACKOFF_S) - 1)]
                        failures[name] += 1
                        log.error("query %s stopped (%s); restarting in %.0f s", name, exc, wait)
                        restart_at[name] = time.monotonic() + wait
                    elif time.monotonic() >= restart_at[name] and not self.stop_event.is_set():
                        del restart_at[name]
                        try:
                            queries[name] = starters[name]()
                            log.info("query %s restarted from its checkpoint", name)
                        except Exception:
                            log.exception("query %s could not restart", name)
                            restart_at[name] = time.monotonic() + RESTART_BACKOFF_S[-1]
        finally:
            for q in queries.values():
                stop_gracefully(q)


def run_stream(
    settings: Settings, *, available_now: bool = False, stop: threading.Event | None = None
) -> None:
    """Entry point of `btc-anomaly stream`: Spark session, tables, listener + metrics, queries."""
    from btc_anomaly.processing.metrics_listener import install_listener
    from btc_anomaly.processing.spark_session import build_session

    spark = build_session(settings)
    listener = install_listener(spark, settings.stream_metrics_port)
    try:
        runner = StreamRunner(settings, spark, stop_event=stop or threading.Event())
        log.info(
            "streaming %s @ %s into %s (checkpoints %s)",
            settings.topic,
            settings.kafka_bootstrap,
            runner.lake.root,
            runner.lake.checkpoints,
        )
        if available_now:
            runner.run_available_now(scoring=None)
        else:
            runner.run_forever()
    finally:
        # Detach the Python listener before the JVM goes: it would call back into a closing interpreter.
        spark.streams.removeListener(listener)
        spark.stop()
