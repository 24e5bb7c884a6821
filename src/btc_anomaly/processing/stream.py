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

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from btc_anomaly.config import Settings
from btc_anomaly.monitoring.metrics import STREAM_QUARANTINED
from btc_anomaly.processing.aggregates import GRANULARITIES_S, upsert_stats, windowed
from btc_anomaly.processing.maintenance import Compactor, Vacuum
from btc_anomaly.processing.parse import parse
from btc_anomaly.processing.scoring_query import SCORING_QUERY, champion_exists, start_scoring_query
from btc_anomaly.processing.sinks import (
    TRANSACTIONS,
    BatchResult,
    Lake,
    ensure_tables,
    inserted_transactions,
    streaming_query_id,
    write_batch,
)
from btc_anomaly.processing.stored_hashes import StoredHashes
from btc_anomaly.processing.tables import ADDRESS_INDEX, INDEX_TABLES

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.streaming import StreamingQuery

log = logging.getLogger(__name__)

TX_QUERY = "transactions"
STATS_QUERY = "tx_stats"
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
STOP_TIMEOUT_S = 60.0  # a micro-batch still running after this is cut off (replayed on restart)


class StreamFailed(RuntimeError):
    """A query failed in a way its restart from the checkpoint cannot fix: the operator has to act."""


# How Spark's Kafka source says it: an error class (offsets planned on the driver) or the consumer's
# message in a task (offsets fetched by the batch).
DATA_LOSS_MARKS = ("KAFKA_DATA_LOSS", "failOnDataLoss", "Some data may have been lost")


def data_loss_error(settings: Settings, error: object) -> StreamFailed | None:
    """The StreamFailed for a Kafka source error that says records were lost before the stream read
    them (``stream_fail_on_data_loss``), else None. Spark would fail the same way on every restart."""
    text = str(error)
    if not any(mark in text for mark in DATA_LOSS_MARKS):
        return None
    lines = text.splitlines()
    detail = next((line for line in lines if any(m in line for m in DATA_LOSS_MARKS)), lines[0])
    return StreamFailed(
        f"Kafka no longer holds records of {settings.topic} that the stream had not read yet (the topic "
        f"was deleted and recreated, or retention deleted them first): {detail.strip()[:400]}. Stopped, "
        "as stream_fail_on_data_loss=true says. Replay the lost records from their source if possible; "
        "then, after retention, restart once with BTC_ANOMALY_STREAM_FAIL_ON_DATA_LOSS=false to skip the "
        "gap; after the topic was recreated, remove the transactions query's checkpoint "
        f"({Lake.from_settings(settings).checkpoint(TX_QUERY)}) instead: the stream then reads the new "
        "topic from stream_starting_offsets, and the lake stores a transaction it reads twice once "
        "(Spark would skip the new topic's records up to the old offsets)."
    )


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
    stopping: threading.Event | None = None,
) -> StreamingQuery:
    # This query's handler also VACUUMs every table of the stream: it runs from the first record on,
    # with or without a champion (the scoring query waits for one).
    compactor = Compactor(
        lake.table(TRANSACTIONS),
        settings.stream_compact_every,
        Vacuum.for_stream(settings, lake, INDEX_TABLES),
        row_group_rows=settings.lake_row_group_rows,
        index=lake.table(ADDRESS_INDEX),
    )
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
        parse(kafka_source(spark, settings), max_skew_s=settings.first_seen_max_skew_s)
        .writeStream.queryName(TX_QUERY)
        .option("checkpointLocation", lake.checkpoint(TX_QUERY))
        .trigger(**trigger_options(settings.stream_trigger_s, available_now))
        .foreachBatch(interruptible(handle, stopping or threading.Event()))
        .start()
    )


def start_stats_query(
    spark: SparkSession,
    settings: Settings,
    lake: Lake,
    *,
    available_now: bool = False,
    stopping: threading.Event | None = None,
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
        .foreachBatch(interruptible(handle, stopping or threading.Event()))
        .start()
    )


