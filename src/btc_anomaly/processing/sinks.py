"""The Delta tables of the lake and the per-micro-batch writes of the transactions query.

``transactions`` (partitioned by ``date`` = UTC date of ``first_seen``, a generated column so any Spark
filter on ``first_seen`` prunes partitions too; change data feed on, read by the aggregates query):

* the stream's state store lets through the first copy of each hash (dedup.py), which is appended;
* the first confirmed copy of a hash stored unconfirmed sets its ``block_height`` (an update MERGE,
  only when one can change a row); nothing else is ever updated, so a later unconfirmed copy cannot
  null it out.

``quarantine``: every record that is not a valid canonical transaction, with the raw Kafka bytes, the
reasons, and topic/partition/offset/timestamp, appended.

Exactly once. Spark's Kafka source writes the offsets of batch N to the checkpoint before running it
and marks N committed after, so after a crash the same batch N (same offsets, same records) runs
again, against the state store as it was before N (its versions live in the same checkpoint), so
the dedup lets the same hashes through. The append of batch N is marked with the streaming query id
(it lives in the checkpoint) and N in the commit's ``userMetadata``; the replayed batch, the first of
a query run, finds its marker and skips the append (``append_marker``). The update MERGE and the
quarantine append carry Delta's transaction identifier (``txnAppId`` = query id + table + step,
``txnVersion`` = N): Delta skips a write it has already committed for that app id. So a replay
commits only what the crash cut off. The update MERGE is also harmless to re-run on its own (it only
fills a null ``block_height``).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from btc_anomaly.config import Settings
from btc_anomaly.processing import tables
from btc_anomaly.processing.dedup import CONFIRM, DEDUP_KEY, INSERT, ROLE
from btc_anomaly.processing.dedup import QUARANTINE as QUARANTINE_ROLE
from btc_anomaly.processing.parse import ERRORS, transaction_columns

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

TRANSACTIONS = tables.TRANSACTIONS
QUARANTINE = tables.QUARANTINE
STATS_1M = tables.STATS_1M
STATS_5M = tables.STATS_5M

SMALL_BATCH_ROWS = 20_000
_TXN_APP_ID = "spark.databricks.delta.write.txnAppId"
_TXN_VERSION = "spark.databricks.delta.write.txnVersion"
# Delta copies a MERGE source it cannot prove deterministic; ours is a locally checkpointed batch.
_MATERIALIZE_SOURCE = "spark.databricks.delta.merge.materializeSource"


@dataclass(frozen=True)
class Lake:
    """Paths of the lake's tables and of the streaming checkpoints, derived from Settings."""

    root: Path
    checkpoints: Path

    @classmethod
    def from_settings(cls, settings: Settings) -> Lake:
        return cls(settings.lake_dir, settings.checkpoint_path)

    def table(self, name: str) -> str:
        return str(self.root / name)

    def checkpoint(self, query: str) -> str:
        return str(self.checkpoints / query)


def inserted_transactions(spark: SparkSession, lake: Lake, columns: list[str]) -> DataFrame:
    """Streaming rows newly inserted into ``transactions`` (its change data feed, inserts only): each
    distinct hash once, after dedup — the source of the window and scoring queries."""
    return (
        spark.readStream.format("delta")
        .option("readChangeFeed", "true")
        .load(lake.table(TRANSACTIONS))
        .where("_change_type = 'insert'")
        .select(*columns)
    )


# --- table definitions -------------------------------------------------------------------------------


def _nested_nullable(data_type: Any) -> Any:
    from pyspark.sql import types as T

    if isinstance(data_type, T.ArrayType):
        return T.ArrayType(_nested_nullable(data_type.elementType), True)
    if isinstance(data_type, T.StructType):
        return T.StructType(
            [T.StructField(f.name, _nested_nullable(f.dataType), True) for f in data_type.fields]
        )
    return data_type


TRANSACTIONS_PROPERTIES = {
    # Read by the aggregates query: every inserted row exactly once, after dedup.
    "delta.enableChangeDataFeed": "true",
    # A 1 s trigger adds a small file per batch, but Delta's auto compaction runs inside the commit
    # that trips it: it rewrote a 200,000-row backfill batch right after writing it (+2.3 s, half the
    # write). The stream compacts every ``Settings.stream_compact_every`` batches instead (``compact``).
    "delta.autoOptimize.autoCompact": "false",
    # Writing a log checkpoint adds ~1 s to the batch that triggers it: every 10th batch (the default)
    # put the 1 s-trigger latency p95 over 3 s. Replaying up to 50 small JSON commits instead costs a
    # few ms per snapshot.
    "delta.checkpointInterval": "50",
}


