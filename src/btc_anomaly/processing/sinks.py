"""The Delta tables of the lake and the per-micro-batch writes of the transactions query.

``transactions`` (partitioned by ``date`` = UTC date of ``first_seen``, a generated column so any Spark
filter on ``first_seen`` prunes partitions too; change data feed on, read by the aggregates query):

* each micro-batch is deduplicated by hash (earliest copy wins; ``block_height`` = any confirmed copy's),
* rows the query's index of stored hashes (stored_hashes.py) certainly does not hold are appended,
* the others — re-sent copies, confirmations, the rare key collision — are MERGEd by hash: a new hash
  is inserted; a stored unconfirmed tx whose copy is confirmed gets its ``block_height``; nothing else
  is ever updated, so a later unconfirmed copy cannot null it out.

``quarantine``: every record that is not a valid canonical transaction, with the raw Kafka bytes, the
reasons, and topic/partition/offset/timestamp, appended.

Exactly once. Spark's Kafka source writes the offsets of batch N to the checkpoint before running it
and marks N committed after, so after a crash the same batch N (same offsets, same records) runs
again, as the first batch of a new query run. That run's index is loaded from the table, so every row
batch N had appended is found and goes to the MERGE, which does not insert a stored hash. The MERGEs
and the quarantine append carry Delta's transaction identifier (``txnAppId`` = streaming query id +
table + step, the query id living in the checkpoint; ``txnVersion`` = N): Delta skips a write it has
already committed for that app id, so a replay commits only what the crash cut off. The MERGEs are
harmless to re-run anyway (insert only hashes not stored; fill a null ``block_height`` with the same
value); the quarantine append relies on the identifier.

Throughput: see ``write_batch`` (one parse, one materialized copy per batch), ``write_new_transactions``
(a plain append for new hashes) and ``merge_transactions`` (an insert-only MERGE, plus an update MERGE
only when a confirmation can change a stored row).
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

import numpy as np
import pyarrow as pa

from btc_anomaly.config import Settings
from btc_anomaly.processing import tables
from btc_anomaly.processing.parse import ERRORS, is_valid, transaction_columns
from btc_anomaly.processing.stored_hashes import Days, Keys, StoredHashes

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


def dedup_winners(valid: DataFrame) -> DataFrame:
    """For each hash of ``valid`` (parsed rows), the Kafka position of the copy to keep and its block height.

    The copy kept is the earliest (first_seen, then Kafka position); ``block_height`` is the largest of
    any copy, so a confirmed copy wins over an unconfirmed one whatever the order. Only narrow columns
    are shuffled (about 100 bytes a row instead of the whole transaction).
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    w = Window.partitionBy("hash").orderBy("first_seen", "partition", "offset")
    whole = w.rowsBetween(Window.unboundedPreceding, Window.unboundedFollowing)
    return (
        valid.select(
            "partition",
            "offset",
            F.max("block_height").over(whole).alias("best_block_height"),
            F.row_number().over(w).alias("_rn"),
        )
        .where("_rn = 1")
        .drop("_rn")
    )


def dedup_batch(valid: DataFrame, winners: DataFrame) -> DataFrame:
    """``valid`` reduced to the ``winners`` rows (a broadcast join: the wide rows are not shuffled)."""
    from pyspark.sql import functions as F

    return (
        valid.join(F.broadcast(winners), ["partition", "offset"])
        .drop("block_height")
        .withColumnRenamed("best_block_height", "block_height")
    )


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


_EPOCH = dt.date(1970, 1, 1)
_ALL_DAYS = int(np.iinfo(np.int32).min)


def _day(date: dt.date | None) -> int:
    """A date as days since 1970 (Arrow's date32); None (no lower bound) as the smallest."""
    return (date - _EPOCH).days if date is not None else _ALL_DAYS


def _date(day: int) -> dt.date:
    return _EPOCH + dt.timedelta(days=day)


def _keys_and_days(frame: DataFrame) -> tuple[Keys, Days]:
    """(xxhash64 of hash, date) of ``frame``'s rows, collected as Arrow (``frame`` has both columns)."""
    table = frame.toArrow()
    return (
        table["key"].to_numpy().astype(np.int64, copy=False),
        table["date"].cast(pa.int32()).to_numpy().astype(np.int32, copy=False),
    )


