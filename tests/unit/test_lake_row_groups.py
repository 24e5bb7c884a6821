"""Row-group skipping of the lake reader (delta_reader), on the real sample transactions (delta-rs, no JVM).

A file clustered on a boolean (as the stream's compaction clusters ``scored_transactions`` on is_anomaly,
test_lake_bounds.py checks that with Spark) is read by its matching row groups only, with the same rows
as a scan of every row group; a partition value still bounds the rows read.
"""

from __future__ import annotations

import datetime as dt
import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import WriterProperties, write_deltalake

from btc_anomaly.config import PROJECT_ROOT
from btc_anomaly.processing import delta_reader, tables
from btc_anomaly.schema import Transaction

SAMPLE = PROJECT_ROOT / "data" / "sample" / "transactions.jsonl.gz"
ROWS = 64  # rows per row group


@pytest.fixture(scope="module")
def clustered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pa.Table]:
    """The sample's transactions, each date partition sorted OP_RETURN first, in row groups of ROWS."""
    with gzip.open(SAMPLE, "rb") as fh:
        txs = [Transaction.from_json(line) for line in fh if line.strip()]
    now = dt.datetime.now(dt.UTC)
    rows = [{**t.model_dump(), "date": t.first_seen.date(), "ingested_at": now} for t in txs]
    table = pa.Table.from_pylist(rows, schema=tables.transactions_schema())
    table = table.sort_by(
        [("date", "ascending"), ("has_op_return", "descending"), ("first_seen", "ascending")]
    )
    path = tmp_path_factory.mktemp("clustered") / tables.TRANSACTIONS
    write_deltalake(
        str(path),
        table,
        partition_by=[tables.DATE_COLUMN],
        writer_properties=WriterProperties(max_row_group_size=ROWS, compression="SNAPPY"),
    )
    return path, table


def test_a_boolean_filter_reads_the_matching_row_groups_only(clustered: tuple[Path, pa.Table]) -> None:
    path, table = clustered
    flagged = [("has_op_return", "=", True)]
    expected = sorted(table.filter(table["has_op_return"])["hash"].to_pylist())
    assert 0 < len(expected) < table.num_rows // 4
    read, total = delta_reader.row_groups_read(path, filters=flagged)
    # Each partition's flagged rows fill ceil(n / ROWS) groups; at most one of them also holds other rows.
    partitions = len(set(table["date"].to_pylist()))
    assert read <= len(expected) // ROWS + partitions < total
    got = delta_reader.read_arrow(path, columns=["hash", "has_op_return"], filters=flagged)
    assert sorted(got["hash"].to_pylist()) == expected and all(got["has_op_return"].to_pylist())
    others = delta_reader.read_arrow(path, columns=["hash"], filters=[("has_op_return", "!=", True)])
    assert others.num_rows == table.num_rows - len(expected)


def test_partition_values_still_bound_a_boolean_read(clustered: tuple[Path, pa.Table]) -> None:
    path, table = clustered
    day = max(table["date"].to_pylist())
    since = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
    flagged = [("has_op_return", "=", True)]
    got = delta_reader.read_arrow(path, columns=["hash", "date"], since=since, filters=flagged)
    in_day = table.filter(pc.and_(table["has_op_return"], pc.equal(table["date"], pa.scalar(day))))
    assert sorted(got["hash"].to_pylist()) == sorted(in_day["hash"].to_pylist())
    assert set(got["date"].to_pylist()) <= {day}
    assert delta_reader.row_groups_read(path, since=since, filters=flagged)[0] <= len(in_day) // ROWS + 1
