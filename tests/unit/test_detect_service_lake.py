"""Issue #19: `btc-anomaly detect` died at its third write of the demo's `coordinated_bursts`.

deltalake's MERGE (the upsert's second write) writes Parquet files whose embedded Arrow schema says
``string_view``, while ``write_deltalake`` (the first write), Spark and older delta-rs write ``string`` or
``large_string``. pyarrow then compared the reader's ``string`` filter values with a ``string_view`` file's
row-group statistics and raised ``ArrowNotImplementedError: Function 'greater_equal' has no kernel matching
input types (string, string_view)`` on every later poll. Real deltalake tables in a temporary folder,
written by the same code paths as the demo; nothing is mocked.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake
from prometheus_client import REGISTRY

from btc_anomaly.detectors.service import DetectService, upsert
from btc_anomaly.processing import tables
from btc_anomaly.processing.delta_reader import read_arrow, read_table
from helpers.detectors import RecordingNotifier, burst_members, restamp, settings, write_transactions

T0 = pd.Timestamp("2026-01-01T00:00:00Z")


def _file_types(path: Path, column: str) -> set[str]:
    return {str(pq.read_schema(uri).field(column).type) for uri in DeltaTable(str(path)).file_uris()}


def test_bursts_that_keep_growing_are_upserted_at_every_poll(tmp_path: Path) -> None:
    """The demo's sequence: two bursts found (append), one grows (MERGE), the other grows (read + MERGE)."""
    lake = tmp_path / "lake"
    members = burst_members()
    # Two bursts of the same real wallet three minutes apart: two rows, so a file's statistics never
    # decide a filter on burst_id by themselves (as in the demo's table).
    a = restamp(members[:4], T0, 3.0)
    b = restamp(members[-4:], T0 + pd.Timedelta(minutes=3), 3.0)
    service = DetectService(settings(lake_root=lake), RecordingNotifier())

    write_transactions(lake, a[:3] + b[:3])
    first = service.poll()
    assert (first.bursts_new, first.bursts_updated) == (2, 0)

    write_transactions(lake, a[3:4])
    second = service.poll()  # MERGE: rewrites the file holding both bursts
    assert (second.bursts_new, second.bursts_updated) == (0, 1)

    write_transactions(lake, b[3:])
    third = service.poll()  # read of the MERGE's file, then MERGE again: failed before the fix
    assert (third.bursts_new, third.bursts_updated) == (0, 1)
    assert not third.failures

    bursts = read_table(lake / tables.COORDINATED_BURSTS).sort_values("window_start")
    assert list(bursts["size"]) == [4, 4]
    assert [set(h) for h in bursts["member_hashes"]] == [
        {r["hash"] for r in a[:4]},
        {r["hash"] for r in b},
    ]
    # Nothing written twice: the next poll finds the same bursts and writes nothing.
    version = DeltaTable(str(lake / tables.COORDINATED_BURSTS)).version()
    again = service.poll()
    assert (again.bursts_new, again.bursts_updated) == (0, 0) and not again.failures
    assert DeltaTable(str(lake / tables.COORDINATED_BURSTS)).version() == version


def _windows(starts: list[pd.Timestamp], metrics: list[str]) -> pd.DataFrame:
    rows = [
        {
            "window_start": s,
            "window_end": s + pd.Timedelta(minutes=1),
            "metric": m,
            "value": 320.0,
            "expected": 20.0,
            "std": 5.0,
            "z": 60.0,
            "threshold": 3.0,
            "detected_at": T0,
        }
        for s in starts
        for m in metrics
    ]
    return pd.DataFrame(rows)


def test_window_anomalies_upserted_three_times(tmp_path: Path) -> None:
    """Keys (window_start, metric): a timestamp and a string, read back from append- and MERGE-written files."""
    path = tmp_path / tables.WINDOW_ANOMALIES
    schema = tables.window_anomalies_schema()
    keys = ["window_start", "metric"]
    minutes = [T0 + pd.Timedelta(minutes=i) for i in range(3)]

    new, _ = upsert(path, _windows(minutes[:1], ["tx_count", "volume"]), schema, keys, compare=[])
    assert len(new) == 2
    new, _ = upsert(path, _windows(minutes[:2], ["tx_count", "volume"]), schema, keys, compare=[])
    assert len(new) == 2
    new, _ = upsert(path, _windows(minutes, ["fan_in_count", "tx_count", "volume"]), schema, keys, compare=[])
    assert len(new) == 5  # 3 fan_in_count + the 2 of the third minute

    stored = read_table(path)
    assert len(stored) == 9
    assert not stored.duplicated(keys).any()


