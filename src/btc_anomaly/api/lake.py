"""Reads of the stream's ``scored_transactions`` Delta table for ``/anomalies`` and ``/transactions/{hash}``.

Reading goes through ``_reader()``: the project's shared reader (``processing.delta_reader.read_arrow``:
file pruning by statistics, predicate pushdown) when it is importable, else deltalake's PyArrow dataset
directly with the same filters pushed down. Either way only matching row groups are read.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from btc_anomaly.config import Settings

_REFRESH_S = 1.0
ADDRESS_MAX_SCORED = 10_000  # scorings joined per address (newest transactions first)
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
        self.transactions_path = Path(settings.lake_table("transactions"))
        self.watchlist_dir = settings.watchlist_dir
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
        self,
        since: dt.datetime | None,
        until: dt.datetime | None,
        min_score: float,
        limit: int,
        *,
        severity: list[str] | None = None,
        rule: str | None = None,
        watchlist: str | None = None,
    ) -> list[dict[str, Any]]:
        """Without detector filters: the forest's anomalies by score. With any of ``severity`` (one of),
        ``rule`` (fired) or ``watchlist`` (hit): every matching row, by risk score."""
        by_risk = bool(severity or rule or watchlist)
        filters: list[Filter] = [("anomaly_score", ">=", float(min_score))]
        if by_risk:
            if not self._has_columns("severity", "rule_hits", "watchlist_hits"):
                return []  # a table written before the detectors: nothing can match
            if severity:
                filters.append(("severity", "in", list(severity)))
        else:
            filters.append(("is_anomaly", "=", True))
        table = self._read(filters, since, until)
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
        top = pc.select_k_unstable(table, limit, sort_keys=[(key, "descending"), ("hash", "ascending")])
        table = table.take(top).sort_by([(key, "descending"), ("hash", "ascending")])
        return [_jsonable(r) for r in table.to_pylist()]

    def address(
        self, address: str, since: dt.datetime | None, until: dt.datetime | None, limit: int
    ) -> dict[str, Any]:
        """The address's transactions (newest first), their scorings, its watchlist entries, highest risk."""
        from btc_anomaly.detectors.watchlist import load_watchlist

        listed = [
            {"list": e.list, "category": e.category, "label": e.label}
            for e in load_watchlist(self.watchlist_dir).lookup(address)
        ]
        touching = self._touching(address, since, until)
        count = len(touching)
        touching.sort(
            key=lambda r: (r["first_seen"] or dt.datetime.min.replace(tzinfo=dt.UTC), r["hash"]), reverse=True
        )
        scored = self._scorings([r["hash"] for r in touching[:ADDRESS_MAX_SCORED]])
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
            "tables": {"transactions": str(self.transactions_path), "scored": str(self.path)},
        }

    def _touching(
        self, address: str, since: dt.datetime | None, until: dt.datetime | None
    ) -> list[dict[str, Any]]:
        from deltalake import DeltaTable

        reader = _reader()
        try:
            if reader is None or not DeltaTable.is_deltatable(str(self.transactions_path)):
                return []
            table = reader(
                str(self.transactions_path),
                columns=["hash", "first_seen", "block_height", "inputs", "outputs"],
                since=since,
                until=until,
            )
        except OSError as exc:
            raise LakeUnavailable(f"cannot read {self.transactions_path}: {exc}") from exc
        except Exception as exc:
            if type(exc).__module__.startswith(("deltalake", "pyarrow")):
                raise LakeUnavailable(f"cannot read {self.transactions_path}: {str(exc)[:300]}") from exc
            raise
        found: dict[int, dict[str, Any]] = {}
        for side in ("inputs", "outputs"):
            lists = table[side].combine_chunks()
            flat = lists.flatten()
            match = pc.fill_null(pc.equal(flat.field("address"), address), False)
            idx = np.flatnonzero(match.to_numpy(zero_copy_only=False))
            if not len(idx):
                continue
            parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)[idx]
            values = flat.field("value").to_numpy(zero_copy_only=False)[idx]
            for row, value in zip(parents.tolist(), values.tolist(), strict=True):
                entry = found.setdefault(row, {"value": 0, "sides": set()})
                entry["sides"].add(side[:-1])
                if value == value and value is not None:  # inputs without prevouts have no value
                    entry["value"] += int(value)
        if not found:
            return []
        rows = sorted(found)
        meta = table.select(["hash", "first_seen", "block_height"]).take(pa.array(rows)).to_pylist()
        out = []
        for row, m in zip(rows, meta, strict=True):
            sides = found[row]["sides"]
            out.append(
                {**m, "side": "both" if len(sides) == 2 else next(iter(sides)), "value": found[row]["value"]}
            )
        return list({r["hash"]: r for r in out}.values())  # one row per tx (MERGE keeps one copy anyway)

    def _scorings(self, hashes: list[str]) -> dict[str, dict[str, Any]]:
        if not hashes:
            return {}
        table = self._read([("hash", "in", hashes)], None, None)
        if table is None or table.num_rows == 0:
            return {}
        return {r["hash"]: r for r in _latest_per_hash(table).to_pylist()}

    def _has_columns(self, *columns: str) -> bool:
        try:
            if not self.exists():
                return False
            names = set(self._delta().schema().to_arrow().names)
        except Exception:
            return False
        return all(c in names for c in columns)

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


def _expression(filters: list[Filter], since: dt.datetime | None, until: dt.datetime | None) -> ds.Expression:
    """The filters (``=``, ``>=`` and ``in``) and the first_seen range as one dataset expression."""
    parts = [
        ds.field(c) == v if op == "=" else ds.field(c).isin(v) if op == "in" else ds.field(c) >= v
        for c, op, v in filters
    ]
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
