"""Reads of the stream's ``scored_transactions`` Delta table for ``/anomalies`` and ``/transactions/{hash}``.

Every read goes through the project's Delta reader (``processing.delta_reader.read_arrow``) and is bounded:

* a time window on ``first_seen``: ``[since, until)`` of the request, by default the last
  ``Settings.api_lake_window_h`` hours up to the table's newest row (from the Delta log's statistics, so
  a replayed or stalled lake still shows its latest rows); wider than ``Settings.api_lake_max_window_h``
  is refused (``WindowTooWide``, a 422). The window prunes ``date`` partitions and files by statistics;
* column projection in two steps: the rows are chosen on a few narrow columns (hash, times, scores,
  the filter columns), and only the chosen rows are read whole, from the files of their own time range;
* row-group skipping: both steps hand their filters to the scan, which skips Parquet row groups by their
  statistics. The stream's compaction writes each day of ``scored_transactions`` anomalies first, in small
  row groups (``tables.CLUSTERING``, ``Settings.lake_row_group_rows``), so ``is_anomaly = true`` reads a
  day's anomaly row group(s) instead of the day. Files not compacted that way (an older lake, the newest
  appends) are read whole, with the same answers.

``/anomalies`` can also select by the detectors' columns (severity, a rule id, a watchlist name), and
``/addresses/{address}`` finds an address's transactions in the ``transactions`` table (flattened input and
output addresses, compared in Arrow) and joins their scorings.

The table may hold one transaction several times (re-scored after confirmation or by a new model
version): both endpoints answer with the latest scoring of each transaction (``scored_at``).
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from btc_anomaly.config import Settings
from btc_anomaly.processing import tables
from btc_anomaly.processing.delta_reader import Filter, newest, read_arrow

_REFRESH_S = 1.0
ADDRESS_MAX_SCORED = 10_000  # scorings joined per address (newest transactions first)
# Delta statistics truncate timestamps to milliseconds: a window ending at the newest recorded
# first_seen ends this much later, so the newest row itself is inside.
_STATS_SLACK = dt.timedelta(milliseconds=1)
_ONE_US = dt.timedelta(microseconds=1)
# Narrow columns the rows of /anomalies are chosen on (the filter columns are added as needed).
_CHOOSE_COLUMNS = ("hash", "first_seen", "scored_at", "anomaly_score")
_RISK_CHOOSE_COLUMNS = ("risk_score", "severity")
# What /addresses takes from each scoring.
_ADDRESS_SCORED_COLUMNS = (
    "hash",
    "first_seen",
    "scored_at",
    "anomaly_score",
    "risk_score",
    "severity",
    "rule_hits",
    "watchlist_hits",
)


class LakeUnavailable(Exception):
    """The lake folder or the table cannot be read (I/O, permissions, corrupt log)."""


class WindowTooWide(ValueError):
    """A request's [since, until) is wider than ``Settings.api_lake_max_window_h`` (a 422)."""

    def __init__(self, since: dt.datetime, until: dt.datetime, max_window: dt.timedelta) -> None:
        hours = (until - since).total_seconds() / 3600
        super().__init__(
            f"the window [since, until) = [{_iso(since)}, {_iso(until)}) spans {hours:,.1f} h; at most "
            f"{max_window.total_seconds() / 3600:,.1f} h are read at once (api_lake_max_window_h): narrow "
            "since/until"
        )


@dataclass(frozen=True)
class Window:
    """The ``[since, until)`` range of first_seen a lake read covers."""

    since: dt.datetime
    until: dt.datetime

    def jsonable(self) -> dict[str, str]:
        return {"since": _iso(self.since), "until": _iso(self.until)}


