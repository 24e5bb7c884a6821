"""Delta access of the dashboard: a per-file, per-version cache of ``scored_transactions`` and lookups.

Reading. No JVM: ``deltalake`` (delta-rs) reads the transaction log, which gives the live data files with
their row counts and min/max statistics, and pyarrow reads the files, projected to the few columns the
charts need (``SNAPSHOT_COLUMNS``). Point lookups (the detail panel) go through the project's shared
reader ``btc_anomaly.processing.delta_reader`` (``read_rows``): date-partition pruning from a time range
and predicate pushdown. The cache reads file by file itself because the shared reader answers "rows of
the table", not "rows of these new files".

Caching. ``ScoredCache`` keeps the projected columns of each data file it has read, keyed by the file's
path. Delta data files are immutable, so on a new table version only files that appeared are read and
files that disappeared (compaction, overwrite, vacuum) are dropped; an unchanged version costs one look
at the log. Which files are read is decided from their statistics: those that may hold rows at or after
the oldest time any view has asked for (``ensure(since)``), newest first, up to
``Settings.dashboard_cache_max_rows`` rows. Tables with deletion vectors or column mapping cannot be
read file by file; they are re-read whole (``scan``) on each new version.

A ``Snapshot`` is immutable: the columns of all cached files concatenated and sorted by ``first_seen``,
so a time window is a binary search and a slice (views, no copies). Callbacks of several browser tabs
share one snapshot; a refresh builds a new one and swaps it in under a lock.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

log = logging.getLogger(__name__)

# Delta statistics keep timestamps in milliseconds (truncated): widen time bounds by this much when
# pruning files with them, or a row a few microseconds after a file's recorded max would be missed.
_STATS_SLACK_US = 1_000
_US = np.int64(1_000_000)

NUMERIC_COLUMNS = (
    "first_seen",
    "anomaly_score",
    "threshold",
    "output_value",
    "fee_rate",
    "scored_at",
    "risk_score",  # absent from tables written before the detectors: read as NaN
)
OPTIONAL_COLUMNS = frozenset({"risk_score"})
TEXT_COLUMNS = ("hash", "reasons")
SNAPSHOT_COLUMNS = (*TEXT_COLUMNS, *NUMERIC_COLUMNS)


def to_us(ts: dt.datetime) -> int:
    """Microseconds since the Unix epoch of an aware (or naive = UTC) datetime."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=dt.UTC)
    return int(ts.timestamp()) * 1_000_000 + ts.microsecond


def from_us(us: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=int(us))


def is_delta_table(path: Path | str) -> bool:
    return Path(path, "_delta_log").is_dir()


def read_rows(
    path: Path | str,
    columns: Sequence[str] | None = None,
    *,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    filters: Sequence[tuple[str, str, Any]] = (),
) -> pa.Table:
    """Rows of a Delta table with ``since <= first_seen < until`` and ``filters``, projected to
    ``columns``: the project's JVM-free reader (date-partition pruning from the time range, predicate
    pushdown to Parquet row groups). The one place the point lookups read through."""
    from btc_anomaly.processing.delta_reader import read_arrow

    return read_arrow(path, columns, since, until, list(filters))


# --- the scored-rows cache ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FileChunk:
    """Projected rows of one data file, in file order; rows without ``first_seen`` are dropped."""

    path: str
    text: pa.Table  # hash, reasons
    ts: np.ndarray  # int64 us
    score: np.ndarray
    threshold: np.ndarray
    value: np.ndarray  # float64 satoshis
    fee_rate: np.ndarray  # float64, NaN when unknown
    key: np.ndarray  # uint32 sampling key from the hash
    max_scored_us: int | None
    risk: np.ndarray  # float64 risk score 0-100, NaN when the row has none

    @property
    def rows(self) -> int:
        return len(self.ts)