def spark_type(schema: pa.Schema) -> Any:
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(schema)


def ensure_tables(spark: SparkSession, lake: Lake) -> None:
    """Create the lake's tables when missing (idempotent; the streams start only on existing tables)."""
    from delta.tables import DeltaTable

    builder = DeltaTable.createIfNotExists(spark).location(lake.table(TRANSACTIONS))
    for f in spark_type(tables.transactions_schema()).fields:
        if f.name == tables.DATE_COLUMN:
            # Generated: Spark readers filtering on first_seen get date-partition pruning for free.
            source = tables.PARTITION_SOURCE[f.name]
            builder = builder.addColumn(f.name, f.dataType, generatedAlwaysAs=f"CAST({source} AS DATE)")
        else:
            # Delta enforces top-level NOT NULL but rejects it inside arrays; parse.py checks those.
            builder = builder.addColumn(f.name, _nested_nullable(f.dataType), nullable=f.nullable)
    builder = builder.partitionedBy(*tables.PARTITION_COLUMNS[TRANSACTIONS])
    for key, value in TRANSACTIONS_PROPERTIES.items():
        builder = builder.property(key, value)
    builder.execute()
    # A lake created by an older version gets today's properties (one commit, only when they differ).
    current = DeltaTable.forPath(spark, lake.table(TRANSACTIONS)).detail().first()["properties"] or {}
    changed = {k: v for k, v in TRANSACTIONS_PROPERTIES.items() if current.get(k) != v}
    if changed:
        assignments = ", ".join(f"'{k}' = '{v}'" for k, v in changed.items())
        spark.sql(f"ALTER TABLE delta.`{lake.table(TRANSACTIONS)}` SET TBLPROPERTIES ({assignments})")
    for name in (QUARANTINE, STATS_1M, STATS_5M):
        builder = DeltaTable.createIfNotExists(spark).location(lake.table(name))
        for f in spark_type(tables.SCHEMAS[name]()).fields:
            builder = builder.addColumn(f.name, _nested_nullable(f.dataType), nullable=f.nullable)
        builder.execute()


# --- idempotent writes ---------------------------------------------------------------------------------


def streaming_query_id(spark: SparkSession) -> str:
    """Id of the streaming query running the current foreachBatch call (persisted in its checkpoint)."""
    qid = spark.sparkContext.getLocalProperty("sql.streaming.queryId")
    if not qid:
        raise RuntimeError("not inside a streaming foreachBatch: no sql.streaming.queryId")
    return qid


class _TxnConf:
    """Delta's idempotent-DML identifiers on the stream's own (cloned) session, for one operation."""

    def __init__(self, spark: SparkSession, app_id: str, version: int) -> None:
        self.spark, self.app_id, self.version = spark, app_id, version

    def __enter__(self) -> None:
        self.spark.conf.set(_TXN_APP_ID, self.app_id)
        self.spark.conf.set(_TXN_VERSION, str(self.version))

    def __exit__(self, *exc: object) -> None:
        self.spark.conf.unset(_TXN_APP_ID)
        self.spark.conf.unset(_TXN_VERSION)


@dataclass
class BatchResult:
    inserted: int = 0
    updated: int = 0
    quarantined: int = 0
    oldest: dt.date | None = None  # earliest date partition the batch wrote to (None: wrote nothing)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


def _merge(spark: SparkSession, build: Any, path: str, app_id: str, batch_id: int) -> dict[str, int]:
    """Run one MERGE under the batch's transaction identifier; its row counts (0 if already committed)."""
    from delta.tables import DeltaTable

    table = DeltaTable.forPath(spark, path)
    with _TxnConf(spark, app_id, batch_id):
        spark.conf.set(_MATERIALIZE_SOURCE, "none")
        try:
            # Delta returns num_affected/updated/deleted/inserted_rows; nothing when it skipped the
            # write because this (app id, batch id) was committed by an earlier run of the batch.
            row = build(table.alias("t")).execute().first()
        finally:
            spark.conf.unset(_MATERIALIZE_SOURCE)
    return {k: int(v or 0) for k, v in row.asDict().items()} if row is not None else {}


def _has_unconfirmed_match(spark: SparkSession, path: str, confirmed: DataFrame, scope: str) -> bool:
    """Is any confirmed hash of the batch stored without a block height?

    When not, the update MERGE (a second Delta transaction, with its fixed cost) is skipped. Delta's
    statistics skip every file whose block_height null count is 0, so this reads only files holding
    unconfirmed rows; the batch's hashes are broadcast, the table is not shuffled.
    """
    from pyspark.sql import functions as F

    unconfirmed = (
        spark.read.format("delta").load(path).where(f"block_height IS NULL AND {scope}").select("hash")
    )
    if unconfirmed.isEmpty():
        return False
    return not unconfirmed.join(F.broadcast(confirmed.select("hash")), "hash", "left_semi").isEmpty()


