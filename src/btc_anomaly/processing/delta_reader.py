"""JVM-free readers of the lake's Delta tables (delta-rs), for the trainer, the API and the dashboard.

``read_table`` / ``read_arrow`` read one table with

* partition pruning: a ``since``/``until`` range on ``time_column`` also restricts the ``date``
  partitions of ``transactions`` (the partition column derived from ``first_seen``), and ``filters``
  on partition columns prune partitions;
* predicate pushdown: every filter, and the time range, is handed to the Arrow dataset scan, which
  skips Parquet row groups by their statistics and reads only ``columns``.

A missing or empty table is an empty frame with the table's columns (from tables.py for the lake's own
tables, else ``schema``), so a consumer started before the stream needs no special case.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds

from btc_anomaly.processing.tables import PARTITION_SOURCE, table_schema

log = logging.getLogger(__name__)

Filter = tuple[str, str, Any]
_OPS = {"=", "==", "!=", "<", "<=", ">", ">=", "in", "not in"}


def _utc(ts: dt.datetime | str | pd.Timestamp) -> dt.datetime:
    t = pd.Timestamp(ts)
    t = t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
    return t.to_pydatetime()


def _expression(column: str, op: str, value: Any, field_type: pa.DataType | None) -> ds.Expression:
    field = ds.field(column)
    if op in ("in", "not in"):
        values = pa.array(list(value), type=field_type) if field_type is not None else pa.array(list(value))
        expr = field.isin(values)
        return ~expr if op == "not in" else expr
    scalar = pa.scalar(value, type=field_type) if field_type is not None else pa.scalar(value)
    return {
        "=": field == scalar,
        "==": field == scalar,
        "!=": field != scalar,
        "<": field < scalar,
        "<=": field <= scalar,
        ">": field > scalar,
        ">=": field >= scalar,
    }[op]


def _pruning(
    partition_columns: Sequence[str],
    filters: Sequence[Filter],
    time_column: str,
    since: dt.datetime | None,
    until: dt.datetime | None,
) -> list[tuple[str, str, Any]]:
    """delta-rs file pruning: exact on partition columns, by per-file min/max statistics on the others.

    The time range is applied to ``time_column`` itself (statistics) and, when a partition column is
    derived from it (``date`` from ``first_seen``), to that partition column (whole partitions).
    """
    out: list[tuple[str, str, Any]] = []
    for column, op, value in filters:
        out.append((column, "=" if op == "==" else op, list(value) if op in ("in", "not in") else value))
    if since is not None:
        out.append((time_column, ">=", since))
    if until is not None:
        # Statistics prune with "<=": a file whose minimum equals `until` holds no row of the range,
        # but the inclusive form is what min/max pruning can decide safely for every type.
        out.append((time_column, "<=", until))
    for column in partition_columns:
        if PARTITION_SOURCE.get(column) != time_column:
            continue
        if since is not None:
            out.append((column, ">=", since.date()))
        if until is not None:
            out.append((column, "<=", until.date()))
    return out


def empty_table(
    path: str | os.PathLike[str], columns: Sequence[str] | None, schema: pa.Schema | None
) -> pa.Table:
    schema = schema if schema is not None else table_schema(Path(path).name)
    if schema is None:
        return pa.table({c: pa.array([], pa.null()) for c in columns or []})
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns if c in schema.names])
    return schema.empty_table()


def read_arrow(
    path: str | os.PathLike[str],
    columns: Sequence[str] | None = None,
    since: dt.datetime | str | None = None,
    until: dt.datetime | str | None = None,
    filters: Sequence[Filter] | None = None,
    time_column: str = "first_seen",
    schema: pa.Schema | None = None,
) -> pa.Table:
    """Rows of the Delta table at ``path`` with ``since <= time_column < until`` and ``filters`` (ANDed).

    ``filters`` are ``(column, op, value)`` with op in ``= != < <= > >= in "not in"``. ``schema`` is
    only used for the empty result of a missing table that is not one of the lake's own.
    """
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    filters = list(filters or [])
    for _, op, _ in filters:
        if op not in _OPS:
            raise ValueError(f"unsupported filter operator {op!r}; use one of {sorted(_OPS)}")
    start = _utc(since) if since is not None else None
    end = _utc(until) if until is not None else None
    try:
        table = DeltaTable(str(path))
    except TableNotFoundError:
        return empty_table(path, columns, schema)
    types = {f.name: f.type for f in pa.schema(table.schema().to_arrow())}
    # delta-rs gives every file a partition expression built from its Delta statistics; Spark records no
    # min/max for booleans, so a Spark-written file gets `col >= null and col <= null`, and pyarrow then
    # drops every file for any filter on a boolean column (is_anomaly). Those are applied after the scan.
    late = [f for f in filters if types.get(f[0]) is not None and pa.types.is_boolean(types[f[0]])]
    filters = [f for f in filters if f not in late]
    pruning = _pruning(table.metadata().partition_columns, filters, time_column, start, end)
    dataset = table.to_pyarrow_dataset(file_pruning_predicate=pruning or None)
    types = {f.name: f.type for f in dataset.schema}
    conditions = [_expression(c, op, v, types.get(c)) for c, op, v in filters]
    if start is not None:
        conditions.append(ds.field(time_column) >= pa.scalar(start, type=types.get(time_column)))
    if end is not None:
        conditions.append(ds.field(time_column) < pa.scalar(end, type=types.get(time_column)))
    predicate = None
    for c in conditions:
        predicate = c if predicate is None else predicate & c
    if not late:
        return dataset.to_table(columns=list(columns) if columns is not None else None, filter=predicate)
    wanted = list(columns) if columns is not None else dataset.schema.names
    extra = [c for c, _, _ in late if c not in wanted]
    result = dataset.to_table(columns=wanted + extra, filter=predicate)
    late_predicate = None
    for c, op, v in late:
        cond = _expression(c, op, v, types.get(c))
        late_predicate = cond if late_predicate is None else late_predicate & cond
    return result.filter(late_predicate).select(wanted)


def read_table(
    path: str | os.PathLike[str],
    columns: Sequence[str] | None = None,
    since: dt.datetime | str | None = None,
    until: dt.datetime | str | None = None,
    filters: Sequence[Filter] | None = None,
    time_column: str = "first_seen",
    schema: pa.Schema | None = None,
) -> pd.DataFrame:
    """``read_arrow`` as pandas (timestamps tz-aware UTC; lists of structs as lists of dicts)."""
    return read_arrow(path, columns, since, until, filters, time_column, schema).to_pandas()


def table_version(path: str | os.PathLike[str]) -> int | None:
    """Current version of the Delta table, or None when it does not exist (cheap change detection)."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return DeltaTable(str(path)).version()
    except TableNotFoundError:
        return None


def count_rows(path: str | os.PathLike[str], filters: Sequence[Filter] | None = None) -> int:
    """Row count without materializing columns (partition pruning and statistics still apply)."""
    table = read_arrow(path, columns=[], filters=filters)
    return table.num_rows


__all__ = ["count_rows", "empty_table", "read_arrow", "read_table", "table_version"]