def test_every_filter_reads_files_of_every_writer(tmp_path: Path) -> None:
    """One table with string, large_string and string_view files (deltalake keeps the type it is given) and
    a MERGE-rewritten file: every filter operator gives the rows pandas gives, and every reader returns
    plain ``string`` columns whichever writer wrote a file."""
    path = tmp_path / "t"

    def part(ids: list[str], kind: pa.DataType) -> pa.Table:
        return pa.table(
            {
                "k": pa.array(ids, kind),
                "tag": pa.array([f"t{len(i)}" for i in ids], kind),
                "v": pa.array([ord(i[0]) for i in ids], pa.int64()),
            }
        )

    write_deltalake(str(path), part(["a", "b", "c"], pa.string()))
    write_deltalake(str(path), part(["d", "e", "f"], pa.large_string()), mode="append")
    write_deltalake(str(path), part(["g", "h", "i"], pa.string_view()), mode="append")
    (
        DeltaTable(str(path))
        .merge(part(["b", "j", "kk"], pa.string()), "t.k = s.k", source_alias="s", target_alias="t")
        .when_matched_update_all()
        .when_not_matched_insert_all()
        .execute()
    )
    assert "string_view" in _file_types(path, "k")  # the MERGE's own files, as in the demo

    everything = read_arrow(path)
    assert everything.schema.field("k").type == pa.string()
    assert everything.schema.field("tag").type == pa.string()
    frame = everything.to_pandas()
    cases: list[tuple[str, str, object]] = [
        ("k", "=", "b"),
        ("k", "==", "h"),
        ("k", "!=", "e"),
        ("k", "<", "c"),
        ("k", "<=", "d"),
        ("k", ">", "f"),
        ("k", ">=", "h"),
        ("k", "in", ["a", "e", "h", "kk", "zz"]),
        ("k", "not in", ["a", "e", "h"]),
        ("tag", "=", "t2"),
        ("v", ">=", ord("e")),
    ]
    for column, op, value in cases:
        got = read_arrow(path, columns=["k"], filters=[(column, op, value)])
        assert got.schema.field("k").type == pa.string()
        expected = frame.query(
            {
                "=": f"{column} == @value",
                "==": f"{column} == @value",
                "!=": f"{column} != @value",
                "<": f"{column} < @value",
                "<=": f"{column} <= @value",
                ">": f"{column} > @value",
                ">=": f"{column} >= @value",
                "in": f"{column} in @value",
                "not in": f"{column} not in @value",
            }[op]
        )
        assert sorted(got.column("k").to_pylist()) == sorted(expected["k"]), (column, op, value)


@pytest.mark.parametrize("kind", [pa.string(), pa.large_string(), pa.string_view()])
def test_empty_and_missing_tables_keep_plain_types(tmp_path: Path, kind: pa.DataType) -> None:
    path = tmp_path / "t"
    write_deltalake(str(path), pa.table({"k": pa.array(["x"], kind)}))
    assert read_arrow(path, filters=[("k", "=", "nope")]).schema.field("k").type == pa.string()
    missing = read_arrow(tmp_path / "missing", schema=pa.schema([("k", kind)]))
    assert missing.num_rows == 0 and missing.schema.field("k").type == pa.string()


def test_maintenance_compacts_and_vacuums_detect_tables_without_changing_them(tmp_path: Path) -> None:
    """Each poll's MERGE leaves the rewritten files behind; detect's maintenance compacts the table and
    VACUUMs them, and the rows read back the same (burst ids, sizes, members)."""
    lake = tmp_path / "lake"
    members = burst_members()
    a = restamp(members[:4], T0, 3.0)
    b = restamp(members[-4:], T0 + pd.Timedelta(minutes=3), 3.0)
    service = DetectService(settings(lake_root=lake, lake_vacuum_retention_h=0.0), RecordingNotifier())
    for batch in (a[:3] + b[:3], a[3:4], b[3:]):
        write_transactions(lake, batch)
        assert not service.poll().failures
    path = lake / tables.COORDINATED_BURSTS

    def content() -> list[tuple[str, int, list[str]]]:
        t = read_table(path).sort_values("burst_id")
        return [
            (i, n, sorted(m)) for i, n, m in zip(t["burst_id"], t["size"], t["member_hashes"], strict=True)
        ]

    def on_disk() -> set[str]:
        return {str(p.relative_to(path)) for p in path.rglob("*.parquet") if "_delta_log" not in p.parts}

    before = content()
    live = set(pa.table(DeltaTable(str(path)).get_add_actions(flatten=True))["path"].to_pylist())
    assert on_disk() > live  # the MERGEs' replaced files are still there
    service.maintain()  # not due yet: nothing happens
    assert on_disk() > live
    service.maintain(force=True)
    live = set(pa.table(DeltaTable(str(path)).get_add_actions(flatten=True))["path"].to_pylist())
    assert on_disk() == live and len(live) == 1
    assert content() == before
    assert not service.poll().failures  # and detect goes on reading and writing it


def test_a_failing_maintenance_is_counted_and_detect_goes_on(tmp_path: Path) -> None:
    """A table whose VACUUM fails (here: its log is unreadable) is counted per table for the
    BtcLakeMaintenanceFailing alert; the other tables and the polls go on."""
    lake = tmp_path / "lake"
    service = DetectService(settings(lake_root=lake), RecordingNotifier())
    write_transactions(lake, restamp(burst_members(), T0, 3.0))
    assert not service.poll().failures
    broken = lake / tables.COORDINATED_BURSTS / "_delta_log"
    for commit in broken.glob("*.json"):
        commit.write_text("{not json")
    name = tables.COORDINATED_BURSTS
    before = REGISTRY.get_sample_value("btc_detect_maintenance_failures_total", {"table": name}) or 0.0
    service.maintain(force=True)
    assert REGISTRY.get_sample_value("btc_detect_maintenance_failures_total", {"table": name}) == before + 1
    assert REGISTRY.get_sample_value(
        "btc_detect_maintenance_failures_total", {"table": tables.WINDOW_ANOMALIES}
    ) in (None, 0.0)