# What Spark's StreamExecution.isInterruptionException looks for in an error of a foreachBatch function
# (a Py4J error whose message names an interruption): the query then ends as stopped, not failed.
INTERRUPTED = (
    "py4j.protocol.Py4JJavaError: An error occurred while calling stop: java.lang.InterruptedException"
)


class BatchInterrupted(Exception):
    """A micro-batch cut off by the stop of its query; nothing of it is committed and it is run again
    on restart."""


class BatchFailed(Exception):
    """A micro-batch that failed, summarised. Spark matches the message of a foreachBatch failure with
    a regular expression (StreamExecution.isInterruptionException) that overflows the JVM's stack on
    a long one — a Python traceback around a Java one is — and the query thread then dies of a
    StackOverflowError instead of failing with its error. The full error is logged here, once."""


def batch_error_summary(error: BaseException, limit: int = 2000) -> str:
    """The first two lines of ``error`` (a Py4J error: the call, then the Java exception) and each
    ``Caused by:`` line of its Java cause chain, shortened."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    kept = lines[:2] + [line for line in lines[2:] if line.startswith("Caused by:")]
    return " | ".join(line[:500] for line in kept)[:limit] or type(error).__name__


class _QuietBatchErrors(logging.Filter):
    """Py4J logs every exception of a Python callback at ERROR with its traceback: an interrupted batch
    is the expected end of a run, and a failed one is logged by ``interruptible`` already."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], BatchInterrupted | BatchFailed))


logging.getLogger("py4j.clientserver").addFilter(_QuietBatchErrors())


class BatchGate(threading.Event):
    """The stop protocol of a runner's queries: set (like the plain Event it is) once ``stop_all`` stops
    them, so the handlers it cuts off end quietly; before that, ``drain`` makes each handler that starts
    afterwards wait at its entry, doing nothing, until its query is stopped.

    A query running batches back to back starts its next one the moment the previous commits: without
    the gate the stop cancels that batch's Spark jobs mid-write (Delta "Aborting job", Arrow "Memory
    was leaked", InterruptedException traces from Spark's own loggers). Parked, the batch has run no job
    yet: the stop ends it quietly and its offsets, planned but not committed, are run again on restart."""

    PARK_LIMIT_S = 300.0  # a parked handler gives up (fails its batch) if no stop comes by then

    def __init__(self) -> None:
        super().__init__()
        self.draining = threading.Event()
        self._lock = threading.Lock()
        self._parked: set[str] = set()
        self._queries: dict[str, StreamingQuery] = {}

    def drain(self, queries: list[StreamingQuery]) -> None:
        with self._lock:
            self._queries.update({str(q.id): q for q in queries})
        self.draining.set()

    def park(self, query_id: str) -> None:
        """Hold the calling handler until its query is stopped (``stop_all``), then return."""
        with self._lock:
            self._parked.add(query_id)
            query = self._queries.get(query_id)
        deadline = time.monotonic() + self.PARK_LIMIT_S
        # stop() marks the query terminated before it waits for this batch: only then may the handler
        # fail, or Spark takes the failure for the query's own (StreamExecution.isInterruptedByStop).
        while time.monotonic() < deadline and not (self.is_set() and (query is None or not query.isActive)):
            time.sleep(0.05)

    def parked(self, query: StreamingQuery) -> bool:
        with self._lock:
            return str(query.id) in self._parked


def interruptible(
    handler: Callable[[DataFrame, int], None], stopping: threading.Event
) -> Callable[[DataFrame, int], None]:
    """The foreachBatch function ``handler``: its failure once the runner stops its queries (Spark
    cancels the batch's jobs) ends the query as stopped, quietly; any other failure fails the query
    with a summary that Spark can handle (BatchFailed). With a ``BatchGate`` that drains, a batch that
    starts afterwards runs nothing and ends the same quiet way once its query is stopped."""

    def run(batch: DataFrame, batch_id: int) -> None:
        if isinstance(stopping, BatchGate) and stopping.draining.is_set():
            stopping.park(streaming_query_id(batch.sparkSession))
            raise BatchInterrupted(INTERRUPTED)
        try:
            handler(batch, batch_id)
        except Exception as exc:
            if stopping.is_set():
                raise BatchInterrupted(INTERRUPTED) from None
            log.exception("micro-batch %d failed", batch_id)
            raise BatchFailed(batch_error_summary(exc)) from None

    return run


