"""Upkeep of the lake's Delta tables: compaction of the partitions a writer touched, and VACUUM.

* ``Compactor`` compacts the ``date`` partitions one streaming query wrote, every ``every`` batches that
  wrote (``transactions``, ``scored_transactions``): ``sinks.compact`` bin-packs the small files, or
  rewrites the partitions clustered (``tables.CLUSTERING``: ``scored_transactions``, anomalies first), in
  row groups of ``Settings.lake_row_group_rows`` that readers skip by their statistics; after compacting
  ``transactions`` it rebuilds ``address_index`` for the same dates (``sinks.build_address_index``). A
  1 s trigger adds a file per batch, and every reader, index load and MERGE opens the files of the
  partitions it reads, so they must not pile up. It runs in the query's own batch handler, between two batches: it never competes
  with the query's commits, and the batch that trips it is not slowed by a rewrite inside its own
  commit (Delta's auto compaction, see sinks.TRANSACTIONS_PROPERTIES).
* ``Vacuum`` deletes the data files that left a table (compacted, MERGEd, overwritten) more than
  ``Settings.lake_vacuum_retention_h`` ago, every ``Settings.lake_vacuum_every_s``, for every table the
  stream writes (``tables.STREAM_TABLES``), JVM-free with delta-rs (Spark's VACUUM is several jobs: it
  held a test's batch handler for minutes on the shared 2 cores); ``vacuum_delta_rs`` also compacts the
  tables of `btc-anomaly detect` (``tables.DETECT_TABLES``), each of whose upserts rewrites files.

Both are maintenance: a failure is logged with its traceback, the writer goes on, and the next due time
retries. Neither changes data: compaction commits with ``dataChange=false`` (change-feed readers skip
it), and VACUUM only deletes files no version within the retention references.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from btc_anomaly.config import Settings
from btc_anomaly.monitoring.metrics import STREAM_MAINTENANCE_FAILURES
from btc_anomaly.processing.sinks import Lake, build_address_index, compact

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


@dataclass
class Vacuum:
    """VACUUM of ``paths`` (missing tables skipped) every ``every_s`` seconds, the first ``every_s``
    after start: a restart does not hold up its first batches with a listing of every table."""

    paths: Sequence[str]
    retention_h: float
    every_s: float
    last: float = -1.0  # time.monotonic() of the last run, or of the start

    def __post_init__(self) -> None:
        if self.last < 0:
            self.last = time.monotonic()

    @classmethod
    def for_stream(cls, settings: Settings, lake: Lake, derived: Sequence[str] = ()) -> Vacuum:
        """The stream's tables (``tables.STREAM_TABLES``) and the ``derived`` ones it keeps (its query
        for transactions passes ``tables.INDEX_TABLES``)."""
        from btc_anomaly.processing.tables import STREAM_TABLES

        return cls(
            [lake.table(name) for name in (*STREAM_TABLES, *derived)],
            settings.lake_vacuum_retention_h,
            settings.lake_vacuum_every_s,
        )

    def due(self) -> bool:
        return self.every_s > 0 and time.monotonic() - self.last >= self.every_s

    def run_if_due(self) -> None:
        if not self.due():
            return
        self.last = time.monotonic()
        for path in self.paths:
            started = time.perf_counter()
            try:
                deleted = vacuum(path, self.retention_h)
            except Exception:
                STREAM_MAINTENANCE_FAILURES.labels(table=Path(str(path)).name, op="vacuum").inc()
                log.exception("vacuum of %s failed; retried in %.0f s", path, self.every_s)
                continue
            if deleted is not None:
                log.info(
                    "vacuumed %s: %d files deleted in %.2f s",
                    path,
                    len(deleted),
                    time.perf_counter() - started,
                )


def vacuum(path: str, retention_h: float) -> list[str] | None:
    """Delta VACUUM of the table at ``path``, JVM-free (delta-rs: a listing and deletes, no Spark job, so
    the query whose handler runs it waits seconds, not minutes on a busy machine); returns the files
    deleted, or None when there is no table there (yet)."""
    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(path):
        return None
    # delta-rs takes whole hours: round up, never keep less than asked. The retention is the operator's
    # choice (Settings.lake_vacuum_retention_h), so Delta's 7-day minimum is not enforced.
    return DeltaTable(path).vacuum(
        retention_hours=math.ceil(retention_h), dry_run=False, enforce_retention_duration=False
    )


def vacuum_delta_rs(path: str, retention_h: float) -> list[str] | None:
    """Compaction then VACUUM of a table written with deltalake (delta-rs; detect's tables), JVM-free;
    returns the files deleted, or None when there is no table at ``path``."""
    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(path):
        return None
    DeltaTable(path).optimize.compact()
    return vacuum(path, retention_h)


@dataclass
class Compactor:
    """Compacts the date partitions one query wrote, every ``every`` batches that wrote (0 = never), and
    runs ``vacuum`` when it is due."""

    path: str
    every: int
    vacuum: Vacuum | None = None
    row_group_rows: int | None = None  # None: Settings.lake_row_group_rows (sinks.compact)
    # The address index derived from this table (transactions), rebuilt after each compaction for the
    # same dates (sinks.build_address_index); None: none.
    index: str | None = None
    since: dt.date | None = None  # oldest partition written since the last compaction
    batches: int = 0  # batches that wrote since the last compaction
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = self.path.rstrip("/").rsplit("/", 1)[-1]

    def wrote(self, oldest: dt.date | None) -> None:
        if oldest is not None:
            self.since = oldest if self.since is None else min(self.since, oldest)
            self.batches += 1

    def run_if_due(self, spark: SparkSession) -> None:
        if self.vacuum is not None:
            self.vacuum.run_if_due()
        if self.every <= 0 or self.since is None or self.batches < self.every:
            return
        started = time.perf_counter()
        step = (self.name, "compact")
        try:
            # The row-group size only when set: compact's own default is the Settings one.
            extra = {} if self.row_group_rows is None else {"row_group_rows": self.row_group_rows}
            replaced = compact(spark, self.path, self.since, **extra)
            if self.index is not None:
                step = (Path(self.index).name, "index")
                indexed = build_address_index(self.path, self.index, self.since, self.row_group_rows)
                log.info("rebuilt %s from %s: %d rows", step[0], self.since, indexed)
        except Exception:
            # Maintenance only: the batch is written, so the stream goes on; retried after ``every`` more,
            # from the same ``since`` (the index then still covers every date written since its last build).
            STREAM_MAINTENANCE_FAILURES.labels(table=step[0], op=step[1]).inc()
            what = "compaction" if step[1] == "compact" else "index build"
            log.exception("%s of %s from %s failed", what, step[0], self.since)
            self.batches = 0
            return
        log.info(
            "compacted %s from %s: %d files replaced in %.2f s",
            self.name,
            self.since,
            replaced,
            time.perf_counter() - started,
        )
        self.since = None
        self.batches = 0