def confirm_transactions(
    confirmed: DataFrame,
    path: str,
    app_id: str,
    batch_id: int,
    result: BatchResult,
    since: dt.date | None = None,
) -> None:
    """Set ``block_height`` of stored unconfirmed rows from ``confirmed`` (hash, block_height) rows.

    The ON clause carries ``t.block_height IS NULL``, which Delta also uses to skip (by null-count
    statistics) every file without unconfirmed rows, so only files that really change are scanned and
    rewritten; the check before it spares the MERGE's fixed cost when nothing would change.
    ``since``: only date partitions from this day on are searched (None: all).
    """
    spark = confirmed.sparkSession
    scope = from_date(since) if since is not None else "TRUE"
    with result.phase("update_check"):
        if not _has_unconfirmed_match(spark, path, confirmed, scope):
            return
    t_scope = from_date(since, "t.") if since is not None else "TRUE"
    with result.phase("update_merge"):
        m = _merge(
            spark,
            lambda t: t.merge(
                confirmed.alias("s"), f"t.hash = s.hash AND t.block_height IS NULL AND {t_scope}"
            ).whenMatchedUpdate(set={"block_height": "s.block_height"}),
            path,
            f"{app_id}:update",
            batch_id,
        )
    result.updated = m.get("num_updated_rows", 0)


def from_date(since: dt.date, prefix: str = "") -> str:
    """SQL predicate: date partitions from ``since`` on (``prefix``: the table alias, e.g. ``t.``)."""
    return f"{prefix}{tables.DATE_COLUMN} >= DATE'{since.isoformat()}'"


def compact(spark: SparkSession, path: str, since: dt.date | None) -> int:
    """Bin-pack the small files of ``transactions``' date partitions from ``since`` on (all when None);
    returns the number of files it replaced. A compaction changes no data (``dataChange=false``): the
    change feed readers skip it, and Delta's readers keep their snapshot."""
    from delta.tables import DeltaTable

    optimize = DeltaTable.forPath(spark, path).optimize()
    if since is not None:
        optimize = optimize.where(from_date(since))
    metrics = optimize.executeCompaction().first()
    return int(metrics["metrics"]["numFilesRemoved"]) if metrics is not None else 0


def quarantine_frame(invalid: DataFrame) -> DataFrame:
    """The quarantine's columns for parsed records that are not valid transactions."""
    from pyspark.sql import functions as F

    return invalid.select(
        "key",
        "value",
        F.array_join(ERRORS, "; ").alias("error"),
        ERRORS,
        "topic",
        "partition",
        "offset",
        F.col("timestamp").alias("kafka_timestamp"),
        F.current_timestamp().alias("quarantined_at"),
    )