def stop_all(
    queries: list[StreamingQuery], stopping: threading.Event, timeout_s: float = STOP_TIMEOUT_S
) -> None:
    """Let the micro-batch each query is running finish (up to ``timeout_s``), then stop them all.

    With a ``BatchGate`` (the runner's), a query's next batch waits at its handler's entry meanwhile,
    and each query is stopped while idle or parked there, so no work is cut off unless a batch outlasts
    ``timeout_s``. Without one (a query started alone), a query whose batches run back to back starts
    its next batch at once, which the stop then cuts off early: safe (replayed on restart) and quiet in
    Python (``interruptible``)."""
    deadline = time.monotonic() + timeout_s
    gate = stopping if isinstance(stopping, BatchGate) else None
    if gate is not None:
        gate.drain(queries)

    def done(q: StreamingQuery) -> int:
        return int((q.lastProgress or {}).get("batchId", -1))

    def busy(q: StreamingQuery) -> bool:
        """In a trigger (planning, running or committing a batch) and not parked by the gate."""
        return bool(q.isActive and q.status.get("isTriggerActive")) and not (gate and gate.parked(q))

    if gate is not None:
        # Every query, idle ones included: one may begin a trigger meanwhile (and reach the gate).
        while any(busy(q) for q in queries) and time.monotonic() < deadline:
            time.sleep(0.1)
    else:
        running = {id(q): done(q) for q in queries if busy(q)}
        while running and time.monotonic() < deadline:
            time.sleep(0.1)
            running = {
                id(q): b
                for q in queries
                if (b := running.get(id(q))) is not None and busy(q) and done(q) == b
            }
    if time.monotonic() >= deadline:
        log.warning(
            "a micro-batch still runs after %.0f s: stopping it (it runs again on restart)", timeout_s
        )
    stopping.set()
    active = [q for q in queries if q.isActive]
    if active:
        from btc_anomaly.processing.spark_session import CANCELLATION_LOGGERS, quiet

        quiet(*CANCELLATION_LOGGERS)
    for q in active:
        # A query that began a trigger since the wait above is let reach its handler (the gate parks it)
        # or end its trigger: stop() interrupts whatever the query's thread is doing.
        while gate is not None and busy(q) and time.monotonic() < deadline:
            time.sleep(0.02)
        q.stop()


def unreadable_tables(root: Path) -> list[str]:
    """The table folders under ``root`` whose Delta log cannot be read (delta-rs: no JVM, no cache)."""
    from deltalake import DeltaTable

    bad = []
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        try:
            DeltaTable(str(path)).version()
        except Exception as exc:
            bad.append(f"{path} ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})")
    return bad


