"""When the stream compacts and VACUUMs its tables (maintenance.Compactor, Vacuum); the compaction itself
runs against real Delta in tests/integration/test_stream.py and test_lake_bounds.py."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from btc_anomaly.config import Settings
from btc_anomaly.processing import maintenance
from btc_anomaly.processing.maintenance import Compactor
from btc_anomaly.processing.sinks import Lake

FAILURES = "btc_stream_maintenance_failures_total"
D1, D2, D3 = dt.date(2021, 7, 23), dt.date(2021, 7, 21), dt.date(2021, 7, 25)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dt.date | None]]:
    seen: list[tuple[str, dt.date | None]] = []

    def fake_compact(_spark: object, path: str, since: dt.date | None) -> int:
        seen.append((path, since))
        return 3

    monkeypatch.setattr(maintenance, "compact", fake_compact)
    return seen


def test_compacts_the_oldest_written_partition_on_every_nth_writing_batch(calls: list) -> None:
    c = Compactor("/lake/transactions", every=3)
    for oldest in (D1, None, D2, None):  # None: a batch that wrote nothing does not count
        c.wrote(oldest)
        c.run_if_due(object())
    assert calls == []
    c.wrote(D3)
    c.run_if_due(object())
    assert calls == [("/lake/transactions", D2)]
    assert (c.since, c.batches) == (None, 0)


def test_never_when_disabled(calls: list) -> None:
    c = Compactor("/lake/transactions", every=0)
    for _ in range(5):
        c.wrote(D1)
        c.run_if_due(object())
    assert calls == []


def test_a_failed_compaction_does_not_stop_the_stream_and_is_retried(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def failing(*_args: object) -> int:
        raise RuntimeError("concurrent modification")

    monkeypatch.setattr(maintenance, "compact", failing)
    c = Compactor("/lake/transactions", every=1)
    c.wrote(D1)
    c.run_if_due(object())  # logs, does not raise
    assert "compaction of transactions from 2021-07-23 failed" in caplog.text
    assert (c.since, c.batches) == (D1, 0)  # the partitions stay pending for the next try


# --- maintenance.Compactor / Vacuum: the same schedule for any date-partitioned table, plus VACUUM ---------
# (the compaction and VACUUM themselves run on real Delta in tests/integration/test_lake_bounds.py)


@pytest.fixture
def upkeep(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, object]]:
    seen: list[tuple[str, str, object]] = []

    def fake_compact(_spark: object, path: str, since: dt.date | None) -> int:
        seen.append(("compact", path, since))
        return 3

    def fake_vacuum(path: str, retention_h: float) -> list[str]:
        if path.endswith("broken"):
            raise RuntimeError("permission denied")
        seen.append(("vacuum", path, retention_h))
        return []

    monkeypatch.setattr(maintenance, "compact", fake_compact)
    monkeypatch.setattr(maintenance, "vacuum", fake_vacuum)
    return seen


def test_scored_compactor_keeps_the_transactions_schedule(upkeep: list) -> None:
    c = maintenance.Compactor("/lake/scored_transactions", every=2)
    for oldest in (D1, None, D2):
        c.wrote(oldest)
        c.run_if_due(object())
    assert upkeep == [("compact", "/lake/scored_transactions", D2)]
    assert (c.since, c.batches, c.name) == (None, 0, "scored_transactions")


def test_vacuum_runs_every_period_over_every_table_and_survives_a_failure(
    upkeep: list, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(maintenance.time, "monotonic", lambda: clock[0])
    v = maintenance.Vacuum(["/lake/broken", "/lake/transactions", "/lake/tx_stats_1m"], 24.0, every_s=60.0)
    c = maintenance.Compactor("/lake/scored_transactions", every=0, vacuum=v)
    c.run_if_due(object())
    assert upkeep == []  # not right at start
    clock[0] += 60.0
    failures = REGISTRY.get_sample_value(FAILURES, {"table": "broken", "op": "vacuum"}) or 0.0
    c.run_if_due(object())  # due: every table, one failing without stopping the others
    assert upkeep == [("vacuum", "/lake/transactions", 24.0), ("vacuum", "/lake/tx_stats_1m", 24.0)]
    assert "vacuum of /lake/broken failed" in caplog.text
    assert REGISTRY.get_sample_value(FAILURES, {"table": "broken", "op": "vacuum"}) == failures + 1
    clock[0] += 59.0
    c.run_if_due(object())
    assert len(upkeep) == 2  # not due again yet
    clock[0] += 1.0
    c.run_if_due(object())
    assert len(upkeep) == 4
    never = maintenance.Vacuum(["/lake/transactions"], 24.0, every_s=0.0)
    clock[0] += 1e6
    never.run_if_due()
    assert len(upkeep) == 4


def test_the_stream_vacuums_every_table_it_writes(tmp_path: Path) -> None:
    settings = Settings(lake_root=tmp_path, lake_vacuum_retention_h=12.0, lake_vacuum_every_s=600.0)
    v = maintenance.Vacuum.for_stream(settings, Lake.from_settings(settings))
    assert sorted(Path(p).name for p in v.paths) == sorted(
        ["transactions", "quarantine", "tx_stats_1m", "tx_stats_5m", "scored_transactions"]
    )
    assert (v.retention_h, v.every_s) == (12.0, 600.0)