def write_batch(
    rows: DataFrame,
    lake: Lake,
    batch_id: int,
    app_id: str,
    lookback_days: int = 0,
    *,
    maybe_replayed: bool = True,
) -> BatchResult:
    """Write one micro-batch of ``dedup.dedup_stream`` rows: append, confirm, quarantine.

    The batch is read from Kafka, parsed and deduplicated once, and kept (a local checkpoint,
    serialized rows) with the raw bytes of quarantined records only; on the way, its roles are
    counted. Every later step reads that copy — and must: each run of the plan would also run the
    state store's dedup again. Then, each step under its own transaction identifier:

    1. the ``insert`` rows are appended (each is the first copy of its hash: no anti-join against
       the table, no MERGE); see ``append_marker`` for how a replayed batch is not appended twice;
    2. the ``confirm`` rows update stored unconfirmed rows (``confirm_transactions``) — skipped when
       every one confirms a hash this same batch appended confirmed, as in a replay of blocks;
    3. the ``quarantine`` rows are appended to ``quarantine``.

    The append goes before the update so that an unconfirmed copy and its confirmation in the same
    batch end as one confirmed row. ``maybe_replayed``: the batch may have run before (the first batch
    of a query run; Spark never runs a later one twice within a run). ``inserted`` counts the batch's insert rows, also when a replay
    of the batch finds them committed already.

    The parse and the dedup belong to the streaming query's plan, not to this function: built and
    analyzed once at query start instead of once per micro-batch (building the parse's few hundred
    expressions through py4j takes most of a second).
    """
    from pyspark import StorageLevel
    from pyspark.sql import Observation
    from pyspark.sql import functions as F

    result = BatchResult()
    counts = Observation(f"batch-{batch_id}")
    role = F.col(ROLE)
    inserted, confirming = role == INSERT, role == CONFIRM
    confirmed_insert = inserted & F.col("block_height").isNotNull()
    with result.phase("stage"):
        quarantined = role == QUARANTINE_ROLE
        staged = (
            rows.select(
                *[c for c in rows.columns if c not in ("key", "value", DEDUP_KEY)],
                # Raw bytes are kept for the quarantine only: half the size of the batch copy.
                F.when(quarantined, F.col("key")).alias("key"),
                F.when(quarantined, F.col("value")).alias("value"),
                F.current_timestamp().alias("ingested_at"),
            )
            .observe(
                counts,
                F.count(F.when(quarantined, True)).alias("quarantined"),
                F.count(F.when(inserted, True)).alias("inserts"),
                F.count(F.when(confirming, True)).alias("confirms"),
                F.count(F.when(confirmed_insert, True)).alias("confirmed_inserts"),
                # Hashes confirmed or appended confirmed, in the same pass (no job of its own): equal to
                # the confirmed inserts when every confirmation is of a hash appended confirmed here.
                F.size(F.collect_set(F.when(confirming | confirmed_insert, F.col("hash")))).alias(
                    "confirmed_hashes"
                ),
                F.min(F.when(inserted, F.to_date("first_seen"))).alias("oldest_insert"),
                F.min(F.when(confirming, F.to_date("first_seen"))).alias("oldest_confirm"),
            )
            .localCheckpoint(eager=True, storageLevel=StorageLevel.MEMORY_AND_DISK)
        )
        observed = counts.get
    try:
        path = lake.table(TRANSACTIONS)
        inserts = result.inserted = int(observed["inserts"])
        marker = append_marker(app_id, batch_id)
        if inserts and not (maybe_replayed and marker in recent_markers(staged.sparkSession, path)):
            with result.phase("append"):
                source = staged.where(inserted).select(*transaction_columns(), "ingested_at")
                if inserts < SMALL_BATCH_ROWS:
                    source = source.coalesce(1)  # one file per small batch, not one per Kafka partition
                source.write.format("delta").mode("append").option("userMetadata", marker).save(path)
            result.oldest = observed["oldest_insert"]
        if int(observed["confirms"]) and int(observed["confirmed_hashes"]) != int(
            observed["confirmed_inserts"]
        ):
            oldest = observed["oldest_confirm"]
            confirm_transactions(
                staged.where(confirming).select("hash", "block_height"),
                path,
                f"{app_id}:{TRANSACTIONS}",
                batch_id,
                result,
                since=oldest - dt.timedelta(days=lookback_days) if lookback_days and oldest else None,
            )
            if result.updated:
                result.oldest = min(d for d in (result.oldest, oldest) if d is not None)
        result.quarantined = int(observed["quarantined"])
        if result.quarantined:
            with result.phase("quarantine"):
                (
                    quarantine_frame(staged.where(quarantined))
                    .write.format("delta")
                    .mode("append")
                    .option("txnAppId", f"{app_id}:{QUARANTINE}")
                    .option("txnVersion", batch_id)
                    .save(lake.table(QUARANTINE))
                )
    finally:
        release(staged)
    return result


# Commits after a batch's append, before its checkpoint commit: its update MERGE and a compaction.
MARKER_HISTORY = 20


def append_marker(app_id: str, batch_id: int) -> str:
    """The ``userMetadata`` of the commit appending batch ``batch_id`` of the query ``app_id``.

    Why not Delta's transaction identifier (``txnAppId``/``txnVersion``), as for the other writes:
    looking it up makes Delta rebuild the table's transaction list from the log, three Spark jobs and
    ~0.45 s on every append (measured, bench/RESULTS.md) — half of a 1 s trigger. A replay can only be
    the first batch of a query run, so only that one looks for its marker in the last commits."""
    return f"{app_id}:{TRANSACTIONS}:append:{batch_id}"


def recent_markers(spark: SparkSession, path: str) -> set[str]:
    """The ``userMetadata`` of the table's last ``MARKER_HISTORY`` commits (read from the log, no job)."""
    from delta.tables import DeltaTable

    rows = DeltaTable.forPath(spark, path).history(MARKER_HISTORY).select("userMetadata").collect()
    return {r["userMetadata"] for r in rows if r["userMetadata"]}


def release(checkpointed: DataFrame) -> None:
    """Free the blocks of a local checkpoint now instead of at the next JVM garbage collection."""
    try:
        checkpointed._jdf.queryExecution().analyzed().rdd().unpersist(False)
    except Exception:  # not a LogicalRDD (e.g. Spark Connect): the context cleaner frees it later
        log.debug("could not release a local checkpoint", exc_info=True)
