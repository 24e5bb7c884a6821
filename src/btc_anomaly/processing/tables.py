"""Names and Arrow schemas of the lake's tables, written by the stream and read by everyone else.

Pure pyarrow (no pyspark), so JVM-free readers (delta_reader.py, the API, the dashboard, the trainer) can
build a correctly typed empty frame for a table that does not exist yet; the stream derives its Spark
types from the same schemas. ``transactions`` is the canonical schema (schema.arrow_schema()) plus the
``date`` partition column and ``ingested_at``.
"""

from __future__ import annotations

import pyarrow as pa

from btc_anomaly.schema import arrow_schema

TRANSACTIONS = "transactions"
QUARANTINE = "quarantine"
STATS_1M = "tx_stats_1m"
STATS_5M = "tx_stats_5m"
SCORED = "scored_transactions"  # written by the stream's scoring query (processing/scoring_query.py)
WINDOW_ANOMALIES = "window_anomalies"  # written by `btc-anomaly detect` (detectors/windows.py)
COORDINATED_BURSTS = "coordinated_bursts"  # written by `btc-anomaly detect` (detectors/bursts.py)

# UTC date of first_seen: the partition column of `transactions` and `scored_transactions`.
DATE_COLUMN = "date"
PARTITION_COLUMNS: dict[str, list[str]] = {TRANSACTIONS: [DATE_COLUMN], SCORED: [DATE_COLUMN]}
# The timestamp each partition column is derived from (partition pruning for time-range reads).
PARTITION_SOURCE: dict[str, str] = {DATE_COLUMN: "first_seen"}
# Row order of the files the stream's compaction writes (sinks.compact), as (column, "ascending" |
# "descending"), in row groups of Settings.lake_row_group_rows: readers skip row groups by their
# statistics. `scored_transactions`: the forest's anomalies (~1 %) first, so /anomalies reads their row
# group(s) only, then by first_seen, so a point or range in time reads its own row groups only.
CLUSTERING: dict[str, list[tuple[str, str]]] = {
    SCORED: [("is_anomaly", "descending"), ("first_seen", "ascending")],
}

_TS = pa.timestamp("us", tz="UTC")


def transactions_schema() -> pa.Schema:
    return (
        arrow_schema()
        .append(pa.field(DATE_COLUMN, pa.date32(), nullable=False))
        .append(pa.field("ingested_at", _TS, nullable=True))
    )


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

SCHEMAS = {
    TRANSACTIONS: transactions_schema,
    QUARANTINE: quarantine_schema,
    STATS_1M: stats_schema,
    STATS_5M: stats_schema,
    WINDOW_ANOMALIES: window_anomalies_schema,
    COORDINATED_BURSTS: coordinated_bursts_schema,
}


def table_schema(name: str) -> pa.Schema | None:
    """The Arrow schema of a lake table by name (the last path component), or None if not one of ours."""
    make = SCHEMAS.get(name)
    return make() if make is not None else None
