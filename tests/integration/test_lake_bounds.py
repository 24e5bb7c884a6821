"""Bounded lake reads and lake upkeep on real Spark + Delta (issue #19, item 3).

``scored_transactions`` holds the real sample scored by the sample bundle, in the stream's layout (date
partitions, several appends plus a re-scoring), and is read by the real API app (in-process): the
endpoints read only their time window (default, explicit, refused past the maximum) and only the columns
they need. With real Spark: compaction and VACUUM keep a table's content exact, and an unpartitioned table
of an older release is rewritten partitioned (test_stream_scoring.py checks the stream writes it
partitioned).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake
from fastapi.testclient import TestClient

from btc_anomaly.api import lake as api_lake
from btc_anomaly.config import Settings
from btc_anomaly.detectors.risk import SEVERITIES
from btc_anomaly.model.scoring import score_frame, scored_arrow_schema
from btc_anomaly.processing import delta_reader, tables
from btc_anomaly.processing.maintenance import vacuum
from btc_anomaly.processing.scoring_query import ensure_partitioned
from btc_anomaly.processing.sinks import compact
from helpers.api_server import in_process_api, sample_records, served_sample_model
from helpers.detectors import LABELS, write_transactions

pytestmark = pytest.mark.integration

RECORDS = sample_records()
DAY = dt.datetime(2021, 7, 23, tzinfo=dt.UTC)  # 1,979 sample transactions that day
NEWEST = max(pd.Timestamp(r["first_seen"]) for r in RECORDS)
WINDOW_H, MAX_WINDOW_H = 24.0, 48.0
RESCORED = 20  # re-scored later, like a transaction the stream sees again
WIDE_COLUMNS = {"reasons", "top_features", "signals", "watchlist_hits", "rule_hits", "mahalanobis"}


def _keys(path: Path) -> list[tuple[str, Any]]:
    t = delta_reader.read_arrow(path, columns=["hash", "scored_at"])
    return sorted(zip(t["hash"].to_pylist(), t["scored_at"].to_pylist(), strict=True))


def _live(path: Path) -> set[str]:
    """The data files the table's current version references (relative paths)."""
    return set(pa.table(DeltaTable(str(path)).get_add_actions(flatten=True))["path"].to_pylist())


