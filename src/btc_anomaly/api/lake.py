"""Reads of the stream's ``scored_transactions`` Delta table for ``/anomalies`` and ``/transactions/{hash}``.

Reading goes through ``_reader()``: the project's shared reader (``processing.delta_reader.read_arrow``:
file pruning by statistics, predicate pushdown) when it is importable, else deltalake's PyArrow dataset
directly with the same filters pushed down. Either way only matching row groups are read.

The table may hold one transaction several times (re-scored after confirmation or by a new model
version): both endpoints answer with the latest scoring of each transaction (``scored_at``).
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from btc_anomaly.config import Settings

_REFRESH_S = 1.0
_TS = pa.timestamp("us", tz="UTC")


Filter = tuple[str, str, Any]


def _reader() -> Callable[..., pa.Table] | None:
    """The project's Delta reader when it exists (it knows the lake's tables and partitioning)."""
    try:
        from btc_anomaly.processing.delta_reader import read_arrow
    except ImportError:
        return None
    return read_arrow


class LakeUnavailable(Exception):
    """The lake folder or the table cannot be read (I/O, permissions, corrupt log)."""


class ScoredTable:
    def __init__(self, settings: Settings) -> None:
        self.lake_dir = Path(settings.lake_dir)
        self.path = Path(settings.api_scored_table or settings.lake_table("scored_transactions"))
        self._table: Any = None
        self._refreshed = 0.0
        self._lock = threading.Lock()

    # --- status ------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """For /ready: is the lake folder reachable, and does the scored table exist yet."""
        reachable = self.lake_dir.is_dir() and os.access(self.lake_dir, os.R_OK | os.X_OK)
        info: dict[str, Any] = {"root": str(self.lake_dir), "reachable": reachable, "table": str(self.path)}
        if reachable:
            try:
                info["table_exists"] = self.exists()
                if info["table_exists"]:
                    info["table_version"] = self._delta().version()
            except Exception as exc:  # a broken log is reported, not raised, by /ready
                info["table_error"] = str(exc)[:300]
        return info

    def exists(self) -> bool:
        from deltalake import DeltaTable

        return bool(DeltaTable.is_deltatable(str(self.path)))

    # --- queries -----------------------------------------------------------------------------------
    def anomalies(
        self, since: dt.datetime | None, until: dt.datetime | None, min_score: float, limit: int
    ) -> list[dict[str, Any]]:
        table = self._read(
            [("is_anomaly", "=", True), ("anomaly_score", ">=", float(min_score))], since, until
        )
        if table is None or table.num_rows == 0:
            return []
        table = _latest_per_hash(table)
        top = pc.select_k_unstable(table, limit, sort_keys=[("anomaly_score", "descending")])
        table = table.take(top).sort_by([("anomaly_score", "descending"), ("hash", "ascending")])
        return [_jsonable(r) for r in table.to_pylist()]

    def transaction(self, tx_hash: str) -> dict[str, Any] | None:
        table = self._read([("hash", "=", tx_hash)], None, None)
        if table is None or table.num_rows == 0:
            return None
        latest = pc.select_k_unstable(table, 1, sort_keys=[("scored_at", "descending")])
        row = _jsonable(table.take(latest).to_pylist()[0])
        row["scorings"] = table.num_rows
        return row

    # --- reading -----------------------------------------------------------------------------------
    def _read(
        self, filters: list[Filter], since: dt.datetime | None, until: dt.datetime | None
    ) -> pa.Table | None:
        try:
            if not self.exists():
                return None
            reader = _reader()
            if reader is not None:
                return reader(str(self.path), since=since, until=until, filters=filters)
            expr = _expression(filters, since, until)
            delta = self._delta()
            try:
                return delta.to_pyarrow_dataset().to_table(filter=expr)
            except Exception:  # features the dataset reader lacks (e.g. deletion vectors): read, then filter
                return delta.to_pyarrow_table().filter(expr)
        except OSError as exc:
            raise LakeUnavailable(f"cannot read {self.path}: {exc}") from exc
        except Exception as exc:
            if type(exc).__module__.startswith(("deltalake", "pyarrow")):
                raise LakeUnavailable(f"cannot read {self.path}: {str(exc)[:300]}") from exc
            raise

    def _delta(self) -> Any:
        from deltalake import DeltaTable

        with self._lock:
            now = time.monotonic()
            if self._table is None:
                self._table = DeltaTable(str(self.path))
                self._refreshed = now
            elif now - self._refreshed > _REFRESH_S:
                self._table.update_incremental()
                self._refreshed = now
            return self._table


def _expression(filters: list[Filter], since: dt.datetime | None, until: dt.datetime | None) -> ds.Expression:
    """The filters (only ``=`` and ``>=`` are used here) and the first_seen range as one dataset expression."""
    parts = [ds.field(c) == v if op == "=" else ds.field(c) >= v for c, op, v in filters]
    if since is not None:
        parts.append(ds.field("first_seen") >= pa.scalar(_utc(since), _TS))
    if until is not None:
        parts.append(ds.field("first_seen") < pa.scalar(_utc(until), _TS))
    expr = parts[0]
    for part in parts[1:]:
        expr = expr & part
    return expr


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


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    for key, value in row.items():
        if isinstance(value, dt.datetime):
            row[key] = _utc(value).isoformat().replace("+00:00", "Z")
        elif isinstance(value, float) and value != value:  # NaN is not JSON
            row[key] = None
    return row
