"""Names and Arrow schemas of the lake's tables, written by the stream and read by everyone else.

Pure pyarrow (no pyspark), so JVM-free readers (delta_reader.py, the API, the dashboard, the trainer) can
build a correctly typed empty frame for a table that does not exist yet; the stream derives its Spark
types from the same schemas. ``transactions`` is the canonical schema (schema.arrow_schema()) plus the
``date`` partition column and ``ingested_at``.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

from btc_anomaly.schema import arrow_schema

TRANSACTIONS = "transactions"
QUARANTINE = "quarantine"
STATS_1M = "tx_stats_1m"
STATS_5M = "tx_stats_5m"
SCORED = "scored_transactions"  # written by the stream's scoring query (processing/scoring_query.py)
WINDOW_ANOMALIES = "window_anomalies"  # written by `btc-anomaly detect` (detectors/windows.py)
COORDINATED_BURSTS = "coordinated_bursts"  # written by `btc-anomaly detect` (detectors/bursts.py)
# address -> transaction rows of `transactions`, rebuilt by the stream's compaction (sinks.build_address_index)
ADDRESS_INDEX = "address_index"

# UTC date of first_seen: the partition column of `transactions` and `scored_transactions`.
DATE_COLUMN = "date"
PARTITION_COLUMNS: dict[str, list[str]] = {
    TRANSACTIONS: [DATE_COLUMN],
    SCORED: [DATE_COLUMN],
    ADDRESS_INDEX: [DATE_COLUMN],
}
# The timestamp each partition column is derived from (partition pruning for time-range reads).
PARTITION_SOURCE: dict[str, str] = {DATE_COLUMN: "first_seen"}
# Row order of the files the stream's compaction writes (sinks.compact), as (column, "ascending" |
# "descending"), in row groups of Settings.lake_row_group_rows: readers skip row groups by their
# statistics. `scored_transactions`: the forest's anomalies (~1 %) first, so /anomalies reads their row
# group(s) only, then by first_seen, so a point or range in time reads its own row groups only.
# `address_index`: by address_key, so an address's rows sit in one row group of each day's file.
CLUSTERING: dict[str, list[tuple[str, str]]] = {
    SCORED: [("is_anomaly", "descending"), ("first_seen", "ascending")],
    ADDRESS_INDEX: [("address_key", "ascending"), ("first_seen", "ascending")],
}

_TS = pa.timestamp("us", tz="UTC")
_IO_TYPE = pa.list_(pa.struct([pa.field("address", pa.string()), pa.field("value", pa.int64())]))


def transactions_schema() -> pa.Schema:
    return (
        arrow_schema()
        .append(pa.field(DATE_COLUMN, pa.date32(), nullable=False))
        .append(pa.field("ingested_at", _TS, nullable=True))
    )


def address_index_schema() -> pa.Schema:
    """One row per (address, transaction) of ``transactions``: the address's ``side`` in it (input, output,
    both) and the summed ``value`` of its inputs/outputs there (inputs without a prevout value add 0).
    ``first_seen``, ``block_height`` (at the build: a confirmation later sets a null one, nothing else
    changes it, sinks.merge_transactions), ``ingested_at`` and ``date`` are the transaction's. ``address_key``
    (:func:`address_key`) is what files are sorted and row groups skipped by: an integer, whose row-group
    statistics every reader compares alike (delta_reader.py: string filters give up row-group skipping)."""
    return pa.schema(
        [
            pa.field("address_key", pa.int64(), nullable=False),
            pa.field("address", pa.string(), nullable=False),
            pa.field("hash", pa.string(), nullable=False),
            pa.field("first_seen", _TS, nullable=False),
            pa.field("side", pa.string(), nullable=False),
            pa.field("value", pa.int64(), nullable=False),
            pa.field("block_height", pa.int64(), nullable=True),
            pa.field("ingested_at", _TS, nullable=True),
            pa.field(DATE_COLUMN, pa.date32(), nullable=False),
        ]
    )


def address_key(address: str) -> int:
    """The ``address_key`` of ``address``: the first 60 bits of its SHA-256 (collisions are told apart
    by ``address`` itself)."""
    return int(hashlib.sha256(address.encode()).hexdigest()[:15], 16)


def address_rows(transactions: pa.Table, address: str | None = None) -> pa.Table:
    """The ``address_index`` rows of ``transactions`` rows (columns hash, first_seen, inputs, outputs and
    any of block_height, ingested_at, date), one per (address, row), in the index's order
    (``CLUSTERING``); only ``address``'s when given. The one definition of "a transaction touches an
    address": the index build (sinks.build_address_index) and the API's scan of the rows the index does
    not hold yet (api/lake.py) both use it."""
    import numpy as np
    import pyarrow.compute as pc

    codes, rows, values, sides = [], [], [], []
    # Addresses as dictionary codes: the grouping and the keys work on integers, each address hashed once.
    names = pa.array([], pa.string())
    for side, name in enumerate(("inputs", "outputs")):
        lists = transactions[name].combine_chunks() if transactions.num_rows else pa.array([], _IO_TYPE)
        flat = pc.list_flatten(lists)
        addresses = flat.field("address")
        keep = (
            pc.is_valid(addresses) if address is None else pc.fill_null(pc.equal(addresses, address), False)
        )
        kept = addresses.filter(keep)
        encoded = pc.dictionary_encode(pa.concat_arrays([names, kept.cast(pa.string())]))
        names = encoded.dictionary
        codes.append(encoded.indices.slice(len(encoded) - len(kept)).cast(pa.int64()))
        rows.append(pc.list_parent_indices(lists).filter(keep).cast(pa.int64()))
        values.append(flat.field("value").cast(pa.int64()).filter(keep))
        sides.append(pa.array(np.full(len(kept), side, np.int8)))
    # Codes of the inputs' addresses are positions in the first dictionary, a prefix of the final one.
    grouped = (
        pa.table(
            {
                "code": pa.concat_arrays(codes),
                "row": pa.concat_arrays(rows),
                "value": pa.concat_arrays(values),
                "side": pa.concat_arrays(sides),
            }
        )
        .group_by(["code", "row"], use_threads=False)
        .aggregate(
            [
                ("value", "sum", pc.ScalarAggregateOptions(skip_nulls=True, min_count=0)),
                ("side", "min"),
                ("side", "max"),
            ]
        )
    )
    keys = pa.array([address_key(a) for a in names.to_pylist()], pa.int64())
    # Sorted as the index stores them (CLUSTERING) before the wide columns are gathered: one take each.
    order = pc.sort_indices(
        pa.table(
            {
                "address_key": keys.take(grouped["code"]),
                "first_seen": transactions["first_seen"].take(grouped["row"]),
            }
        ),
        sort_keys=CLUSTERING[ADDRESS_INDEX],
    )
    grouped = grouped.take(order)
    code, row = grouped["code"], grouped["row"]
    # 0 input only, 1 output only, 2 both.
    side = pc.if_else(pc.equal(grouped["side_min"], grouped["side_max"]), grouped["side_min"], 2)
    columns: dict[str, pa.Array | pa.ChunkedArray] = {
        "address_key": keys.take(code),
        "address": names.take(code),
        "hash": transactions["hash"].take(row),
        "first_seen": transactions["first_seen"].take(row),
        "side": pa.array(["input", "output", "both"]).take(side.cast(pa.int8())),
        "value": pc.fill_null(grouped["value_sum"], 0),
    }
    for name in ("block_height", "ingested_at", DATE_COLUMN):
        if name in transactions.column_names:
            columns[name] = transactions[name].take(row)
    schema = address_index_schema()
    return pa.table(columns).cast(pa.schema([schema.field(n) for n in columns]))


def quarantine_schema() -> pa.Schema:
    return pa.schema(
        [
            pa.field("key", pa.binary()),
            pa.field("value", pa.binary()),
            pa.field("error", pa.string()),
            pa.field("errors", pa.list_(pa.field("element", pa.string()))),
            pa.field("topic", pa.string()),
            pa.field("partition", pa.int32()),
            pa.field("offset", pa.int64()),
            pa.field("kafka_timestamp", _TS),
            pa.field("quarantined_at", _TS),
        ]
    )


def stats_schema() -> pa.Schema:
    """One row per tumbling window (tx_stats_1m, tx_stats_5m); values in satoshis, fee rates in sat/vB."""
    doubles = [
        "median_value",
        "fee_p50",
        "fee_p90",
        "fee_p99",
        "fee_rate_p50",
        "fee_rate_p90",
        "fee_rate_p99",
    ]
    return pa.schema(
        [
            pa.field("window_start", _TS, nullable=False),
            pa.field("window_end", _TS, nullable=False),
            pa.field("tx_count", pa.int64(), nullable=False),
            pa.field("total_value", pa.int64()),
            *[pa.field(name, pa.float64()) for name in doubles],
            pa.field("fan_in_count", pa.int64()),
            pa.field("fan_out_count", pa.int64()),
            pa.field("updated_at", _TS),
        ]
    )


def window_anomalies_schema() -> pa.Schema:
    """One row per flagged (1-minute window, metric); key (window_start, metric). ``value``/``expected``
    on the metric's own scale, ``std`` and ``z`` on the compared scale (log1p for volume and fee rate)."""
    return pa.schema(
        [
            pa.field("window_start", _TS, nullable=False),
            pa.field("window_end", _TS, nullable=False),
            pa.field("metric", pa.string(), nullable=False),
            pa.field("value", pa.float64()),
            pa.field("expected", pa.float64()),
            pa.field("std", pa.float64()),
            pa.field("z", pa.float64(), nullable=False),
            pa.field("threshold", pa.float64(), nullable=False),
            pa.field("detected_at", _TS, nullable=False),
        ]
    )