def write_new_transactions(
    source: DataFrame, path: str, stored: StoredHashes, since: dt.date | None, result: BatchResult
) -> DataFrame | None:
    """Append the rows of ``source`` (one per hash) that ``stored`` says are certainly not in the table;
    return the others (maybe stored: they need the exact MERGE), or None when there are none.

    The common case, a batch of new transactions, is one plain Delta append: no snapshot state rebuild
    and no anti-join with the table (stored_hashes.py says why that is safe)."""
    from pyspark.sql import functions as F

    spark = source.sparkSession
    first = _day(since)
    missing = stored.to_load(first)
    if missing is not None:
        with result.phase("load_index"):
            start, end = missing
            scope = date_scope(
                None if start == _ALL_DAYS else _date(start), None if end is None else _date(end)
            )
            table = spark.read.format("delta").load(path).where(scope)
            stored.loaded(*_keys_and_days(table.select(_key(), tables.DATE_COLUMN)), first)
    with result.phase("lookup"):
        # The generated partition column's own expression, so the date is the one the row is stored under.
        keys, days = _keys_and_days(
            source.select(_key(), F.col("first_seen").cast("date").alias(tables.DATE_COLUMN))
        )
        hit = stored.contains(keys, first)
        stored.stage(keys, days)
    if hit.all():
        return source
    known, new = None, source
    if hit.any():
        hits = F.broadcast(spark.createDataFrame(pa.table({"_key": keys[hit]})))
        keyed = source.withColumn("_key", _key())
        known = keyed.join(hits, "_key", "left_semi").drop("_key")
        new = keyed.join(hits, "_key", "left_anti").drop("_key")
    with result.phase("append"):
        new.write.format("delta").mode("append").save(path)
    result.inserted += int(len(keys) - hit.sum())
    return known


def _key() -> Any:
    from pyspark.sql import functions as F

    return F.xxhash64("hash").alias("key")


def merge_transactions(
    source: DataFrame,
    path: str,
    app_id: str,
    batch_id: int,
    result: BatchResult | None = None,
    any_confirmed: bool = True,
    since: dt.date | None = None,
) -> BatchResult:
    """MERGE deduplicated rows into ``transactions`` by hash; returns (inserted, updated) rows.

    Two Delta operations instead of one MERGE with both clauses, because Delta rewrites every file
    holding a matched target row — also when the update condition is false for it, as for each
    re-sent copy of a stored tx. So:

    1. confirmed copies update ``block_height`` of stored rows that have none; the ON clause carries
       ``t.block_height IS NULL``, which Delta also uses to skip (by null-count statistics) every file
       without unconfirmed rows, so only files that really change are scanned and rewritten;
    2. an insert-only MERGE (``whenNotMatchedInsert``), which Delta runs as a left-anti join plus an
       append: no file is rewritten, whatever the number of duplicates.

    Updates go first so a row inserted by (2) is never matched by (1) of the same batch (it already
    carries the batch's best block height). Each has its own transaction identifier, so a crash
    between the two replays only the missing one.

    ``since``: only date partitions from this day on are searched for stored copies (partition
    pruning: the cost of a MERGE no longer grows with the whole table); None searches everything.
    """
    spark = source.sparkSession

    result = result if result is not None else BatchResult()
    confirmed = source.where("block_height IS NOT NULL").select("hash", "block_height")
    with result.phase("update_check"):
        to_update = any_confirmed and _has_unconfirmed_match(spark, path, confirmed, date_scope(since))
    if to_update:
        with result.phase("update_merge"):
            m = _merge(
                spark,
                lambda t: t.merge(
                    confirmed.alias("s"),
                    f"t.hash = s.hash AND t.block_height IS NULL AND {date_scope(since, prefix='t.')}",
                ).whenMatchedUpdate(set={"block_height": "s.block_height"}),
                path,
                f"{app_id}:update",
                batch_id,
            )
        result.updated = m.get("num_updated_rows", 0)
    columns = [*transaction_columns(), "ingested_at"]
    with result.phase("insert_merge"):
        m = _merge(
            spark,
            lambda t: t.merge(
                source.alias("s"), f"t.hash = s.hash AND {date_scope(since, prefix='t.')}"
            ).whenNotMatchedInsert(values={c: f"s.{c}" for c in columns}),
            path,
            f"{app_id}:insert",
            batch_id,
        )
    result.inserted += m.get("num_inserted_rows", 0)
    return result


