"""JVM-free readers of the lake's Delta tables (delta-rs), for the trainer, the API and the dashboard.

``read_table`` / ``read_arrow`` read one table with

* partition pruning: a ``since``/``until`` range on ``time_column`` also restricts the ``date``
  partitions of ``transactions`` (the partition column derived from ``first_seen``), and ``filters``
  on partition columns prune partitions;
* predicate pushdown: every filter, and the time range, is handed to the Arrow dataset scan, which
  skips Parquet row groups by their statistics and reads only ``columns``.

A missing or empty table is an empty frame with the table's columns (from tables.py for the lake's own
tables, else ``schema``), so a consumer started before the stream needs no special case.

Every writer's files read alike. Spark writes strings as plain Parquet strings, ``write_deltalake`` keeps
the Arrow type it is given (``string``, ``large_string`` from polars or older delta-rs, ``string_view``),
and deltalake's own MERGE and DELETE (DataFusion; deltalake 1.x) write files whose embedded Arrow
schema says ``string_view``, so one table mixes them. Two things here make that invisible to callers
(issue #19: ``btc-anomaly detect`` died on its third upsert of ``coordinated_bursts``):

* results always have the plain types of :func:`plain_schema` (``string``, ``binary``, ``list``), whatever
  file they come from;
* filters compare string and binary columns after the scan converted them to those types
  (:func:`_column`): pyarrow tests a predicate against each file's row-group statistics in that *file's*
  type, and has no kernel comparing ``string`` with ``string_view`` ("Function 'greater_equal' has no kernel
  matching input types (string, string_view)"). Whole files are still skipped by the Delta log's
  statistics (``file_pruning_predicate``), so only row-group skipping on string columns is given up.

Row groups are skipped by their Parquet statistics for every other filter, booleans included
(:func:`_without_log_stats`): the stream's compaction writes ``scored_transactions`` clustered
(``tables.CLUSTERING``) in row groups of ``Settings.lake_row_group_rows``, so ``is_anomaly = true`` reads
the anomalies' row groups only.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from btc_anomaly.processing.tables import PARTITION_SOURCE, table_schema

if TYPE_CHECKING:
    from deltalake import DeltaTable

log = logging.getLogger(__name__)

Filter = tuple[str, str, Any]
_OPS = {"=", "==", "!=", "<", "<=", ">", ">=", "in", "not in"}


def _utc(ts: dt.datetime | str | pd.Timestamp) -> dt.datetime:
    t = pd.Timestamp(ts)
    t = t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
    return t.to_pydatetime()


def plain_type(t: pa.DataType) -> pa.DataType:
    """The one Arrow type readers return for ``t``: view and large variants of strings, binaries and lists
    become ``string``, ``binary`` and ``list``, also inside lists, structs and maps."""
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return pa.binary()
    if (
        pa.types.is_list(t)
        or pa.types.is_large_list(t)
        or pa.types.is_list_view(t)
        or pa.types.is_large_list_view(t)
    ):
        return pa.list_(_plain_field(t.value_field))
    if pa.types.is_fixed_size_list(t):
        return pa.list_(_plain_field(t.value_field), t.list_size)
    if pa.types.is_map(t):
        return pa.map_(_plain_field(t.key_field), _plain_field(t.item_field), t.keys_sorted)
    if pa.types.is_struct(t):
        return pa.struct([_plain_field(t.field(i)) for i in range(t.num_fields)])
    return t


def _plain_field(f: pa.Field) -> pa.Field:
    return f.with_type(plain_type(f.type))


def plain_schema(schema: pa.Schema) -> pa.Schema:
    """``schema`` with :func:`plain_type` applied to every field (names, nullability, metadata kept)."""
    return pa.schema([_plain_field(f) for f in schema], metadata=schema.metadata)


def _column(column: str, field_type: pa.DataType | None) -> ds.Expression:
    """The column as filters compare it: strings and binaries after the scan converted them to the plain
    type, so files that store them as views or large types compare alike (module doc)."""
    field = ds.field(column)
    if field_type is not None and (pa.types.is_string(field_type) or pa.types.is_binary(field_type)):
        return field.cast(field_type)
    return field


def _expression(column: str, op: str, value: Any, field_type: pa.DataType | None) -> ds.Expression:
    field = _column(column, field_type)
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
    return plain_schema(schema).empty_table()


def read_arrow(
    path: str | os.PathLike[str],
    columns: Sequence[str] | None = None,
    since: dt.datetime | str | None = None,
    until: dt.datetime | str | None = None,
    filters: Sequence[Filter] | None = None,
    time_column: str = "first_seen",
    schema: pa.Schema | None = None,
    table: DeltaTable | None = None,
) -> pa.Table:
    """Rows of the Delta table at ``path`` with ``since <= time_column < until`` and ``filters`` (ANDed).

    ``filters`` are ``(column, op, value)`` with op in ``= != < <= > >= in "not in"``. ``schema`` is
    only used for the empty result of a missing table that is not one of the lake's own. ``table``: the
    table already opened (a long-lived reader refreshes it itself rather than replaying the log per read).
    """
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    _check(filters)
    if table is None:
        try:
            table = DeltaTable(str(path))
        except TableNotFoundError:
            return empty_table(path, columns, schema)
    dataset, predicate = _scan(table, since, until, filters, time_column)
    return dataset.to_table(columns=list(columns) if columns is not None else None, filter=predicate)


def scan(
    table: DeltaTable,
    since: dt.datetime | str | None = None,
    until: dt.datetime | str | None = None,
    filters: Sequence[Filter] | None = None,
    time_column: str = "first_seen",
) -> tuple[ds.FileSystemDataset, ds.Expression | None]:
    """What ``read_arrow`` reads, not read yet: the Arrow dataset of the files the bounds leave (the Delta
    log's pruning done) and the predicate to scan it with. For a reader that scans the same files in
    several reads without delta-rs in between (e.g. inside a delta-rs write, sinks.build_address_index)."""
    return _scan(table, since, until, filters, time_column)


def row_groups_read(
    path: str | os.PathLike[str],
    since: dt.datetime | str | None = None,
    until: dt.datetime | str | None = None,
    filters: Sequence[Filter] | None = None,
    time_column: str = "first_seen",
) -> tuple[int, int]:
    """(row groups a ``read_arrow`` with these bounds reads, row groups of the table): what the Delta
    log's file statistics and the Parquet row-group statistics skip, without reading any data."""
    from deltalake import DeltaTable

    table = DeltaTable(str(path))
    total = sum(f.num_row_groups for f in table.to_pyarrow_dataset().get_fragments())
    dataset, predicate = _scan(table, since, until, filters, time_column)
    if predicate is None:
        return sum(f.num_row_groups for f in dataset.get_fragments()), total
    read = sum(
        len(f.split_by_row_group(predicate, schema=dataset.schema)) for f in dataset.get_fragments(predicate)
    )
    return read, total


def _scan(
    table: DeltaTable,
    since: dt.datetime | str | None,
    until: dt.datetime | str | None,
    filters: Sequence[Filter] | None,
    time_column: str,
) -> tuple[ds.FileSystemDataset, ds.Expression | None]:
    """The dataset of the files a read may need (Delta log pruning) and the predicate of its scan."""
    filters = _check(filters)
    start = _utc(since) if since is not None else None
    end = _utc(until) if until is not None else None
    plain = plain_schema(pa.schema(table.schema().to_arrow()))
    types = {f.name: f.type for f in plain}
    partition_columns = table.metadata().partition_columns
    booleans = [f for f in filters if types.get(f[0]) is not None and pa.types.is_boolean(types[f[0]])]
    # Whole files are pruned by the Delta log's statistics, except on booleans (see _without_log_stats).
    pruning = _pruning(partition_columns, [f for f in filters if f not in booleans], time_column, start, end)
    # The dataset's schema is the plain one: pyarrow converts each file's columns to it while scanning.
    dataset = table.to_pyarrow_dataset(file_pruning_predicate=pruning or None, schema=plain)
    if booleans:
        dataset = _without_log_stats(dataset, table, partition_columns)
    types = {f.name: f.type for f in dataset.schema}
    conditions = [_expression(c, op, v, types.get(c)) for c, op, v in filters]
    if start is not None:
        conditions.append(_expression(time_column, ">=", start, types.get(time_column)))
    if end is not None:
        conditions.append(_expression(time_column, "<", end, types.get(time_column)))
    predicate = None
    for c in conditions:
        predicate = c if predicate is None else predicate & c
    return dataset, predicate


def _check(filters: Sequence[Filter] | None) -> list[Filter]:
    checked = list(filters or [])
    for _, op, _ in checked:
        if op not in _OPS:
            raise ValueError(f"unsupported filter operator {op!r}; use one of {sorted(_OPS)}")
    return checked


def _without_log_stats(
    dataset: ds.FileSystemDataset, table: DeltaTable, partition_columns: Sequence[str]
) -> ds.FileSystemDataset:
    """``dataset``'s files with only their partition values as guarantees, for a filter on a boolean.

    delta-rs gives every file a guarantee built from its Delta log statistics, and Spark records no
    min/max for booleans: a Spark-written file gets ``col >= null and col <= null``, so pyarrow would drop
    every file for any filter on a boolean column (is_anomaly). Without those guarantees the filter is
    still tested against each Parquet row group's own statistics, which do hold booleans: row groups
    without a matching value (the stream's compaction clusters is_anomaly, sinks.compact) are skipped.
    """
    values: dict[str, ds.Expression] = {}
    if partition_columns:
        actions = pa.table(table.get_add_actions(flatten=True))
        types = {f.name: f.type for f in dataset.schema}
        paths = actions["path"].to_pylist()
        for column in partition_columns:
            name = f"partition.{column}"
            if name not in actions.column_names:
                continue
            for path, value in zip(paths, actions[name].to_pylist(), strict=True):
                cond = (
                    ds.field(column).is_null()
                    if value is None
                    else ds.field(column) == pa.scalar(value, type=types.get(column))
                )
                values[path] = cond if path not in values else values[path] & cond
    fragments = [
        f.format.make_fragment(f.path, f.filesystem, partition_expression=values.get(f.path, ds.scalar(True)))
        for f in dataset.get_fragments()
    ]
    return ds.FileSystemDataset(fragments, dataset.schema, dataset.format, dataset.filesystem)


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


def newest(table: DeltaTable, column: str = "first_seen") -> dt.datetime | None:
    """The largest ``column`` of the table by its Delta log statistics (no data file is read), or None
    when no file records it. Statistics keep timestamps truncated to milliseconds: the true newest
    value may be up to 1 ms later."""
    actions = pa.table(table.get_add_actions(flatten=True))
    name = f"max.{column}"
    if actions.num_rows == 0 or name not in actions.column_names:
        return None
    value = pc.max(actions[name]).as_py()
    return _utc(value) if value is not None else None


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


__all__ = [
    "count_rows",
    "empty_table",
    "newest",
    "plain_schema",
    "plain_type",
    "read_arrow",
    "read_table",
    "row_groups_read",
    "scan",
    "table_version",
]
