"""``address_index`` on real Spark + Delta: what ``/addresses/{a}`` answers with the index is what a scan of
every transaction answers (issue #19, item 3).

The lake holds one busy day of the real sample (1,979 transactions): part of it ingested, then the
transactions query's compaction (``maintenance.Compactor``: Spark compaction of ``transactions``, then the
index build), then a confirmation of an indexed transaction (the stream's MERGE, real Spark) and the rest
of the day ingested after the build. Expectations come from the records themselves with pandas.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient

from btc_anomaly.api import lake as api_lake
from btc_anomaly.processing import delta_reader, tables
from btc_anomaly.processing.maintenance import Compactor
from btc_anomaly.processing.sinks import merge_transactions
from helpers.api_server import in_process_api
from helpers.detectors import LABELS, sample_records

pytestmark = pytest.mark.integration

DAY = dt.datetime(2021, 7, 23, tzinfo=dt.UTC)
WINDOW = {"since": DAY.isoformat(), "until": (DAY + dt.timedelta(days=1)).isoformat(), "limit": 1000}
RECORDS = [r for r in sample_records() if r["first_seen"].startswith("2021-07-23")]
INDEXED = 1200  # ingested before the index build; the rest after it
INDEX_ROW_GROUP = 128  # small row groups on a small day: the lookup must skip most of them
BUILT = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)  # ingested_at of the rows before the build
CONFIRMED_AT = 700_000
LAST = 5  # transactions of the last batch before the build: its ingested_at is the index's mark


def _write(root: Path, records: list[dict[str, Any]], ingested_at: dt.datetime) -> None:
    """Append ``records`` to ``transactions`` as the stream stores them (date partition, ingested_at)."""
    from deltalake import write_deltalake

    rows = [
        {
            **r,
            "first_seen": pd.Timestamp(r["first_seen"]).to_pydatetime(),
            "date": pd.Timestamp(r["first_seen"]).date(),
            "ingested_at": ingested_at,
        }
        for r in records
    ]
    write_deltalake(
        str(root / tables.TRANSACTIONS),
        pa.Table.from_pylist(rows, schema=tables.transactions_schema()),
        mode="append",
        partition_by=[tables.DATE_COLUMN],
    )


def _expected(records: list[dict[str, Any]], address: str, heights: dict[str, int]) -> pd.DataFrame:
    """The address's transactions among ``records``, computed with pandas from the records alone."""
    rows = []
    for r in records:
        for side in ("inputs", "outputs"):
            for io in r[side]:
                if io["address"] == address:
                    rows.append({"hash": r["hash"], "side": side[:-1], "value": io["value"]})
    if not rows:
        return pd.DataFrame(columns=["hash", "side", "value", "block_height"])
    frame = pd.DataFrame(rows)
    out = frame.groupby("hash").agg(
        side=("side", lambda s: "both" if s.nunique() == 2 else s.iloc[0]),
        value=("value", lambda v: int(v.fillna(0).sum())),
    )
    block = {r["hash"]: heights.get(r["hash"], r["block_height"]) for r in records}
    out["block_height"] = [block[h] for h in out.index]
    return out.reset_index().sort_values("hash").reset_index(drop=True)


def _answered(client: TestClient, address: str) -> pd.DataFrame:
    body = client.get(f"/addresses/{address}", params=WINDOW).json()
    assert body["count"] == len(body["transactions"]), body  # limit 1000: nothing cut
    frame = pd.DataFrame(body["transactions"], columns=["hash", "side", "value", "block_height"])
    return frame[["hash", "side", "value", "block_height"]].sort_values("hash").reset_index(drop=True)


def _addresses(records: list[dict[str, Any]]) -> set[str]:
    return {
        io["address"] for r in records for side in ("inputs", "outputs") for io in r[side] if io["address"]
    }