@dataclass(frozen=True)
class Snapshot:
    """All cached rows, sorted by ``first_seen``; ``ref`` maps a sorted position to a row of ``text``."""

    version: int | None
    ts: np.ndarray
    score: np.ndarray
    threshold: np.ndarray
    value: np.ndarray
    fee_rate: np.ndarray
    key: np.ndarray
    risk: np.ndarray
    ref: np.ndarray
    text: pa.Table
    files: frozenset[str] = frozenset()
    table_rows: int = 0  # rows in the table (from the log), cached or not
    last_scored_us: int | None = None
    truncated: bool = False  # older files left out by dashboard_cache_max_rows
    built_at: float = field(default_factory=time.time)
    # Arrays above are views of the first `rows` entries of these (larger) buffers; appends write
    # behind them (see append_snapshot). None when the arrays own their memory.
    buffers: dict[str, np.ndarray] | None = field(default=None, repr=False, compare=False)

    @property
    def rows(self) -> int:
        return len(self.ts)

    @property
    def empty(self) -> bool:
        return len(self.ts) == 0

    def window(self, start_us: int | None, end_us: int | None) -> slice:
        """Sorted positions with ``start_us <= first_seen < end_us`` (None = open)."""
        lo = 0 if start_us is None else int(np.searchsorted(self.ts, start_us, side="left"))
        hi = len(self.ts) if end_us is None else int(np.searchsorted(self.ts, end_us, side="left"))
        return slice(lo, max(lo, hi))

    def hashes(self, positions: np.ndarray) -> list[str]:
        return _take(self.text["hash"], self.ref[positions])

    def reasons(self, positions: np.ndarray) -> list[list[str]]:
        return [r or [] for r in _take(self.text["reasons"], self.ref[positions])]

    def locate(self, ts_us: int, score: float) -> str | None:
        """The hash of the row with this first_seen (µs) whose score is closest to ``score``."""
        lo = int(np.searchsorted(self.ts, ts_us, side="left"))
        hi = int(np.searchsorted(self.ts, ts_us, side="right"))
        if hi <= lo:
            return None
        best = lo + int(np.argmin(np.abs(self.score[lo:hi] - score)))
        return self.hashes(np.array([best]))[0]

    def model_threshold(self) -> float | None:
        """The threshold most of the newest rows were labelled with (the current champion's main forest)."""
        if self.empty:
            return None
        recent = self.threshold[-min(len(self.threshold), 5000) :]
        values, counts = np.unique(recent, return_counts=True)
        return float(values[np.argmax(counts)])


def _take(column: pa.ChunkedArray, rows: np.ndarray) -> list[Any]:
    """``column[rows]`` as Python values, chunk by chunk: ``ChunkedArray.take`` would first concatenate
    every chunk (a copy of the whole column) to fetch a page of rows."""
    lengths = np.fromiter((len(c) for c in column.chunks), np.int64, column.num_chunks)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    which = np.searchsorted(starts, rows, side="right") - 1
    chunks = column.chunks
    return [chunks[c][int(r - starts[c])].as_py() for c, r in zip(which, rows, strict=True)]


def empty_snapshot(version: int | None = None) -> Snapshot:
    f8 = np.empty(0, np.float64)
    return Snapshot(
        version=version,
        ts=np.empty(0, np.int64),
        score=f8,
        threshold=f8,
        value=f8,
        fee_rate=f8,
        key=np.empty(0, np.uint32),
        risk=f8,
        ref=np.empty(0, np.int64),
        text=pa.table({"hash": pa.array([], pa.string()), "reasons": pa.array([], pa.list_(pa.string()))}),
    )