def stop_gracefully(query: StreamingQuery, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """``stop_all`` of one query started without a runner (bench/bench_stream.py)."""
    stop_all([query], threading.Event(), timeout_s)


def registry_fails_fast() -> None:
    """MLflow's client retries for minutes by default: an outage must not hold the supervisor loop's
    champion check (and the restart of a failed query), nor a scoring batch whose Python workers
    re-check the champion (they keep the loaded one when the registry does not answer), nor a stop.
    Called before the JVM starts, so its Python workers inherit it."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


@dataclass
class StreamRunner:
    """Starts, supervises and stops the queries of `btc-anomaly stream`."""

    settings: Settings
    spark: SparkSession
    on_batch: BatchHook | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)
    # Drained, then set, by stop_all (their handlers then wait, or end quietly).
    stopping: threading.Event = field(default_factory=BatchGate)

    def __post_init__(self) -> None:
        registry_fails_fast()
        self.lake = Lake.from_settings(self.settings)
        self.lake.root.mkdir(parents=True, exist_ok=True)
        try:
            ensure_tables(self.spark, self.lake)
        except Exception as exc:
            # A missing or torn _delta_log (a lost volume, a copy without it): Delta must not start a new
            # table over the old files, and a restart would fail the same way.
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            failed = StreamFailed(
                f"the lake's tables cannot be opened: {', '.join(unreadable_tables(self.lake.root)) or self.lake.root} "
                f"({lines[0][:600] if lines else repr(exc)}). A table whose _delta_log is missing or corrupt "
                "must be restored from a backup (or its folder moved away, to begin it anew from what Kafka "
                "still holds) before the stream starts."
            )
            log.error("%s", failed)
            raise failed from None

    def run_available_now(self, stats: bool = True, scoring: bool | None = False) -> None:
        """Drain what Kafka holds now into the lake, then return (tests, backfills, batch jobs).

        ``scoring``: also score the new rows (None = when enabled in Settings and a champion exists)."""
        if self.stop_event.is_set():
            log.info("stopped before the queries started")
            return
        self._await(
            start_transactions_query(
                self.spark,
                self.settings,
                self.lake,
                available_now=True,
                on_batch=self.on_batch,
                stopping=self.stopping,
            )
        )
        if stats and not self.stop_event.is_set():
            self._await(
                start_stats_query(
                    self.spark, self.settings, self.lake, available_now=True, stopping=self.stopping
                )
            )
        if scoring is None:
            scoring = self.settings.stream_scoring and champion_exists(self.settings)
        if scoring and not self.stop_event.is_set():
            self._await(
                start_scoring_query(
                    self.spark, self.settings, self.lake, available_now=True, stopping=self.stopping
                )
            )

    def _await(self, query: StreamingQuery) -> None:
        """Wait for an availableNow query to drain, or for ``stop_event`` (then stop it like run_forever);
        raise its failure (StreamFailed when Kafka lost records it had not read)."""
        try:
            while not query.awaitTermination(1):
                if self.stop_event.is_set():
                    stop_all([query], self.stopping)
        except Exception as exc:
            failed = data_loss_error(self.settings, exc)
            if failed is None:
                raise
            log.error("%s", failed)
            raise failed from None

    def run_forever(self) -> None:
        """Run the queries until ``stop_event`` is set (scoring from the first champion on); restart a
        failed query from its checkpoint."""
        starters: dict[str, Callable[[], StreamingQuery]] = {
            TX_QUERY: lambda: start_transactions_query(
                self.spark, self.settings, self.lake, on_batch=self.on_batch, stopping=self.stopping
            ),
            STATS_QUERY: lambda: start_stats_query(
                self.spark, self.settings, self.lake, stopping=self.stopping
            ),
            SCORING_QUERY: lambda: start_scoring_query(
                self.spark, self.settings, self.lake, stopping=self.stopping
            ),
        }
        queries: dict[str, StreamingQuery] = {}
        failures = dict.fromkeys(starters, 0)
        restart_at: dict[str, float] = {}
        next_champion_check = 0.0
        try:
            for name in (TX_QUERY, STATS_QUERY):
                # A stop asked for while the stream was starting (Ctrl-C during the JVM's start-up)
                # starts no more queries: none would be of use, and Kafka may be stopping too.
                if self.stop_event.is_set():
                    log.info("stopped before the %s query started", name)
                    break
                queries[name] = starters[name]()
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
                        failed = data_loss_error(self.settings, exc) if exc is not None else None
                        if failed is not None:
                            log.error("query %s stopped: %s", name, failed)
                            raise failed
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
            stop_all(list(queries.values()), self.stopping)
            log.info("queries stopped")


def run_stream(
    settings: Settings, *, available_now: bool = False, stop: threading.Event | None = None
) -> None:
    """Entry point of `btc-anomaly stream`: Spark session, tables, listener + metrics, queries."""
    from btc_anomaly.processing.metrics_listener import install_listener
    from btc_anomaly.processing.spark_session import build_session

    registry_fails_fast()
    spark = build_session(settings)
    listener = install_listener(spark, settings.stream_metrics_port)
    try:
        if stop is not None and stop.is_set():  # signalled while the JVM started: not even the tables
            log.info("stopped before the queries started")
            return
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