def coordinated_bursts_schema() -> pa.Schema:
    """One row per coordinated burst; key ``burst_id`` (stable while the burst grows)."""
    return pa.schema(
        [
            pa.field("burst_id", pa.string(), nullable=False),
            pa.field("kind", pa.string(), nullable=False),  # fan_out | fan_in
            pa.field("window_start", _TS, nullable=False),  # first member's first_seen
            pa.field("window_end", _TS, nullable=False),  # last member's first_seen
            pa.field("size", pa.int64(), nullable=False),
            pa.field("member_hashes", pa.list_(pa.field("element", pa.string())), nullable=False),
            pa.field("representative_hash", pa.string(), nullable=False),
            pa.field("avg_inputs", pa.float64(), nullable=False),
            pa.field("avg_outputs", pa.float64(), nullable=False),
            pa.field("total_value", pa.int64(), nullable=False),
            pa.field("shared_addresses", pa.list_(pa.field("element", pa.string()))),
            pa.field("reason", pa.string(), nullable=False),
            pa.field("detected_at", _TS, nullable=False),
        ]
    )


# The tables the stream writes (its maintenance vacuums them) and those `btc-anomaly detect` writes.
STREAM_TABLES = (TRANSACTIONS, QUARANTINE, STATS_1M, STATS_5M, SCORED)
DETECT_TABLES = (WINDOW_ANOMALIES, COORDINATED_BURSTS)
# Derived by the stream from its tables (rebuildable; vacuumed with them).
INDEX_TABLES = (ADDRESS_INDEX,)

SCHEMAS = {
    TRANSACTIONS: transactions_schema,
    QUARANTINE: quarantine_schema,
    STATS_1M: stats_schema,
    STATS_5M: stats_schema,
    WINDOW_ANOMALIES: window_anomalies_schema,
    COORDINATED_BURSTS: coordinated_bursts_schema,
    ADDRESS_INDEX: address_index_schema,
}


def table_schema(name: str) -> pa.Schema | None:
    """The Arrow schema of a lake table by name (the last path component), or None if not one of ours."""
    make = SCHEMAS.get(name)
    return make() if make is not None else None