def sampling_key(hashes: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A uint32 per row from the first 8 characters of its hash, mixed (SplitMix64's finalizer): uniform,
    and stable for a row across refreshes, so a deterministic sample keeps the same points while new
    data arrives."""
    chunks = hashes.chunks if isinstance(hashes, pa.ChunkedArray) else [hashes]
    parts = [_key_chunk(c) for c in chunks if len(c)]
    return np.concatenate(parts) if parts else np.empty(0, np.uint32)


def _key_chunk(arr: pa.Array) -> np.ndarray:
    n = len(arr)
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)) or arr.null_count:
        arr = pc.fill_null(pc.cast(arr, pa.string()), "")
    width = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], width, n + 1, arr.offset * np.dtype(width).itemsize)
    if (np.diff(offsets) < 8).any():  # not tx hashes; pad so every value has 8 bytes
        arr = pc.utf8_rpad(pc.utf8_slice_codeunits(arr, 0, 8), 8, "0")
        offsets = np.frombuffer(arr.buffers()[1], np.int32, n + 1, arr.offset * 4)
    data = np.frombuffer(arr.buffers()[2], np.uint8)
    # The first 8 bytes of every value, gathered into one little-endian uint64 per row.
    raw = data[offsets[:-1, None].astype(np.int64) + np.arange(8)]
    x = np.ascontiguousarray(raw).view("<u8").ravel()
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(32)).astype(np.uint32)


def _float(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def _ts_us(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Timestamps (any unit, tz) as int64 microseconds; nulls become INT64_MIN."""
    col = pc.cast(col, pa.timestamp("us", tz="UTC"))
    return np.asarray(pc.fill_null(pc.cast(col, pa.int64()), np.iinfo(np.int64).min).to_numpy())


def chunk_from_table(path: str, table: pa.Table) -> FileChunk:
    ts = _ts_us(table["first_seen"])
    keep = ts != np.iinfo(np.int64).min
    if not keep.all():
        table = table.filter(pa.array(keep))
        ts = ts[keep]
    scored = _ts_us(table["scored_at"])
    scored = scored[scored != np.iinfo(np.int64).min]
    return FileChunk(
        path=path,
        text=table.select(list(TEXT_COLUMNS)),
        ts=ts,
        score=_float(table["anomaly_score"]),
        threshold=_float(table["threshold"]),
        value=np.nan_to_num(_float(table["output_value"]), nan=0.0),
        fee_rate=_float(table["fee_rate"]),
        key=sampling_key(table["hash"]),
        max_scored_us=int(scored.max()) if len(scored) else None,
        risk=_float(table["risk_score"]) if "risk_score" in table.column_names else np.full(len(ts), np.nan),
    )


def present_columns(schema: pa.Schema) -> list[str]:
    """``SNAPSHOT_COLUMNS`` that exist in a table's schema (optional ones may be missing)."""
    names = set(schema.names)
    return [c for c in SNAPSHOT_COLUMNS if c in names or c not in OPTIONAL_COLUMNS]


ARRAYS = ("ts", "score", "threshold", "value", "fee_rate", "key", "risk", "ref")
_DTYPES = {"ts": np.int64, "key": np.uint32, "ref": np.int64}


def _headroom(rows: int) -> int:
    return rows + max(65_536, rows // 4)


def _snapshot_from_buffers(
    buffers: dict[str, np.ndarray], rows: int, text: pa.Table, **meta: Any
) -> Snapshot:
    return Snapshot(**{name: buffers[name][:rows] for name in ARRAYS}, text=text, buffers=buffers, **meta)


def build_snapshot(
    chunks: Sequence[FileChunk],
    version: int | None,
    *,
    table_rows: int | None = None,
    last_scored_us: int | None = None,
    truncated: bool = False,
) -> Snapshot:
    """All chunks in one sorted snapshot (a full rebuild: after compaction, removals, late files)."""
    if not chunks or not any(c.rows for c in chunks):
        snap = empty_snapshot(version)
        return Snapshot(**{**snap.__dict__, "table_rows": table_rows or 0, "last_scored_us": last_scored_us})
    # Files arrive roughly in time order; concatenating them oldest first makes the stable sort
    # (timsort on runs) close to linear.
    chunks = sorted(chunks, key=lambda c: (int(c.ts.min()) if c.rows else 0, c.path))
    rows = sum(c.rows for c in chunks)
    ts = np.concatenate([c.ts for c in chunks])
    order = np.argsort(ts, kind="stable")
    sorted_already = bool(np.all(order[1:] >= order[:-1])) if len(order) > 1 else True
    capacity = _headroom(rows)
    buffers = {name: np.empty(capacity, _DTYPES.get(name, np.float64)) for name in ARRAYS}
    for name in ARRAYS[:-1]:
        arr = ts if name == "ts" else np.concatenate([getattr(c, name) for c in chunks])
        buffers[name][:rows] = arr if sorted_already else arr[order]
    buffers["ref"][:rows] = order
    scored = [c.max_scored_us for c in chunks if c.max_scored_us is not None]
    last = max([*scored, *([last_scored_us] if last_scored_us is not None else [])], default=None)
    return _snapshot_from_buffers(
        buffers,
        rows,
        pa.concat_tables([c.text for c in chunks]),
        version=version,
        files=frozenset(c.path for c in chunks),
        table_rows=table_rows if table_rows is not None else rows,
        last_scored_us=last,
        truncated=truncated,
    )


def append_snapshot(
    old: Snapshot,
    chunks: Sequence[FileChunk],
    version: int | None,
    *,
    table_rows: int,
    last_scored_us: int | None,
    truncated: bool,
) -> Snapshot | None:
    """``old`` plus new files whose rows are all at or after its newest row (the live stream's case),
    or None when that does not hold and a full rebuild is needed.

    The new rows are written behind ``old``'s rows in the same buffers, so the old rows are not copied
    (``old`` itself only ever looks at its first ``old.rows`` entries, which are not touched); the
    buffers grow by a quarter when full.
    """
    chunks = [c for c in chunks if c.rows]
    if old.empty or old.buffers is None or not chunks:
        return None
    new_ts = np.concatenate([c.ts for c in sorted(chunks, key=lambda c: int(c.ts.min()))])
    if int(new_ts.min()) < int(old.ts[-1]):
        return None
    chunks = sorted(chunks, key=lambda c: int(c.ts.min()))
    n, m = old.rows, len(new_ts)
    buffers = old.buffers
    if len(buffers["ts"]) < n + m:
        grown = _headroom(n + m)
        buffers = {name: np.empty(grown, buffers[name].dtype) for name in ARRAYS}
        for name in ARRAYS:
            buffers[name][:n] = getattr(old, name)
    order = np.argsort(new_ts, kind="stable")
    for name in ARRAYS[:-1]:
        arr = new_ts if name == "ts" else np.concatenate([getattr(c, name) for c in chunks])
        buffers[name][n : n + m] = arr[order]
    buffers["ref"][n : n + m] = old.text.num_rows + order
    scored = [c.max_scored_us for c in chunks if c.max_scored_us is not None]
    candidates = [*scored, *(v for v in (old.last_scored_us, last_scored_us) if v is not None)]
    return _snapshot_from_buffers(
        buffers,
        n + m,
        pa.concat_tables([old.text, *[c.text for c in chunks]]),
        version=version,
        files=old.files | {c.path for c in chunks},
        table_rows=table_rows,
        last_scored_us=max(candidates, default=None),
        truncated=truncated,
    )


@dataclass
class _FileInfo:
    path: str
    rows: int
    min_ts: int | None
    max_ts: int | None
    max_scored: int | None


def _file_infos(table: Any) -> list[_FileInfo]:
    actions = pa.table(table.get_add_actions(flatten=True))
    n = actions.num_rows

    def col(name: str) -> list[Any]:
        if name not in actions.column_names:
            return [None] * n
        c = actions[name]
        if pa.types.is_timestamp(c.type):
            c = pc.cast(pc.cast(c, pa.timestamp("us", tz="UTC")), pa.int64())
        return c.to_pylist()

    return [
        _FileInfo(p, int(r) if r is not None else 0, lo, hi, sc)
        for p, r, lo, hi, sc in zip(
            col("path"),
            col("num_records"),
            col("min.first_seen"),
            col("max.first_seen"),
            col("max.scored_at"),
            strict=True,
        )
    ]


def _needs_full_scan(table: Any) -> bool:
    protocol = table.protocol()
    features = set(protocol.reader_features or [])
    return bool(features & {"deletionVectors", "columnMapping"})


def read_fragments(table: Any, paths: set[str]) -> dict[str, pa.Table]:
    """The ``SNAPSHOT_COLUMNS`` of the data files ``paths`` of a Delta table, one Arrow table per file.

    One pyarrow scan over all of them (files are read in parallel by pyarrow's thread pool); each record
    batch comes from one file, named by the scanner's ``__fragment_index`` column.
    """
    dataset = table.to_pyarrow_dataset()
    fragments = [f for f in dataset.get_fragments() if f.path in paths]
    if not fragments:
        return {}
    subset = ds.FileSystemDataset(fragments, dataset.schema, dataset.format, dataset.filesystem)
    columns = present_columns(dataset.schema)
    scanned = subset.to_table(columns=[*columns, "__fragment_index"])
    batches: dict[int, list[pa.RecordBatch]] = {i: [] for i in range(len(fragments))}
    for batch in scanned.to_batches():
        if batch.num_rows == 0:
            continue
        index = batch.column(len(columns)).to_numpy()
        data = batch.select(columns)
        if index[0] == index[-1] and (index == index[0]).all():
            batches[int(index[0])].append(data)
        else:  # not expected from pyarrow's scanner, but cheap to handle
            for i in np.unique(index):
                batches[int(i)].append(data.filter(pa.array(index == i)))
    schema = scanned.schema.remove(len(columns))
    return {fragments[i].path: pa.Table.from_batches(found, schema=schema) for i, found in batches.items()}


class ScoredCache:
    """The scored rows of one Delta table, refreshed incrementally (see the module doc)."""

    def __init__(self, path: Path | str, max_rows: int, min_check_s: float = 0.5) -> None:
        self.path = Path(path)
        self.max_rows = max_rows
        self.min_check_s = min_check_s
        self._lock = threading.Lock()
        self._table: Any = None
        self._chunks: dict[str, FileChunk] = {}
        self._snapshot = empty_snapshot()
        self._since: int | None = None
        self._since_set = False
        self._checked_at = 0.0
        self.files_read = 0  # data files read since start (tests, metrics)

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def ensure(self, since_us: int | None = None, *, force: bool = False) -> Snapshot:
        """The snapshot, brought up to the table's latest version and covering rows from ``since_us``
        (None = all rows) onwards. Cheap when neither the table nor the coverage changed."""
        with self._lock:
            widen = (
                self._since_set and self._since is not None and (since_us is None or since_us < self._since)
            )
            if not self._since_set or widen:
                self._since, self._since_set = since_us, True
            now = time.monotonic()
            if not force and not widen and now - self._checked_at < self.min_check_s:
                return self._snapshot
            self._checked_at = now
            try:
                self._refresh(force_listing=widen)
            except FileNotFoundError:
                self._reset()
            return self._snapshot

    def _reset(self) -> None:
        self._table = None
        self._chunks = {}
        self._snapshot = empty_snapshot()

    def _open(self) -> Any | None:
        from deltalake import DeltaTable

        if not is_delta_table(self.path):
            if self._table is not None:
                self._reset()
            return None
        if self._table is None:
            self._table = DeltaTable(str(self.path))
            return self._table
        before = self._table.version()
        try:
            self._table.update_incremental()
        except Exception:  # log rewritten under us (table dropped and re-created): start over
            log.info("%s: reloading the Delta log", self.path)
            self._chunks = {}
            self._table = DeltaTable(str(self.path))
        if self._table.version() < before:
            self._chunks = {}
        return self._table

    def _refresh(self, force_listing: bool = False) -> None:
        from btc_anomaly.monitoring.metrics import DASHBOARD_CACHED_ROWS, DASHBOARD_DELTA_FILES_READ

        table = self._open()
        if table is None:
            return
        version = table.version()
        if version == self._snapshot.version and not force_listing:
            return
        infos = _file_infos(table)
        table_rows = sum(i.rows for i in infos)
        last_scored = max((i.max_scored for i in infos if i.max_scored is not None), default=None)
        if _needs_full_scan(table):
            # Deletion vectors or column mapping: only the engine can say which rows are live.
            columns = present_columns(table.schema().to_arrow())
            data = pa.RecordBatchReader.from_stream(table.scan(columns=columns)).read_all()
            self.files_read += len(infos)
            DASHBOARD_DELTA_FILES_READ.labels(table=self.path.name).inc(len(infos))
            self._chunks = {"<scan>": chunk_from_table("<scan>", data)}
            self._snapshot = build_snapshot(
                list(self._chunks.values()), version, table_rows=table_rows, last_scored_us=last_scored
            )
            DASHBOARD_CACHED_ROWS.labels(table=self.path.name).set(self._snapshot.rows)
            return
        dropped = self._chunks.pop("<scan>", None) is not None
        live = {i.path: i for i in infos}
        for path in [p for p in self._chunks if p not in live]:
            del self._chunks[path]
            dropped = True
        since = None if self._since is None else self._since - _STATS_SLACK_US
        wanted = [
            i
            for i in infos
            if since is None or i.max_ts is None or i.max_ts >= since or i.path in self._chunks
        ]
        # Newest first until the row budget is spent.
        wanted.sort(key=lambda i: i.max_ts if i.max_ts is not None else np.iinfo(np.int64).max, reverse=True)
        keep: list[_FileInfo] = []
        budget = self.max_rows
        truncated = False
        for info in wanted:
            if info.rows > budget and keep:
                truncated = True
                break
            keep.append(info)
            budget -= info.rows
        keep_paths = {i.path for i in keep}
        for path in [p for p in self._chunks if p not in keep_paths]:
            del self._chunks[path]
            dropped = True
        missing = [i.path for i in keep if i.path not in self._chunks]
        added: list[FileChunk] = []
        if missing:
            fragments = read_fragments(table, set(missing))
            for path, data in fragments.items():
                self._chunks[path] = added_chunk = chunk_from_table(path, data)
                added.append(added_chunk)
            self.files_read += len(fragments)
            DASHBOARD_DELTA_FILES_READ.labels(table=self.path.name).inc(len(fragments))
        snapshot = None
        if not dropped and self._snapshot.files == set(self._chunks) - {c.path for c in added}:
            snapshot = append_snapshot(
                self._snapshot,
                added,
                version,
                table_rows=table_rows,
                last_scored_us=last_scored,
                truncated=truncated,
            )
            if snapshot is None and not added:
                snapshot = replace(
                    self._snapshot, version=version, table_rows=table_rows, truncated=truncated
                )
        self._snapshot = snapshot or build_snapshot(
            list(self._chunks.values()),
            version,
            table_rows=table_rows,
            last_scored_us=last_scored,
            truncated=truncated,
        )
        DASHBOARD_CACHED_ROWS.labels(table=self.path.name).set(self._snapshot.rows)


# --- point lookups (detail panel) ----------------------------------------------------------------------


def _around(first_seen_us: int) -> tuple[dt.datetime, dt.datetime]:
    # A millisecond either side: a row's time may have passed through Delta's millisecond statistics
    # or a JSON float on its way here.
    return from_us(first_seen_us - _STATS_SLACK_US), from_us(first_seen_us + _STATS_SLACK_US)


def lookup_row(path: Path | str, tx_hash: str, first_seen_us: int | None) -> dict[str, Any] | None:
    """The row of ``tx_hash`` in a table keyed by hash (``transactions``, ``scored_transactions``).

    With its ``first_seen`` only the ``date`` partition of that (UTC) day is opened (for a table
    partitioned by date) and only row groups whose statistics bracket that time are read; without it,
    the whole table is searched.
    """
    if not is_delta_table(path):
        return None
    since, until = _around(first_seen_us) if first_seen_us is not None else (None, None)
    rows = read_rows(path, since=since, until=until, filters=[("hash", "=", tx_hash)]).to_pylist()
    return rows[0] if rows else None