def date_scope(since: dt.date | None, before: dt.date | None = None, prefix: str = "") -> str:
    """SQL predicate: date partitions from ``since`` on and before ``before`` (None: no bound on that
    side; ``prefix``: the table alias, e.g. ``t.``)."""
    column = f"{prefix}{tables.DATE_COLUMN}"
    bounds = [f"{column} >= DATE'{since.isoformat()}'"] if since is not None else []
    if before is not None:
        bounds.append(f"{column} < DATE'{before.isoformat()}'")
    return " AND ".join(bounds) or "TRUE"


def compact(spark: SparkSession, path: str, since: dt.date | None, row_group_rows: int | None = None) -> int:
    """Compact a table's date partitions from ``since`` on (all when None); returns the number of files it
    replaced. A compaction changes no data (``dataChange=false``): the change feed readers skip it, and
    Delta's readers keep their snapshot.

    Files are written in row groups of ``row_group_rows`` rows (``Settings.lake_row_group_rows`` when
    None) with microsecond timestamps (Parquet statistics: Spark's default INT96 has none), so readers skip
    row groups by their statistics. A table with a clustering (``tables.CLUSTERING``) has its partitions
    rewritten whole, one sorted file per partition; the others are bin-packed (Delta OPTIMIZE of the files
    under ``spark.databricks.delta.optimize.minFileSize``)."""
    from delta.tables import DeltaTable

    rows = row_group_rows if row_group_rows is not None else Settings().lake_row_group_rows
    order = tables.CLUSTERING.get(Path(path).name)
    with _parquet_layout(spark, rows):
        if order is not None:
            return _rewrite_clustered(spark, path, since, order)
        optimize = DeltaTable.forPath(spark, path).optimize()
        if since is not None:
            optimize = optimize.where(date_scope(since))
        metrics = optimize.executeCompaction().first()
    return int(metrics["metrics"]["numFilesRemoved"]) if metrics is not None else 0


# The Parquet writer settings of a compaction, on the writing query's own session (Structured Streaming
# runs each query on a clone of the session, so the other queries' writes keep theirs).
_PARQUET_ROW_GROUP_ROWS = "parquet.block.row.count.limit"
_PARQUET_TIMESTAMP = "spark.sql.parquet.outputTimestampType"


@contextmanager
def _parquet_layout(spark: SparkSession, row_group_rows: int) -> Iterator[None]:
    before = {k: spark.conf.get(k, None) for k in (_PARQUET_ROW_GROUP_ROWS, _PARQUET_TIMESTAMP)}
    spark.conf.set(_PARQUET_ROW_GROUP_ROWS, str(row_group_rows))
    spark.conf.set(_PARQUET_TIMESTAMP, "TIMESTAMP_MICROS")
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)


