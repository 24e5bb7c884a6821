"""The dashboard's queries against pandas on the same rows: a lake of the bundled sample scored by a real
IsolationForest fitted in-process (no MLflow), read back through the dashboard's Delta cache."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from btc_anomaly.config import Settings
from btc_anomaly.dashboard import data
from btc_anomaly.dashboard.demo import (
    DemoLake,
    fit_model,
    looped_scored,
    sample_transactions,
    write_demo_lake,
)
from btc_anomaly.dashboard.lake import ScoredCache, lookup_row, sampling_key, to_us

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
START = NOW - dt.timedelta(hours=2)


@pytest.fixture(scope="module")
def model() -> object:
    return fit_model(sample_transactions().to_pandas(), Settings())


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory, model: object) -> DemoLake:
    """The sample spread over the two hours before NOW."""
    return write_demo_lake(tmp_path_factory.mktemp("dash-lake"), model=model, start=START, end=NOW)


@pytest.fixture(scope="module")
def day_lake(tmp_path_factory: pytest.TempPathFactory, model: object) -> DemoLake:
    """The sample spread over the 30 hours before NOW: a "24h" window leaves its first 6 hours out."""
    return write_demo_lake(
        tmp_path_factory.mktemp("dash-day-lake"), model=model, start=NOW - dt.timedelta(hours=30), end=NOW
    )


@pytest.fixture(scope="module")
def historic(tmp_path_factory: pytest.TempPathFactory, model: object) -> DemoLake:
    """The sample with its real block times (2011-2025)."""
    return write_demo_lake(tmp_path_factory.mktemp("dash-historic"), model=model, restamped=False)


def _frame(lake: DemoLake) -> pd.DataFrame:
    df = lake.scored.copy()
    df["first_seen"] = pd.to_datetime(df["first_seen"], utc=True)
    return df


@pytest.fixture(scope="module")
def frame(lake: DemoLake) -> pd.DataFrame:
    return _frame(lake)


def _snapshot(lake: DemoLake) -> data.Snapshot:
    return ScoredCache(lake.scored_path, max_rows=10_000_000).ensure(None)


# What each preset window means to a user, written out here rather than taken from data.WINDOWS.
PRESET_SPANS = {"15m": pd.Timedelta(minutes=15), "1h": pd.Timedelta(hours=1), "24h": pd.Timedelta(days=1)}


def _window(df: pd.DataFrame, filters: data.Filters) -> pd.DataFrame:
    """The filtered rows by plain pandas comparisons of timestamps (not data.window_bounds)."""
    ts = df["first_seen"]
    mask = pd.Series(True, index=df.index)
    now = pd.Timestamp(NOW)
    if filters.window in PRESET_SPANS:
        mask &= (ts >= now - PRESET_SPANS[filters.window]) & (ts < now)
    elif filters.window == "custom":
        if filters.start is not None:
            mask &= ts >= pd.Timestamp(filters.start)
        if filters.end is not None:
            mask &= ts < pd.Timestamp(filters.end)
    if filters.min_value_btc:
        mask &= df["output_value"] / 100_000_000 >= filters.min_value_btc
    return df[mask]


def _labels(df: pd.DataFrame, threshold: float | None) -> pd.Series:
    return df["anomaly_score"] > (df["threshold"] if threshold is None else threshold)


# --- selection and KPIs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("which", "filters"),
    [
        ("lake", data.Filters(window="15m")),
        ("lake", data.Filters(window="1h", threshold=0.55)),
        ("day_lake", data.Filters(window="1h")),
        ("day_lake", data.Filters(window="24h")),
        ("day_lake", data.Filters(window="24h", min_value_btc=0.5)),
        ("lake", data.Filters(window="all", threshold=0.5, min_value_btc=0.01)),
        (
            "lake",
            data.Filters(
                window="custom", start=START + dt.timedelta(minutes=20), end=START + dt.timedelta(minutes=50)
            ),
        ),
    ],
    ids=lambda x: x if isinstance(x, str) else f"{x.window}-{x.threshold}-{x.min_value_btc}",
)
def test_kpis_equal_pandas(request: pytest.FixtureRequest, which: str, filters: data.Filters) -> None:
    lake: DemoLake = request.getfixturevalue(which)
    frame = _frame(lake)
    snap = _snapshot(lake)
    sel = data.select(snap, filters, NOW)
    k = data.kpis(sel, NOW, rate_window_s=300, stale_after_s=120)
    expected = _window(frame, filters)
    if filters.window != "all":
        assert len(expected) < len(frame)  # the window leaves rows out: the bounds are tested
    anomalies = int(_labels(expected, filters.threshold).sum())
    assert k.tx == len(expected) > 0
    assert k.anomalies == anomalies
    assert k.anomaly_rate == pytest.approx(anomalies / len(expected))
    recent = frame[(frame["first_seen"] >= NOW - dt.timedelta(seconds=300)) & (frame["first_seen"] < NOW)]
    assert k.tx_per_min_recent == pytest.approx(len(recent) / 5)
    assert k.table_rows == k.cached_rows == len(frame)


def test_freshness_and_staleness(lake: DemoLake) -> None:
    snap = _snapshot(lake)
    newest = lake.scored["scored_at"].max().to_pydatetime()
    sel = data.select(snap, data.Filters(window="all"), newest + dt.timedelta(seconds=30))
    fresh = data.kpis(sel, newest + dt.timedelta(seconds=30), rate_window_s=300, stale_after_s=120)
    assert fresh.freshness_s == pytest.approx(30, abs=1e-3) and not fresh.stale
    later = newest + dt.timedelta(minutes=10)
    stale = data.kpis(
        data.select(snap, data.Filters(window="all"), later), later, rate_window_s=300, stale_after_s=120
    )
    assert stale.stale and stale.freshness_s == pytest.approx(600, abs=1e-3)


# --- time series ---------------------------------------------------------------------------------------------


def test_timeseries_equals_pandas_resample(lake: DemoLake, frame: pd.DataFrame) -> None:
    filters = data.Filters(window="1h", threshold=0.52)
    sel = data.select(_snapshot(lake), filters, NOW)
    series = data.timeseries(sel, max_bins=1500, ewma_span=30, ewma_k=3.0)
    assert series.bucket_s == 60 and len(series.starts_us) == 60

    rows = _window(frame, filters).copy()
    rows["minute"] = rows["first_seen"].dt.floor("1min")
    rows["anomaly"] = _labels(rows, 0.52)
    grouped = rows.groupby("minute").agg(
        tx=("hash", "size"), anomalies=("anomaly", "sum"), value=("output_value", "sum")
    )
    index = pd.date_range(NOW - dt.timedelta(hours=1), periods=60, freq="1min", tz="UTC")
    grouped = grouped.reindex(index, fill_value=0)
    assert np.array_equal(series.tx, grouped["tx"].to_numpy(float))
    assert np.array_equal(series.anomalies, grouped["anomalies"].to_numpy(float))
    np.testing.assert_allclose(series.volume_btc, grouped["value"].to_numpy(float) / 1e8, rtol=1e-12)
    np.testing.assert_allclose(series.tx_per_min, grouped["tx"].to_numpy(float))  # full 1-minute buckets
    rate = (grouped["anomalies"] / grouped["tx"].where(grouped["tx"] > 0)).to_numpy()
    np.testing.assert_allclose(series.anomaly_rate, rate, equal_nan=True)
    # The band of bucket i comes from buckets < i only.
    ew = pd.Series(rate).ewm(span=30, ignore_na=True, min_periods=1)
    np.testing.assert_allclose(series.ewma, ew.mean().shift(1).to_numpy(), equal_nan=True)
    std = ew.std().shift(1).fillna(0.0).to_numpy()
    np.testing.assert_allclose(series.upper, ew.mean().shift(1).to_numpy() + 3 * std, equal_nan=True)


def test_timeseries_widens_buckets_for_long_ranges(historic: DemoLake) -> None:
    """2011-2025 in one view: weekly buckets (14 years / 1,500 buckets), every row counted once."""
    sel = data.select(_snapshot(historic), data.Filters(window="all"), NOW)
    series = data.timeseries(sel, max_bins=1500, ewma_span=30, ewma_k=3.0)
    assert series.bucket_s == 7 * 86400
    assert len(series.starts_us) <= 1500
    assert series.tx.sum() == len(historic.scored)
    assert series.volume_btc.sum() == pytest.approx(historic.scored["output_value"].astype(float).sum() / 1e8)


def test_custom_range_over_historic_data(historic: DemoLake) -> None:
    df = historic.scored
    first_seen = pd.to_datetime(df["first_seen"], utc=True)
    start, end = dt.datetime(2021, 7, 23, tzinfo=dt.UTC), dt.datetime(2021, 7, 24, tzinfo=dt.UTC)
    filters = data.Filters(
        window="custom", start=data.parse_time("2021-07-23"), end=data.parse_time("2021-07-24 00:00")
    )
    sel = data.select(_snapshot(historic), filters, NOW)
    in_day = int(((first_seen >= start) & (first_seen < end)).sum())
    # That day holds one block of the sample, 692,261, and nothing else: the range selects exactly its rows
    # (the three quarters of the block the sample keeps; the rest is benchmark data), a real share of them.
    in_block = int((df["block_height"] == 692_261).sum())
    assert sel.n == in_day == in_block > len(df) / 4
    assert data.select(_snapshot(historic), data.Filters(window="1h"), NOW).n == 0


# --- histogram -------------------------------------------------------------------------------------------------


def test_histogram_counts_every_row_once(lake: DemoLake, frame: pd.DataFrame) -> None:
    sel = data.select(_snapshot(lake), data.Filters(window="all", threshold=0.55), NOW)
    hist = data.score_histogram(sel, bins=40)
    assert hist.normal.sum() + hist.anomalous.sum() == len(frame)
    assert hist.anomalous.sum() == int((frame["anomaly_score"] > 0.55).sum())
    expected, _ = np.histogram(frame["anomaly_score"], bins=hist.edges)
    assert np.array_equal(hist.normal + hist.anomalous, expected)


# --- scatter down-sampling ---------------------------------------------------------------------------------------


def test_scatter_caps_points_and_keeps_every_anomaly(lake: DemoLake, frame: pd.DataFrame) -> None:
    sel = data.select(_snapshot(lake), data.Filters(window="all"), NOW)
    sample = data.scatter_sample(sel, max_points=1000, max_anomalies=500)
    plottable = frame[(frame["output_value"].astype(float) > 0) & (frame["fee_rate"] > 0)]
    anomalies = plottable[_labels(plottable, None)]
    assert len(sample.idx) == 1000
    assert sample.plottable == len(plottable)
    assert sample.anomalies_total == sample.anomalies_shown == len(anomalies)
    assert int(sample.anomaly.sum()) == len(anomalies)
    assert np.all(sample.value_btc > 0) and np.all(sample.fee_rate > 0)
    shown = set(sel.snapshot.hashes(sel.snapshot_positions(sample.idx)))
    assert set(anomalies["hash"]) <= shown
    again = data.scatter_sample(sel, max_points=1000, max_anomalies=500)
    assert np.array_equal(sample.idx, again.idx)  # deterministic


def test_scatter_keeps_highest_scores_when_anomalies_exceed_cap(lake: DemoLake) -> None:
    sel = data.select(_snapshot(lake), data.Filters(window="all", threshold=0.4), NOW)
    sample = data.scatter_sample(sel, max_points=300, max_anomalies=200)
    assert len(sample.idx) == 300 and sample.anomalies_shown == 200
    plottable = (sel.value > 0) & (sel.fee_rate > 0) & sel.anomaly
    cutoff = np.sort(sel.score[plottable])[::-1][199]
    assert sample.score[sample.anomaly].min() >= cutoff


def test_scatter_sample_is_stable_as_rows_arrive(model: object) -> None:
    """Normals are picked by hash-derived keys: 10% more rows keep about 90% of the points in place."""
    import hashlib

    from btc_anomaly.model.scoring import score_frame

    scored = score_frame(sample_transactions().to_pandas(), model)  # type: ignore[arg-type]
    table = looped_scored(scored, 20_000, START, NOW)
    extra = table.slice(0, 2000)
    fresh = [hashlib.sha256((h + "later").encode()).hexdigest() for h in extra["hash"].to_pylist()]
    extra = extra.set_column(0, "hash", pa.array(fresh, pa.string()))
    snap_a = _snapshot_of(table)
    snap_b = _snapshot_of(pa.concat_tables([table, extra]))
    filters = data.Filters(window="all", threshold=0.99)  # no anomalies: only the normals' sampling counts
    a = data.scatter_sample(data.select(snap_a, filters, NOW), max_points=2000, max_anomalies=100)
    b = data.scatter_sample(data.select(snap_b, filters, NOW), max_points=2000, max_anomalies=100)
    # Window "all" and no value filter: selection rows are snapshot rows.
    ha, hb = set(snap_a.hashes(a.idx)), set(snap_b.hashes(b.idx))
    assert len(ha) == len(hb) == 2000
    assert len(ha & hb) >= 1700


def _snapshot_of(table: pa.Table) -> data.Snapshot:
    from btc_anomaly.dashboard.lake import build_snapshot, chunk_from_table

    return build_snapshot([chunk_from_table("t", table)], 0)


def test_sampling_key_is_uniform_and_deterministic() -> None:
    hashes = pa.array([f"{i:064x}"[::-1] for i in range(50_000)])
    keys = sampling_key(hashes)
    assert np.array_equal(keys, sampling_key(hashes))
    counts = np.bincount(keys >> 28, minlength=16)
    assert counts.min() > 0.8 * counts.mean()
    assert len(sampling_key(pa.array(["", None, "abc"]))) == 3


# --- top anomalies -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sort_by", "descending", "column"),
    [
        ("score", True, "anomaly_score"),
        ("value", False, "output_value"),
        ("fee_rate", True, "fee_rate"),
        ("time", True, "first_seen"),
    ],
)
def test_anomaly_pages_equal_pandas_sort(
    lake: DemoLake, frame: pd.DataFrame, sort_by: str, descending: bool, column: str
) -> None:
    filters = data.Filters(window="all", threshold=0.5)
    sel = data.select(_snapshot(lake), filters, NOW)
    rows = frame[_labels(frame, 0.5)].copy()
    rows["key"] = (
        rows[column].astype("float64")
        if column != "first_seen"
        else rows["first_seen"].dt.as_unit("us").astype("int64")
    )
    rows["key"] = -rows["key"] if descending else rows["key"]
    rows["key"] = rows["key"].fillna(np.inf)
    rows["us"] = rows["first_seen"].dt.as_unit("us").astype("int64")
    expected = rows.sort_values(["key", "us"], kind="stable")
    got: list[str] = []
    page = 0
    while True:
        result = data.anomalies_page(sel, sort_by=sort_by, descending=descending, page=page, page_size=25)
        assert result.total == len(rows)
        got += [r["hash"] for r in result.rows]
        page += 1
        if page >= result.page_count:
            break
    assert len(got) == len(rows)
    exp_keys = expected["key"].to_numpy()
    got_keys = expected.set_index("hash").loc[got, "key"].to_numpy()
    assert np.array_equal(got_keys, exp_keys)  # same order of sort keys (ties may differ by hash)
    first = data.anomalies_page(sel, sort_by=sort_by, descending=descending, page=0, page_size=5).rows[0]
    assert first["reasons"] == list(frame.set_index("hash").loc[first["hash"], "reasons"])


def test_page_past_the_end_is_clamped(lake: DemoLake) -> None:
    sel = data.select(_snapshot(lake), data.Filters(window="all"), NOW)
    result = data.anomalies_page(sel, page=10_000, page_size=10)
    assert result.page == result.page_count - 1 and result.rows


# --- the Delta cache ---------------------------------------------------------------------------------------------------


def test_cache_reads_only_new_files_and_reuses_unchanged_versions(tmp_path: Path, lake: DemoLake) -> None:
    path = tmp_path / "scored"
    table = pa.Table.from_pandas(lake.scored, preserve_index=False)
    write_deltalake(str(path), table.slice(0, 3000))
    cache = ScoredCache(path, max_rows=1_000_000, min_check_s=0)
    assert cache.ensure(None).rows == 3000 and cache.files_read == 1
    cache.ensure(None)
    assert cache.files_read == 1  # same version: nothing read
    write_deltalake(str(path), table.slice(3000, 2000), mode="append")
    snap = cache.ensure(None)
    assert snap.rows == 5000 and cache.files_read == 2  # only the appended file
    assert np.all(np.diff(snap.ts) >= 0)
    DeltaTable(str(path)).optimize.compact()
    snap = cache.ensure(None)
    assert snap.rows == 5000 and cache.files_read == 3  # compacted file replaces both
    assert sorted(snap.hashes(np.arange(snap.rows))) == sorted(table.slice(0, 5000)["hash"].to_pylist())


def test_cache_keeps_newest_files_within_max_rows(tmp_path: Path, lake: DemoLake) -> None:
    path = tmp_path / "scored"
    table = pa.Table.from_pandas(lake.scored.sort_values("first_seen"), preserve_index=False)
    size = len(table) // 3  # three files of `size` rows, oldest first
    for i in range(3):
        write_deltalake(str(path), table.slice(i * size, size), mode="append")
    snap = ScoredCache(path, max_rows=2 * size + size // 4).ensure(None)  # room for two files, not three
    assert snap.truncated and snap.rows == 2 * size and snap.table_rows == 3 * size
    assert snap.ts[0] == to_us(table["first_seen"][size].as_py())  # the oldest file is the one left out


def test_cache_reads_only_files_of_the_window(tmp_path: Path, lake: DemoLake) -> None:
    path = tmp_path / "scored"
    table = pa.Table.from_pandas(lake.scored.sort_values("first_seen"), preserve_index=False)
    for i in range(0, len(table), 1000):
        write_deltalake(str(path), table.slice(i, 1000), mode="append")
    files = -(-len(table) // 1000)  # the last one holds the remainder
    assert files >= 3
    cache = ScoredCache(path, max_rows=1_000_000, min_check_s=0)
    first = (files - 2) * 1000  # first row of the second-to-last file
    last = table["first_seen"][first + 500].as_py()
    assert cache.ensure(to_us(last)).rows == len(table) - first
    assert cache.files_read == 2  # the last two files: the ones holding rows after `last`
    assert cache.ensure(None).rows == len(table) and cache.files_read == files  # "all" widens the coverage


def test_cache_of_a_missing_or_deleted_table_is_empty(tmp_path: Path, lake: DemoLake) -> None:
    import shutil

    path = tmp_path / "scored"
    cache = ScoredCache(path, max_rows=1000, min_check_s=0)
    assert cache.ensure(None).empty
    write_deltalake(str(path), pa.Table.from_pandas(lake.scored.head(10), preserve_index=False))
    assert cache.ensure(None).rows == 10
    shutil.rmtree(path)
    assert cache.ensure(None).empty


# --- point lookups ------------------------------------------------------------------------------------------------------


def test_lookup_transaction_reads_its_date_partition(historic: DemoLake) -> None:
    row = historic.scored.iloc[-1]
    us = to_us(pd.Timestamp(row["first_seen"]).to_pydatetime())
    tx = lookup_row(historic.transactions_path, row["hash"], us)
    assert tx is not None and tx["hash"] == row["hash"]
    original = historic.transactions.set_index("hash").loc[row["hash"]]
    assert len(tx["inputs"]) == original["input_count"] and len(tx["outputs"]) == original["output_count"]
    day = pd.Timestamp(row["first_seen"]).date()
    files = DeltaTable(str(historic.transactions_path)).file_uris(file_pruning_predicate=[("date", "=", day)])
    assert len(files) == 1  # of ~36 date partitions, the lookup reads one
    assert lookup_row(historic.transactions_path, row["hash"], None)["hash"] == row["hash"]
    assert lookup_row(historic.transactions_path, "0" * 64, us) is None


def test_lookup_scored_prunes_by_time_and_finds_the_row(lake: DemoLake) -> None:
    row = lake.scored.iloc[1234]
    us = to_us(pd.Timestamp(row["first_seen"]).to_pydatetime())
    got = lookup_row(lake.scored_path, row["hash"], us)
    assert got is not None and got["anomaly_score"] == row["anomaly_score"]
    assert lookup_row(lake.root / "nope", row["hash"], us) is None


def test_appends_extend_the_snapshot_in_place_and_equal_a_full_rebuild(
    tmp_path: Path, lake: DemoLake
) -> None:
    from btc_anomaly.dashboard.lake import build_snapshot

    path = tmp_path / "scored"
    table = pa.Table.from_pandas(lake.scored.sort_values("first_seen"), preserve_index=False)
    write_deltalake(str(path), table.slice(0, 3000))
    cache = ScoredCache(path, max_rows=1_000_000, min_check_s=0)
    first = cache.ensure(None)
    first_ts = first.ts.copy()
    write_deltalake(str(path), table.slice(3000, 1000), mode="append")
    second = cache.ensure(None)
    assert second.buffers is first.buffers  # written behind the old rows, nothing copied
    assert np.array_equal(first.ts, first_ts)  # the old snapshot still sees exactly its rows
    rebuilt = build_snapshot(list(cache._chunks.values()), second.version)
    for name in ("ts", "score", "threshold", "value", "key"):
        assert np.array_equal(getattr(second, name), getattr(rebuilt, name), equal_nan=name != "key")
    assert second.hashes(np.arange(second.rows)) == rebuilt.hashes(np.arange(rebuilt.rows))
    late = table.slice(4000, 1000)
    write_deltalake(str(path), late, mode="append")
    write_deltalake(
        str(path),
        table.slice(1000, 10).set_column(0, "hash", pa.array([f"{i:064x}" for i in range(10)])),
        mode="append",
    )
    third = cache.ensure(None)  # the last file is older than the newest row: full rebuild
    assert third.buffers is not second.buffers and third.rows == 5010
    full = build_snapshot(list(cache._chunks.values()), third.version)
    for name in ("ts", "score", "threshold", "value", "key"):
        assert np.array_equal(getattr(third, name), getattr(full, name), equal_nan=name != "key")
    assert np.all(np.diff(third.ts) >= 0)
    assert third.hashes(np.arange(third.rows)) == full.hashes(np.arange(full.rows))
    assert sorted(second.hashes(np.arange(second.rows))) == sorted(table.slice(0, 4000)["hash"].to_pylist())