@pytest.fixture(scope="module")
def lake(spark: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """The day: ``INDEXED`` transactions ingested and indexed by the stream's compaction, one of them
    then confirmed by the stream's MERGE, the rest ingested after the build. Yields (root, confirmed hash)."""
    from pyspark.sql import functions as F

    root = tmp_path_factory.mktemp("index-lake")
    path = str(root / tables.TRANSACTIONS)
    before, after = RECORDS[:INDEXED], RECORDS[INDEXED:]
    # The sample is confirmed: one transaction is stored as first seen in the mempool, confirmed later.
    target = next(r for r in before if any(o["address"] for o in r["outputs"]))
    stored = [{**r, "block_height": None} if r is target else r for r in before]
    # Three appends before the build (a stream's small files; the last one small), the rest in two after.
    _write(root, stored[:600], BUILT - dt.timedelta(hours=2))
    _write(root, stored[600:-LAST], BUILT - dt.timedelta(hours=1))
    _write(root, stored[-LAST:], BUILT)
    compactor = Compactor(path, 1, index=str(root / tables.ADDRESS_INDEX), row_group_rows=INDEX_ROW_GROUP)
    compactor.wrote(DAY.date())
    compactor.run_if_due(spark)
    assert compactor.since is None  # compacted and indexed
    # A transaction of the index confirmed afterwards, by the stream's update MERGE.
    confirmed = (
        spark.read.format("delta")
        .load(path)
        .where(F.col("hash") == target["hash"])
        .withColumn("block_height", F.lit(CONFIRMED_AT).cast("long"))
        .localCheckpoint()
    )
    result = merge_transactions(confirmed, path, "test-index", 0)
    assert result.updated == 1
    later = BUILT + dt.timedelta(minutes=5)
    _write(root, after[: len(after) // 2], later)
    _write(root, after[len(after) // 2 :], later + dt.timedelta(seconds=1))
    yield root, target["hash"]


@pytest.fixture
def client(lake: tuple[Path, str], tmp_path: Path) -> Iterator[TestClient]:
    with in_process_api(lake[0], tmp_path / "state", watchlist_dir=LABELS, allowed_hosts="*") as c:
        yield c


def test_the_index_answers_what_a_scan_of_every_transaction_answers(
    client: TestClient, lake: tuple[Path, str]
) -> None:
    _, confirmed = lake
    heights = {confirmed: CONFIRMED_AT}
    before, after = _addresses(RECORDS[:INDEXED]), _addresses(RECORDS[INDEXED:])
    target = next(r for r in RECORDS if r["hash"] == confirmed)
    chosen = {
        "confirmed after the build": next(o["address"] for o in target["outputs"] if o["address"]),
        "indexed only": sorted(_addresses(RECORDS[: INDEXED - LAST]) - _addresses(RECORDS[INDEXED - LAST :]))[
            0
        ],
        "ingested after the build only": sorted(after - before)[0],
        "both": sorted(before & after)[0],
    }
    # Also the busiest addresses (many transactions, inputs and outputs, "both" sides).
    counts = pd.Series(
        [a for r in RECORDS for s in ("inputs", "outputs") for a in {io["address"] for io in r[s]}]
    )
    chosen |= {f"busy {i}": a for i, a in enumerate(counts.dropna().value_counts().index[:3])}
    for label, address in chosen.items():
        expected = _expected(RECORDS, address, heights)
        assert len(expected), label
        pd.testing.assert_frame_equal(_answered(client, address), expected, check_dtype=False, obj=label)
    assert _answered(client, "1BoatSLRHtKNngkdXEeobR76b53LETtpyT").empty  # in no transaction of the day


def test_the_rows_ingested_after_the_build_come_from_the_tail_scan(
    client: TestClient, lake: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the scan of the rows ingested since the build, an address of those rows is not found: the
    index alone does not hold them (this fails if the tail scan is dropped)."""
    address = sorted(_addresses(RECORDS[INDEXED:]) - _addresses(RECORDS[:INDEXED]))[0]
    assert len(_answered(client, address)) == len(_expected(RECORDS, address, {}))
    index = delta_reader.read_arrow(lake[0] / tables.ADDRESS_INDEX, columns=["address"])
    assert address not in set(index["address"].to_pylist())

    reads: list[tuple[dict[str, Any], pa.Table]] = []
    real = api_lake.read_arrow

    def recording(path: str, **kwargs: Any) -> pa.Table:
        table = real(path, **kwargs)
        reads.append(({**kwargs, "name": Path(path).name}, table))
        return table

    monkeypatch.setattr(api_lake, "read_arrow", recording)
    _answered(client, address)
    ((tail, rows),) = [
        (r, t) for r, t in reads if r["name"] == tables.TRANSACTIONS and "inputs" in r["columns"]
    ]
    ((column, op, mark),) = tail["filters"]
    assert (column, op) == ("ingested_at", ">=") and BUILT - dt.timedelta(milliseconds=1) <= mark <= BUILT
    # Whole transactions are read for the rows ingested since the build (and the build's last batch:
    # the mark is its ingested_at), not for the day.
    assert rows.num_rows == LAST + len(RECORDS) - INDEXED


def test_a_lookup_reads_one_row_group_of_the_index_per_file(lake: tuple[Path, str]) -> None:
    root, _ = lake
    address = sorted(_addresses(RECORDS[:INDEXED]))[0]
    key = [("address_key", "=", tables.address_key(address))]
    read, total = delta_reader.row_groups_read(root / tables.ADDRESS_INDEX, filters=key)
    rows = delta_reader.read_arrow(root / tables.ADDRESS_INDEX, columns=["address"], filters=key)
    assert set(rows["address"].to_pylist()) == {address}
    # One file (the day); the address's rows are contiguous in it: the groups they fall in, no other.
    assert read <= rows.num_rows // INDEX_ROW_GROUP + 2 and total > 10 * read


def test_without_an_index_the_answer_is_the_same(lake: tuple[Path, str], tmp_path: Path) -> None:
    """An older lake (no index yet): the whole window is scanned, with the same answers."""
    import shutil

    root, confirmed = lake
    bare = tmp_path / "lake"
    shutil.copytree(root / tables.TRANSACTIONS, bare / tables.TRANSACTIONS)
    address = sorted(_addresses(RECORDS[:INDEXED]) & _addresses(RECORDS[INDEXED:]))[0]
    with in_process_api(bare, tmp_path / "state", watchlist_dir=LABELS, allowed_hosts="*") as c:
        answered = _answered(c, address)
    expected = _expected(RECORDS, address, {confirmed: CONFIRMED_AT})
    pd.testing.assert_frame_equal(answered, expected, check_dtype=False)


def test_a_rebuild_of_the_same_dates_is_idempotent(lake: tuple[Path, str], tmp_path: Path) -> None:
    """The build replaces its dates: run twice on a copy, the index holds each (address, tx) once, the
    rows ingested after the first build included."""
    import shutil

    from btc_anomaly.processing.sinks import build_address_index

    root, _ = lake
    copy = tmp_path / "lake"
    shutil.copytree(root, copy)
    for _ in range(2):
        build_address_index(
            str(copy / tables.TRANSACTIONS), str(copy / tables.ADDRESS_INDEX), DAY.date(), INDEX_ROW_GROUP
        )
    index = delta_reader.read_arrow(copy / tables.ADDRESS_INDEX, columns=["address", "hash"]).to_pandas()
    expected = {
        (io["address"], r["hash"])
        for r in RECORDS
        for side in ("inputs", "outputs")
        for io in r[side]
        if io["address"]
    }
    assert not index.duplicated().any()
    assert set(map(tuple, index.to_numpy().tolist())) == expected


def test_a_build_also_covers_dates_written_since_the_mark(lake: tuple[Path, str], tmp_path: Path) -> None:
    """Rows ingested into an older date after the index's mark (a stream run that stopped before its
    compaction: the next run's compactor knows only its own dates) are indexed by the next build."""
    import shutil

    from btc_anomaly.processing.sinks import build_address_index

    root, _ = lake
    copy = tmp_path / "lake"
    shutil.copytree(root, copy)
    older = [r for r in sample_records() if r["first_seen"].startswith("2017-08-24")]
    assert older
    _write(copy, older, BUILT + dt.timedelta(hours=1))
    build_address_index(
        str(copy / tables.TRANSACTIONS), str(copy / tables.ADDRESS_INDEX), DAY.date(), INDEX_ROW_GROUP
    )
    index = delta_reader.read_arrow(copy / tables.ADDRESS_INDEX, columns=["hash"])
    assert {r["hash"] for r in older} <= set(index["hash"].to_pylist())