def _rewrite_clustered(
    spark: SparkSession, path: str, since: dt.date | None, order: list[tuple[str, str]]
) -> int:
    """Rewrite the partitions from ``since`` on as one file each, rows in ``order`` (dataChange=false)."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    partitions = list(DeltaTable.forPath(spark, path).detail().first()["partitionColumns"])
    scope = date_scope(since) if since is not None and tables.DATE_COLUMN in partitions else None
    frame = spark.read.format("delta").load(path)
    if scope is not None:
        frame = frame.where(scope)
    replaced = len(frame.inputFiles())
    if replaced == 0:
        return 0
    keys = [
        F.col(c).desc_nulls_last() if direction == "descending" else F.col(c).asc_nulls_last()
        for c, direction in order
        if c in frame.columns
    ]
    if partitions:
        frame = frame.repartition(*partitions).sortWithinPartitions(*partitions, *keys)
    else:
        frame = frame.coalesce(1).sortWithinPartitions(*keys)
    writer = frame.write.format("delta").mode("overwrite").option("dataChange", "false")
    if scope is not None:
        writer = writer.option("replaceWhere", scope)
    writer.partitionBy(*partitions).save(path)
    return replaced


_INDEX_SOURCE_COLUMNS = [
    "hash",
    "first_seen",
    "block_height",
    "ingested_at",
    tables.DATE_COLUMN,
    "inputs",
    "outputs",
]


def build_address_index(
    transactions_path: str, index_path: str, since: dt.date | None, row_group_rows: int | None = None
) -> int:
    """Rebuild ``address_index``'s date partitions from ``since`` on (every partition when None or when
    there is no index yet) from the ``transactions`` rows of those dates; returns the rows written.

    JVM-free (delta-rs), one date at a time (bounded memory), one Delta commit that replaces those dates
    (``predicate``): idempotent, and a crash before the commit leaves the previous index. Each date is
    sorted by ``tables.CLUSTERING`` (address_key first) in row groups of ``row_group_rows``
    (``Settings.lake_row_group_rows`` when None), so a lookup reads about one row group per date file.

    Readers trust the index for the rows ingested up to its newest ``ingested_at`` (its mark) and scan
    ``transactions`` for the later ones (api/lake.py). So a build also covers every date with rows
    ingested since the mark (by the Delta log's statistics), and runs between two writes of
    ``transactions``: in the transactions query's compaction (maintenance.Compactor)."""
    import pyarrow.compute as pc
    from deltalake import DeltaTable, WriterProperties, write_deltalake

    from btc_anomaly.processing.delta_reader import newest, scan

    rows_per_group = row_group_rows if row_group_rows is not None else Settings().lake_row_group_rows
    source = DeltaTable(transactions_path)
    actions = pa.table(source.get_add_actions(flatten=True))
    name = f"partition.{tables.DATE_COLUMN}"
    all_dates = actions[name].to_pylist() if name in actions.column_names else []
    mark = newest(DeltaTable(index_path), "ingested_at") if DeltaTable.is_deltatable(index_path) else None
    if mark is None:
        since = None  # no index yet (or an empty one): every date
    elif since is not None and "max.ingested_at" in actions.column_names:
        # Also every date holding rows ingested since the index's mark, whoever wrote them (a run of the
        # stream that stopped before its compaction): readers trust the index up to the mark.
        maxima = actions["max.ingested_at"].to_pylist()
        late = [d for d, m in zip(all_dates, maxima, strict=True) if m is not None and m >= mark]
        since = min([*late, since])
    dates = sorted({d for d in all_dates if d is not None and (since is None or d >= since)})
    schema = tables.address_index_schema()
    # The files are listed now: the batches are pulled inside delta-rs' write, where no delta-rs call
    # can run (it would start its runtime inside its own).
    scope = [] if since is None else [(tables.DATE_COLUMN, ">=", since)]
    dataset, _ = scan(source, filters=scope)
    written = 0

    def batches() -> Iterator[pa.RecordBatch]:
        nonlocal written
        for day in dates:
            rows = dataset.to_table(
                columns=_INDEX_SOURCE_COLUMNS, filter=pc.field(tables.DATE_COLUMN) == pa.scalar(day)
            )
            index = tables.address_rows(rows).select(schema.names)
            written += index.num_rows
            yield from index.to_batches(max_chunksize=rows_per_group)

    write_deltalake(
        index_path,
        pa.RecordBatchReader.from_batches(schema, batches()),
        mode="overwrite",
        partition_by=[tables.DATE_COLUMN],
        predicate=None if since is None else f"{tables.DATE_COLUMN} >= '{since.isoformat()}'",
        writer_properties=WriterProperties(max_row_group_size=rows_per_group, compression="SNAPPY"),
    )
    return written


def quarantine_frame(parsed: DataFrame) -> DataFrame:
    from pyspark.sql import functions as F

    return parsed.where(~is_valid()).select(
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
    parsed: DataFrame,
    lake: Lake,
    batch_id: int,
    app_id: str,
    stored: StoredHashes,
    lookback_days: int = 0,
) -> BatchResult:
    """Write one micro-batch (Kafka records through ``parse.parse``): dedup, append new hashes, MERGE
    the rest, quarantine the invalid; ``stored``: the query run's index of stored hashes.

    The batch is read from Kafka and parsed once, and kept (a local checkpoint, serialized rows) with
    the raw bytes of invalid records only; on the way, invalid and confirmed rows are counted. Every
    later step reads that copy: the choice of the copy to keep per hash (a shuffle of narrow columns),
    the index lookup, the append, the MERGE(s), the quarantine append. Keeping the parsed rows costs
    about half a parse (measured, see bench/RESULTS.md), so it beats parsing twice; it also lets Delta
    skip its own copy of the MERGE source (see _merge).

    The parse belongs to the streaming query's plan, not to this function: built and analyzed once
    at query start instead of once per micro-batch (building its few hundred expressions through
    py4j takes most of a second).
    """
    from pyspark import StorageLevel
    from pyspark.sql import Observation
    from pyspark.sql import functions as F

    result = BatchResult()
    counts = Observation(f"batch-{batch_id}")
    with result.phase("stage"):
        valid_flag = is_valid()
        staged = (
            parsed.select(
                *[c for c in parsed.columns if c not in ("key", "value")],
                # Raw bytes are kept for the quarantine only: half the size of the batch copy.
                F.when(~valid_flag, F.col("key")).alias("key"),
                F.when(~valid_flag, F.col("value")).alias("value"),
                F.current_timestamp().alias("ingested_at"),
            )
            .observe(
                counts,
                F.count(F.when(~valid_flag, True)).alias("invalid"),
                F.count(F.when(valid_flag, True)).alias("valid"),
                F.count(F.when(valid_flag & F.col("block_height").isNotNull(), True)).alias("confirmed"),
                F.min(F.when(valid_flag, F.to_date("first_seen"))).alias("oldest"),
                # Distinct valid hashes, counted in the same pass (no job of its own): when it equals
                # the valid rows, the batch holds no duplicate and the dedup step is skipped.
                F.size(F.collect_set(F.when(valid_flag, F.col("hash")))).alias("distinct"),
            )
            .localCheckpoint(eager=True, storageLevel=StorageLevel.MEMORY_AND_DISK)
        )
        observed = counts.get
    try:
        result.quarantined = int(observed["invalid"])
        valid = staged.where(is_valid())
        if int(observed["valid"]):  # an idle trigger commits nothing (no empty Delta versions)
            if int(observed["distinct"]) != int(observed["valid"]):
                with result.phase("dedup"):
                    valid = dedup_batch(valid, dedup_winners(valid))
            source = valid.select(*transaction_columns(), "ingested_at")
            if int(observed["valid"]) < SMALL_BATCH_ROWS:
                source = source.coalesce(1)  # one file per small batch, not one per Kafka partition
            oldest = result.oldest = observed["oldest"]
            since = oldest - dt.timedelta(days=lookback_days) if lookback_days and oldest else None
            known = write_new_transactions(source, lake.table(TRANSACTIONS), stored, since, result)
            if known is not None:
                merge_transactions(
                    known,
                    lake.table(TRANSACTIONS),
                    f"{app_id}:{TRANSACTIONS}",
                    batch_id,
                    result,
                    any_confirmed=int(observed["confirmed"]) > 0,
                    since=since,
                )
            stored.commit()
            if since is not None:
                stored.forget_before(_day(since) - lookback_days)
        if result.quarantined:
            with result.phase("quarantine"):
                (
                    quarantine_frame(staged)
                    .write.format("delta")
                    .mode("append")
                    .option("txnAppId", f"{app_id}:{QUARANTINE}")
                    .option("txnVersion", batch_id)
                    .save(lake.table(QUARANTINE))
                )
    finally:
        release(staged)
    return result


def release(checkpointed: DataFrame) -> None:
    """Free the blocks of a local checkpoint now instead of at the next JVM garbage collection."""
    try:
        checkpointed._jdf.queryExecution().analyzed().rdd().unpersist(False)
    except Exception:  # not a LogicalRDD (e.g. Spark Connect): the context cleaner frees it later
        log.debug("could not release a local checkpoint", exc_info=True)
