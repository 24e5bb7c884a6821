"""delta_reader: JVM-free reads of the lake with partition pruning, pushdown and typed empty results."""

from __future__ import annotations

import datetime as dt
import gzip
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from deltalake import write_deltalake

from btc_anomaly.config import PROJECT_ROOT
from btc_anomaly.processing import delta_reader, tables
from btc_anomaly.schema import Transaction

SAMPLE = PROJECT_ROOT / "data" / "sample" / "transactions.jsonl.gz"


@pytest.fixture(scope="module")
def sample() -> list[Transaction]:
    with gzip.open(SAMPLE, "rb") as fh:
        return [Transaction.from_json(line) for line in fh if line.strip()]


def _rows(txs: list[Transaction]) -> pa.Table:
    now = dt.datetime.now(dt.UTC)
    rows = [{**t.model_dump(), "date": t.first_seen.date(), "ingested_at": now} for t in txs]
    return pa.Table.from_pylist(rows, schema=tables.transactions_schema())


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory, sample: list[Transaction]) -> Path:
    path = tmp_path_factory.mktemp("lake") / "transactions"
    write_deltalake(str(path), _rows(sample), partition_by=[tables.DATE_COLUMN])
    return path


def _frame(txs: list[Transaction]) -> pd.DataFrame:
    return pd.DataFrame([t.model_dump() for t in txs])


def test_missing_table_is_an_empty_frame_with_the_table_columns(tmp_path: Path) -> None:
    df = delta_reader.read_table(tmp_path / "transactions")
    assert df.empty
    assert list(df.columns) == tables.transactions_schema().names
    assert str(df["first_seen"].dtype) == "datetime64[us, UTC]"
    assert list(delta_reader.read_table(tmp_path / "transactions", columns=["hash", "fee"]).columns) == [
        "hash",
        "fee",
    ]
    assert list(delta_reader.read_table(tmp_path / "tx_stats_1m").columns) == tables.stats_schema().names
    custom = pa.schema([pa.field("score", pa.float64())])
    assert list(delta_reader.read_table(tmp_path / "scored", schema=custom).columns) == ["score"]
    assert delta_reader.table_version(tmp_path / "transactions") is None


def test_empty_existing_table(tmp_path: Path) -> None:
    path = tmp_path / "quarantine"
    write_deltalake(str(path), tables.quarantine_schema().empty_table())
    df = delta_reader.read_table(path)
    assert df.empty and list(df.columns) == tables.quarantine_schema().names
    assert delta_reader.count_rows(path) == 0


def test_reads_every_row_and_field(lake: Path, sample: list[Transaction]) -> None:
    table = delta_reader.read_arrow(lake)
    assert table.num_rows == len(sample)
    by_hash = {r["hash"]: r for r in table.to_pylist()}
    for tx in sample[:500]:
        row = {k: v for k, v in by_hash[tx.hash].items() if k in Transaction.model_fields}
        assert Transaction.model_validate(row) == tx


def test_time_range_prunes_partitions_and_filters_rows(lake: Path, sample: list[Transaction]) -> None:
    since = dt.datetime(2017, 8, 24, 1, 57, tzinfo=dt.UTC)
    until = dt.datetime(2021, 7, 23, 8, 30)  # naive: taken as UTC
    want = sorted(t.hash for t in sample if since <= t.first_seen < until.replace(tzinfo=dt.UTC))
    # Break every data file outside the range: the read must not open them (partition pruning).
    for part in lake.glob("date=*"):
        day = dt.date.fromisoformat(part.name.split("=", 1)[1])
        if not since.date() <= day <= until.date():
            for f in part.glob("*.parquet"):
                f.write_bytes(b"not parquet")
    df = delta_reader.read_table(lake, columns=["hash", "first_seen"], since=since, until=until)
    assert sorted(df["hash"]) == want
    assert df["first_seen"].min() >= pd.Timestamp(since)
    assert df["first_seen"].max() < pd.Timestamp(until, tz="UTC")
    with pytest.raises(Exception):  # noqa: B017 - any error: the broken files are really broken
        delta_reader.read_table(lake)


def test_filters_push_down(tmp_path: Path, sample: list[Transaction]) -> None:
    path = tmp_path / "transactions"
    write_deltalake(str(path), _rows(sample), partition_by=[tables.DATE_COLUMN])
    df = _frame(sample)
    got = delta_reader.read_table(path, columns=["hash"], filters=[("input_count", ">=", 10)])
    assert sorted(got["hash"]) == sorted(df.loc[df.input_count >= 10, "hash"])
    day = sample[0].first_seen.date()
    got = delta_reader.read_table(
        path, columns=["hash"], filters=[("date", "=", day), ("is_segwit", "=", True)]
    )
    want = df[(pd.to_datetime(df.first_seen, utc=True).dt.date == day) & df.is_segwit]
    assert sorted(got["hash"]) == sorted(want["hash"])
    some = [t.hash for t in sample[:7]]
    got = delta_reader.read_table(path, columns=["hash", "fee"], filters=[("hash", "in", some)])
    assert sorted(got["hash"]) == sorted(some)
    with pytest.raises(ValueError, match="unsupported filter operator"):
        delta_reader.read_table(path, filters=[("fee", "~", 1)])
    assert delta_reader.count_rows(path) == len(sample)
    assert delta_reader.table_version(path) == 0