def _data_files_on_disk(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*.parquet") if "_delta_log" not in p.parts}


@pytest.fixture(scope="module")
def scored() -> pd.DataFrame:
    """The sample scored by the sample bundle (what the stream writes), plus later re-scorings."""
    model = served_sample_model().model
    frame = pd.DataFrame(RECORDS)
    first = score_frame(frame, model, settings=Settings(watchlist_dir=LABELS))
    top = first.nlargest(RESCORED, "anomaly_score")["hash"]
    again = score_frame(frame[frame["hash"].isin(top)], model, settings=Settings(watchlist_dir=LABELS))
    return pd.concat([first, again], ignore_index=True)


def _partitioned(scored: pd.DataFrame) -> pa.Table:
    """Scored rows as the stream writes them: with the ``date`` partition column (first_seen's UTC date)."""
    arrow = pa.Table.from_pandas(scored, schema=scored_arrow_schema(), preserve_index=False)
    return arrow.append_column(tables.DATE_COLUMN, pc.cast(arrow["first_seen"], pa.date32()))


@pytest.fixture(scope="module")
def lake(scored: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scored_transactions in the stream's layout (date partitions; the stream's own writer is checked in
    test_stream_scoring.py), appended in four batches; transactions partitioned by date."""
    root = tmp_path_factory.mktemp("bounded-lake")
    arrow = _partitioned(scored)
    first = len(scored) - RESCORED
    for lo, hi in [(0, 2000), (2000, 4000), (4000, first), (first, len(scored))]:
        write_deltalake(
            str(root / tables.SCORED),
            arrow.slice(lo, hi - lo),
            mode="append",
            partition_by=[tables.DATE_COLUMN],
        )
    write_transactions(root, RECORDS)
    return root


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The reads the API makes, recorded on their way to the real reader."""
    seen: list[dict[str, Any]] = []
    real = api_lake.read_arrow

    def recording(path: str, **kwargs: Any) -> pa.Table:
        seen.append({**kwargs, "name": Path(path).name})
        return real(path, **kwargs)

    monkeypatch.setattr(api_lake, "read_arrow", recording)
    return seen


@pytest.fixture
def client(lake: Path, tmp_path: Path) -> Iterator[TestClient]:
    window = {"api_lake_window_h": WINDOW_H, "api_lake_max_window_h": MAX_WINDOW_H}
    with in_process_api(lake, tmp_path / "state", watchlist_dir=LABELS, allowed_hosts="*", **window) as c:
        yield c


def _latest(scored: pd.DataFrame) -> pd.DataFrame:
    return scored.sort_values("scored_at").groupby("hash", as_index=False).last()


def test_default_window_ends_at_the_newest_row(client: TestClient, scored: pd.DataFrame) -> None:
    page = client.get("/anomalies", params=[("limit", 1000), *[("severity", s) for s in SEVERITIES]])
    assert page.status_code == 200, page.text
    body = page.json()
    assert "table" not in body  # no filesystem path in a response
    latest = _latest(scored)
    inside = latest[latest["first_seen"] > NEWEST - pd.Timedelta(hours=WINDOW_H)]
    assert 0 < len(inside) < len(latest)
    assert {r["hash"] for r in body["items"]} == set(inside["hash"])
    assert body["window"]["since"] < body["window"]["until"]


def test_an_explicit_window_reads_that_window(client: TestClient, scored: pd.DataFrame) -> None:
    params = {"since": DAY.isoformat(), "until": (DAY + dt.timedelta(days=1)).isoformat(), "limit": 1000}
    body = client.get("/anomalies", params=params).json()
    latest = _latest(scored)
    day = latest[(latest["first_seen"] >= DAY) & (latest["first_seen"] < DAY + dt.timedelta(days=1))]
    expected = day[day["is_anomaly"]].sort_values(["anomaly_score", "hash"], ascending=[False, True])
    assert len(expected) > 10
    assert [r["hash"] for r in body["items"]] == expected["hash"].tolist()
    for item, (_, row) in zip(body["items"], expected.iterrows(), strict=True):
        assert item["scored_at"] == row["scored_at"].isoformat().replace("+00:00", "Z")  # latest scoring
        assert item["reasons"] == list(row["reasons"]) and "date" not in item


def test_a_window_past_the_maximum_is_a_422(client: TestClient) -> None:
    wide = {"since": DAY.isoformat(), "until": (DAY + dt.timedelta(hours=MAX_WINDOW_H + 1)).isoformat()}
    for url in ("/anomalies", "/addresses/3HqA7i3ttECLvgqvq69HNxxUP5BL7Z5YgA", "/transactions/" + "a" * 64):
        r = client.get(url, params=wide)
        assert r.status_code == 422, (url, r.text)
        (error,) = r.json()["detail"]
        assert error["loc"] == ["query", "since"] and "api_lake_max_window_h" in error["msg"]
    # `since` alone reaches up to the newest row: years back is far too wide.
    r = client.get("/anomalies", params={"since": DAY.isoformat(), "rule": "excessive_fee_share"})
    assert r.status_code == 422 and "narrow since/until" in r.json()["detail"][0]["msg"]


def test_lookups_read_their_window_and_few_columns(
    client: TestClient, scored: pd.DataFrame, reads: list[dict[str, Any]]
) -> None:
    latest = _latest(scored)
    old = latest[(latest["first_seen"] >= DAY) & (latest["is_anomaly"])].iloc[0]
    day = {"since": DAY.isoformat(), "until": (DAY + dt.timedelta(days=1)).isoformat()}

    # A transaction older than the maximum window back from the newest row is not searched by default.
    assert client.get(f"/transactions/{old['hash']}").status_code == 404
    reads.clear()
    found = client.get(f"/transactions/{old['hash']}", params=day).json()
    assert found["hash"] == old["hash"] and found["anomaly_score"] == pytest.approx(old["anomaly_score"])
    # Found on two columns in the window, then read whole from its own instant only.
    assert reads[0]["columns"] == ["hash", "first_seen", "scored_at"]
    assert reads[0]["since"] == DAY and reads[1]["since"] == old["first_seen"].to_pydatetime()

    reads.clear()
    client.get("/anomalies", params={**day, "watchlist": "ofac_sdn"})
    choose = reads[0]
    assert choose["since"] == DAY and choose["until"] == DAY + dt.timedelta(days=1)
    assert "watchlist_hits" in choose["columns"] and not (WIDE_COLUMNS - {"watchlist_hits"}) & set(
        choose["columns"]
    )

    reads.clear()
    client.get("/anomalies")  # no filter at all: still a window, still narrow
    assert reads[0]["since"] is not None and not WIDE_COLUMNS & set(reads[0]["columns"])
    assert all(r["since"] is not None or r["filters"][0][1] == "in" for r in reads)


def test_addresses_read_their_window(client: TestClient, reads: list[dict[str, Any]]) -> None:
    record = next(
        r for r in RECORDS if r["first_seen"].startswith("2021-07-23") and r["outputs"][0]["address"]
    )
    address = record["outputs"][0]["address"]
    assert client.get(f"/addresses/{address}").json()["count"] == 0  # that day is outside the default window
    reads.clear()
    day = {"since": DAY.isoformat(), "until": (DAY + dt.timedelta(days=1)).isoformat()}
    report = client.get(f"/addresses/{address}", params=day).json()
    assert record["hash"] in {t["hash"] for t in report["transactions"]}
    assert report["tables"] == {"transactions": "transactions", "scored": "scored_transactions"}
    transactions, scorings = reads
    assert transactions["name"] == "transactions" and transactions["since"] == DAY
    assert scorings["name"] == "scored_transactions" and scorings["since"] is not None
    assert not {"reasons", "top_features", "signals"} & set(scorings["columns"])


def _two_days(table: pa.Table) -> pa.Table:
    day = pc.cast(table["first_seen"], pa.date32())
    keep = pc.is_in(day, pa.array([DAY.date(), dt.date(2017, 8, 24)], pa.date32()))
    return table.filter(keep).combine_chunks()


def test_compaction_clusters_anomalies_and_vacuum_keeps_the_content_exact(
    spark: Any, scored: pd.DataFrame, tmp_path: Path
) -> None:
    """Compaction rewrites each day as one file, anomalies first, in small row groups with statistics:
    /anomalies then reads the anomalies' row groups only (Parquet statistics on a boolean, Spark-written),
    and every lake endpoint answers exactly as before. VACUUM then deletes only the replaced files."""
    root = tmp_path / "lake"
    path = root / tables.SCORED
    # Two busy days in eight small appends (a 1 s trigger's files): enough to compact, small for Spark.
    days = _two_days(_partitioned(scored))
    for batch in days.to_batches(max_chunksize=len(days) // 8 + 1):
        write_deltalake(
            str(path), pa.Table.from_batches([batch]), mode="append", partition_by=[tables.DATE_COLUMN]
        )
    write_transactions(root, [r for r in RECORDS if r["first_seen"][:10] in ("2021-07-23", "2017-08-24")])
    day = {"since": DAY.isoformat(), "until": (DAY + dt.timedelta(days=1)).isoformat(), "limit": 1000}
    record = next(
        r for r in RECORDS if r["first_seen"].startswith("2021-07-23") and r["outputs"][0]["address"]
    )
    urls = [
        ("/anomalies", day),
        ("/anomalies", {**day, "min_score": 0.6, "limit": 7}),
        ("/anomalies", {**day, "rule": "excessive_fee_share"}),
        ("/anomalies", {**day, "severity": "high"}),
        (f"/transactions/{record['hash']}", day),
        (f"/addresses/{record['outputs'][0]['address']}", day),
    ]

    def answers() -> list[Any]:
        window = {"api_lake_window_h": WINDOW_H, "api_lake_max_window_h": MAX_WINDOW_H}
        with in_process_api(root, tmp_path / "state", watchlist_dir=LABELS, allowed_hosts="*", **window) as c:
            return [c.get(url, params=params).json() for url, params in urls]

    before, keys, files = answers(), _keys(path), len(_live(path))
    assert any(item["is_anomaly"] for item in before[0]["items"])
    assert compact(spark, str(path), None, row_group_rows=64) == files
    assert _keys(path) == keys
    assert answers() == before

    # One file per day: anomalies first, then by first_seen, in row groups of 64 rows with statistics.
    live = [path / f for f in _live(path)]
    assert len(live) == 2
    for file in live:
        t = pq.read_table(file, columns=["is_anomaly", "first_seen"])
        flags = t["is_anomaly"].to_pylist()
        assert flags == sorted(flags, reverse=True) and 0 < sum(flags) < len(flags)
        meta = pq.ParquetFile(file).metadata
        assert max(meta.row_group(i).num_rows for i in range(meta.num_row_groups)) <= 64
        group = meta.row_group(meta.num_row_groups - 1)
        seen = next(c for c in map(group.column, range(meta.num_columns)) if c.path_in_schema == "first_seen")
        assert seen.statistics is not None and seen.statistics.has_min_max  # not INT96: skipped in time
    anomalies = [("is_anomaly", "=", True)]
    read, total = delta_reader.row_groups_read(path, filters=anomalies)
    n_anomalies = int(pc.sum(days["is_anomaly"]).as_py())
    assert read <= n_anomalies // 64 + 2 < total  # the anomalies' groups, one shared with normal rows a day
    assert delta_reader.read_arrow(path, columns=["hash"], filters=anomalies).num_rows == n_anomalies

    assert len(_data_files_on_disk(path)) > len(_live(path))  # replaced files stay
    assert vacuum(str(path), 0.0)
    assert _data_files_on_disk(path) == _live(path)  # only the live files are left
    assert _keys(path) == keys
    assert vacuum(str(tmp_path / "absent"), 0.0) is None


def test_an_unpartitioned_table_of_an_older_release_is_rewritten_partitioned(
    spark: Any, scored: pd.DataFrame, tmp_path: Path
) -> None:
    path = tmp_path / tables.SCORED
    arrow = pa.Table.from_pandas(scored, schema=scored_arrow_schema(), preserve_index=False)
    write_deltalake(str(path), _two_days(arrow))  # no partitions, no date column: as before this release
    before = _keys(path)
    assert ensure_partitioned(spark, str(path))
    assert DeltaTable(str(path)).metadata().partition_columns == [tables.DATE_COLUMN]
    assert _keys(path) == before
    assert not ensure_partitioned(spark, str(path))  # once
    assert not ensure_partitioned(spark, str(tmp_path / "absent"))