class ScoredTable:
    def __init__(self, settings: Settings) -> None:
        self.lake_dir = Path(settings.lake_dir)
        self.path = Path(settings.api_scored_table or settings.lake_table(tables.SCORED))
        self.transactions_path = Path(settings.lake_table(tables.TRANSACTIONS))
        self.index_path = Path(settings.lake_table(tables.ADDRESS_INDEX))
        self.watchlist_dir = settings.watchlist_dir
        self.default_window = dt.timedelta(hours=settings.api_lake_window_h)
        self.max_window = dt.timedelta(hours=settings.api_lake_max_window_h)
        self._tables: dict[Path, tuple[Any, float, int, dt.datetime | None]] = {}
        self._lock = threading.Lock()
        self._marks: dict[tuple[Path, int], dt.datetime | None] = {}

    # --- status ------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """For /ready: is the lake folder reachable, and does the scored table exist yet."""
        reachable = self.lake_dir.is_dir() and os.access(self.lake_dir, os.R_OK | os.X_OK)
        info: dict[str, Any] = {"root": str(self.lake_dir), "reachable": reachable, "table": str(self.path)}
        if reachable:
            try:
                info["table_exists"] = self.exists()
                if info["table_exists"]:
                    info["table_version"] = self._delta(self.path).version()
            except Exception as exc:  # a broken log is reported, not raised, by /ready
                info["table_error"] = str(exc)[:300]
        return info

    def exists(self) -> bool:
        return _is_table(self.path)

    # --- windows -----------------------------------------------------------------------------------
    def window(
        self,
        path: Path,
        since: dt.datetime | None,
        until: dt.datetime | None,
        default: dt.timedelta | None = None,
    ) -> Window:
        """The request's [since, until) with the missing ends filled: ``until`` = just after the table's
        newest first_seen (now for an empty table), ``since`` = ``until`` minus ``default`` (the default
        window). Raises ``WindowTooWide`` past the maximum."""
        end = _utc(until) if until is not None else self._newest(path)
        start = _utc(since) if since is not None else end - (default or self.default_window)
        if end - start > self.max_window:
            raise WindowTooWide(start, end, self.max_window)
        return Window(start, end)

    def _newest(self, path: Path) -> dt.datetime:
        if _is_table(path):
            latest = self._delta_and_newest(path)[1]
            if latest is not None:
                return latest + _STATS_SLACK
        return dt.datetime.now(dt.UTC)

    # --- queries -----------------------------------------------------------------------------------
    def anomalies(
        self,
        window: Window,
        min_score: float,
        limit: int,
        *,
        severity: list[str] | None = None,
        rule: str | None = None,
        watchlist: str | None = None,
    ) -> list[dict[str, Any]]:
        """Without detector filters: the forest's anomalies by score. With any of ``severity`` (one of),
        ``rule`` (fired) or ``watchlist`` (hit): every matching row, by risk score. Rows are chosen on
        narrow columns, then only the chosen ones are read whole."""
        by_risk = bool(severity or rule or watchlist)
        filters: list[Filter] = [("anomaly_score", ">=", float(min_score))]
        columns = list(_CHOOSE_COLUMNS)
        if by_risk:
            if not self._has_columns("severity", "rule_hits", "watchlist_hits"):
                return []  # a table written before the detectors: nothing can match
            columns += _RISK_CHOOSE_COLUMNS
            if severity:
                filters.append(("severity", "in", list(severity)))
            if rule:
                columns.append("rule_hits")
            if watchlist:
                columns.append("watchlist_hits")
        else:
            filters.append(("is_anomaly", "=", True))
        table = self._read(self.path, filters, window, columns)
        if table is None or table.num_rows == 0:
            return []
        table = _latest_per_hash(table)
        if rule:
            table = table.filter(_list_has(table["rule_hits"], rule))
        if watchlist:
            table = table.filter(_list_has(table["watchlist_hits"], watchlist, field="list"))
        if table.num_rows == 0:
            return []
        key = "risk_score" if by_risk else "anomaly_score"
        order = [(key, "descending"), ("hash", "ascending")]
        chosen = table.take(pc.select_k_unstable(table, limit, sort_keys=order))
        rows = self._whole_rows(chosen, filters)
        return [_jsonable(r) for r in rows.sort_by(order).to_pylist()]

    def _whole_rows(self, chosen: pa.Table, filters: list[Filter]) -> pa.Table:
        """All columns of the ``chosen`` scorings (hash + scored_at), read from their own time range. The
        ``filters`` they were chosen by hold for them too: with them, row groups without a chosen row are
        skipped by their statistics (is_anomaly: a compacted day's anomalies sit in their own row groups)."""
        table = self._read(
            self.path,
            [("hash", "in", chosen["hash"].to_pylist()), *filters],
            _span(chosen),
            self._row_columns(),
        )
        if table is None:
            return chosen.slice(0, 0)
        wanted = {
            (h, t) for h, t in zip(chosen["hash"].to_pylist(), chosen["scored_at"].to_pylist(), strict=True)
        }
        keep = [
            (h, t) in wanted
            for h, t in zip(table["hash"].to_pylist(), table["scored_at"].to_pylist(), strict=True)
        ]
        return _latest_per_hash(table.filter(pa.array(keep, pa.bool_())))

    def address(self, address: str, window: Window, limit: int) -> dict[str, Any]:
        """The address's transactions (newest first), their scorings, its watchlist entries, highest risk."""
        from btc_anomaly.detectors.watchlist import load_watchlist

        listed = [
            {"list": e.list, "category": e.category, "label": e.label}
            for e in load_watchlist(self.watchlist_dir).lookup(address)
        ]
        touching = self._touching(address, window)
        count = len(touching)
        touching.sort(
            key=lambda r: (r["first_seen"] or dt.datetime.min.replace(tzinfo=dt.UTC), r["hash"]), reverse=True
        )
        scored = self._scorings(touching[:ADDRESS_MAX_SCORED])
        rows = []
        for r in touching:
            s = scored.get(r["hash"])
            rows.append(
                {
                    **r,
                    "scored": s is not None,
                    "anomaly_score": s.get("anomaly_score") if s else None,
                    "risk_score": s.get("risk_score") if s else None,
                    "severity": s.get("severity") if s else None,
                    "rule_hits": s.get("rule_hits") if s else None,
                    "watchlist_hits": s.get("watchlist_hits") if s else None,
                }
            )
        risky = [r for r in rows if r["risk_score"] is not None]
        highest = max(risky, key=lambda r: (r["risk_score"], r["hash"])) if risky else None
        rule_counts: dict[str, int] = {}
        for r in rows:
            for rid in r["rule_hits"] or ():
                rule_counts[rid] = rule_counts.get(rid, 0) + 1
        return {
            "address": address,
            "watchlists": listed,
            "transactions": [_jsonable(r) for r in rows[:limit]],
            "count": count,
            "truncated": count > limit,
            "highest_risk": _jsonable(dict(highest)) if highest else None,
            "rule_hits": dict(sorted(rule_counts.items())),
            # Table names, not paths: a response says nothing about the server's filesystem.
            "tables": {"transactions": tables.TRANSACTIONS, "scored": self.path.name},
            "window": window.jsonable(),
        }

    def _touching(self, address: str, window: Window) -> list[dict[str, Any]]:
        """The transactions in ``window`` that spend from or pay ``address``: hash, first_seen,
        block_height, side (input, output, both) and the summed value of its inputs/outputs there.

        ``address_index`` answers for the rows ingested up to its newest ``ingested_at`` (its high-water
        mark): one row group per date file, by ``address_key`` (block heights: ``_indexed``).
        The rows ingested since (``ingested_at`` >= the mark: the files appended since the last build,
        pruned by their statistics) are scanned whole. A transaction both ways is counted once, from the
        scan. Without an index (an older lake, before the stream's first compaction) the scan reads the
        whole window: the same answer, slower."""
        through = self._indexed_through()
        tail = self._read(
            self.transactions_path,
            [] if through is None else [("ingested_at", ">=", through)],
            window,
            ["hash", "first_seen", "block_height", "inputs", "outputs"],
        )
        found: dict[str, dict[str, Any]] = {}
        if through is not None:
            found = self._indexed(address, window)
        if tail is not None and tail.num_rows:
            # address_rows carries each row's current block_height along (the scan read it).
            matched = tables.address_rows(tail, address)
            for r in matched.select(["hash", "first_seen", "block_height", "side", "value"]).to_pylist():
                found[r["hash"]] = r
        return list(found.values())

    def _indexed(self, address: str, window: Window) -> dict[str, dict[str, Any]]:
        """``address``'s rows of ``address_index`` in ``window``, by hash, with their current block
        heights: the index's, or for a transaction unconfirmed at the build, the one ``transactions``
        holds now (a confirmation only ever sets a null block_height, sinks.merge_transactions)."""
        rows = self._read(
            self.index_path,
            [("address_key", "=", tables.address_key(address))],
            window,
            ["address", "hash", "first_seen", "block_height", "side", "value"],
        )
        if rows is None or rows.num_rows == 0:
            return {}
        rows = rows.filter(pc.equal(rows["address"], address))
        found = {
            r["hash"]: r
            for r in rows.select(["hash", "first_seen", "block_height", "side", "value"]).to_pylist()
        }
        pending = rows.filter(pc.is_null(rows["block_height"]))
        if pending.num_rows:
            # A point read per instant: transactions' row groups hold narrow first_seen ranges (ingest
            # order, about first_seen order), so those without one of these instants are skipped.
            current = self._read(
                self.transactions_path,
                [
                    ("hash", "in", pending["hash"].to_pylist()),
                    ("first_seen", "in", pending["first_seen"].to_pylist()),
                ],
                _span(pending),
                ["hash", "block_height"],
            )
            if current is not None:
                for h, height in zip(
                    current["hash"].to_pylist(), current["block_height"].to_pylist(), strict=True
                ):
                    found[h]["block_height"] = height
        return found

    def _indexed_through(self) -> dt.datetime | None:
        """The address index's high-water mark: its newest ``ingested_at`` by the Delta log's statistics
        (None without an index, or an empty one: then nothing is trusted to it)."""
        if not _is_table(self.index_path):
            return None
        delta = self._delta(self.index_path)
        key = (self.index_path, delta.version())
        if key not in self._marks:
            self._marks = {key: newest(delta, "ingested_at")}
        return self._marks[key]

    def _scorings(self, touching: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Latest scoring of each transaction, read from the row groups of their first_seen instants."""
        if not touching:
            return {}
        seen = [r["first_seen"] for r in touching if r["first_seen"] is not None]
        span = Window(min(seen), max(seen) + _ONE_US) if len(seen) == len(touching) else None
        columns = [c for c in _ADDRESS_SCORED_COLUMNS if c in self._columns()]
        filters: list[Filter] = [("hash", "in", [r["hash"] for r in touching])]
        if span is not None:
            # Scorings carry their transaction's first_seen: within each clustering section the rows are
            # in first_seen order, so row groups without one of these instants are skipped.
            filters.append(("first_seen", "in", seen))
        table = self._read(self.path, filters, span, columns)
        if table is None or table.num_rows == 0:
            return {}
        return {r["hash"]: r for r in _latest_per_hash(table).to_pylist()}

    def _columns(self) -> set[str]:
        try:
            if not self.exists():
                return set()
            return set(pa.schema(self._delta(self.path).schema().to_arrow()).names)
        except Exception:
            return set()

    def _row_columns(self) -> list[str]:
        """The columns a scored row is answered with: all but the partition column (it repeats first_seen)."""
        return [
            c for c in pa.schema(self._delta(self.path).schema().to_arrow()).names if c != tables.DATE_COLUMN
        ]

    def _has_columns(self, *columns: str) -> bool:
        names = self._columns()
        return all(c in names for c in columns)

    def transaction(self, tx_hash: str, window: Window) -> dict[str, Any] | None:
        """The latest scoring of ``tx_hash`` with first_seen in ``window``: found on two columns, then
        read whole from its own time range."""
        found = self._read(self.path, [("hash", "=", tx_hash)], window, ["hash", "first_seen", "scored_at"])
        if found is None or found.num_rows == 0:
            return None
        table = self._read(self.path, [("hash", "=", tx_hash)], _span(found), self._row_columns())
        if table is None or table.num_rows == 0:  # compacted and vacuumed between the two reads
            return None
        latest = pc.select_k_unstable(table, 1, sort_keys=[("scored_at", "descending")])
        row = _jsonable(table.take(latest).to_pylist()[0])
        row["scorings"] = table.num_rows
        return row

    # --- reading -----------------------------------------------------------------------------------
    def _read(
        self, path: Path, filters: list[Filter], window: Window | None, columns: list[str] | None
    ) -> pa.Table | None:
        """Rows of the table at ``path`` in ``window`` (None: the filters bound the read) matching
        ``filters``, projected to ``columns``; None when the table does not exist yet."""
        try:
            if not _is_table(path):
                return None
            delta = self._delta(path)
            if columns is not None:
                names = set(pa.schema(delta.schema().to_arrow()).names)
                columns = [c for c in columns if c in names]
            return read_arrow(
                str(path),
                columns=columns,
                since=window.since if window else None,
                until=window.until if window else None,
                filters=filters,
                table=delta,
            )
        except _lake_errors() as exc:
            raise LakeUnavailable(f"cannot read {path.name}: {str(exc)[:300]}") from exc

    def _delta(self, path: Path) -> Any:
        return self._delta_and_newest(path)[0]

    def _delta_and_newest(self, path: Path) -> tuple[Any, dt.datetime | None]:
        """The open table at ``path`` (its log replayed at most every ``_REFRESH_S``) and its newest
        first_seen (recomputed only when the version changes). A log that cannot be read (torn commit,
        I/O) is ``LakeUnavailable``; an open table keeps its last complete version (delta-rs replays
        only complete commits)."""
        try:
            return self._open_and_newest(path)
        except _lake_errors() as exc:
            raise LakeUnavailable(f"cannot open {path.name}: {str(exc)[:300]}") from exc

    def _open_and_newest(self, path: Path) -> tuple[Any, dt.datetime | None]:
        from deltalake import DeltaTable

        with self._lock:
            now = time.monotonic()
            cached = self._tables.get(path)
            if cached is None:
                table = DeltaTable(str(path))
            else:
                table, refreshed, version, latest = cached
                if now - refreshed <= _REFRESH_S:
                    return table, latest
                table.update_incremental()
                if table.version() == version:
                    self._tables[path] = (table, now, version, latest)
                    return table, latest
            latest = newest(table, "first_seen")
            self._tables[path] = (table, now, table.version(), latest)
            return table, latest


def _lake_errors() -> tuple[type[BaseException], ...]:
    """What a damaged or unreachable table raises: I/O, delta-rs (its exceptions live in the native
    ``_internal`` module, so they are named here, not matched by module) and pyarrow."""
    import pyarrow as pa
    from deltalake.exceptions import DeltaError, DeltaProtocolError, TableNotFoundError

    return (OSError, DeltaError, DeltaProtocolError, TableNotFoundError, pa.ArrowException)


def _is_table(path: Path) -> bool:
    from deltalake import DeltaTable

    return bool(DeltaTable.is_deltatable(str(path)))


def _span(rows: pa.Table) -> Window | None:
    """The first_seen range of ``rows`` (None when one has no first_seen: then hashes alone bound it)."""
    seen = rows["first_seen"]
    if seen.null_count or len(seen) == 0:
        return None
    lo, hi = pc.min_max(seen).values()
    return Window(_utc(lo.as_py()), _utc(hi.as_py()) + _ONE_US)


def _list_has(column: pa.ChunkedArray, value: str, field: str | None = None) -> pa.Array:
    """Rows whose list column (of strings, or of structs compared on ``field``) contains ``value``."""
    lists = column.combine_chunks()
    n = len(lists)
    if lists.null_count:
        lists = pc.fill_null(lists, pa.scalar([], type=lists.type))
    flat = lists.flatten()
    if field is not None:
        flat = flat.field(field)
    hit = pc.fill_null(pc.equal(flat, value), False).to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)[hit]
    mask = np.zeros(n, dtype=bool)
    mask[parents] = True
    return pa.array(mask)


def _utc(ts: dt.datetime) -> dt.datetime:
    return ts.replace(tzinfo=dt.UTC) if ts.tzinfo is None else ts.astimezone(dt.UTC)


def _latest_per_hash(table: pa.Table) -> pa.Table:
    if pc.count_distinct(table["hash"]).as_py() == table.num_rows:
        return table
    order = pc.sort_indices(table, sort_keys=[("hash", "ascending"), ("scored_at", "descending")])
    table = table.take(order)
    hashes = table["hash"].combine_chunks()
    first = pc.not_equal(hashes[1:], hashes[:-1]) if len(hashes) > 1 else pa.array([], pa.bool_())
    keep = pa.concat_arrays([pa.array([True]), first.cast(pa.bool_())])
    return table.filter(keep)


def _iso(ts: dt.datetime) -> str:
    return _utc(ts).isoformat().replace("+00:00", "Z")


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    for key, value in row.items():
        if isinstance(value, dt.datetime):
            row[key] = _iso(value)
        elif isinstance(value, float) and value != value:  # NaN is not JSON
            row[key] = None
    return row
