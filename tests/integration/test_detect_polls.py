"""One ``btc-anomaly detect`` service over a lake that grows between its polls.

Real transactions of the sample's block 692,261, re-stamped into a timeline as the replay producer does:
twelve quiet minutes of ordinary traffic, then minute 12 with a surge of transactions and the first two
fan-outs of a real exchange wallet's payout burst, whose other members arrive in minutes 13 and 14.
``tx_stats_1m`` is written as the stream keeps it: a window's row is replaced while late rows still
arrive (minute 12 is written half-full, then whole). Between polls the lake grows; after each poll the
test checks what the one service instance wrote to ``window_anomalies``/``coordinated_bursts`` and what
it alerted:

poll 1  12 quiet minutes                   nothing
poll 2  + minute 12, half of it            nothing: minute 12 is the newest window (still filling), and
                                           two fan-outs are not a burst yet
poll 3  minute 12 whole, + minute 13       the burst (4 members across the minute boundary and two polls):
                                           inserted, one alert; minute 12 is not final yet
poll 4  + minute 14                        minute 12 is final: its surge is flagged, one window alert; the
                                           burst's fifth member updates it in place, no second alert
poll 5  nothing new                        nothing written, no alert
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from btc_anomaly.detectors.service import DetectService, PollResult
from btc_anomaly.processing import tables
from btc_anomaly.processing.delta_reader import read_table
from helpers.detectors import (
    RecordingNotifier,
    block,
    burst_members,
    restamp,
    settings,
    stats_1m,
    write_transactions,
)

pytestmark = pytest.mark.integration

T0 = pd.Timestamp("2026-01-01T00:00:00Z")
QUIET_MINUTES = 12
PER_MINUTE = 15  # ordinary transactions per quiet minute, 4 s apart
SURGE = 60  # extra ordinary transactions in minute 12


def minute(i: int) -> pd.Timestamp:
    return T0 + pd.Timedelta(minutes=i)


def ordinary() -> list[dict]:
    """Transactions of block 692,261 that are no burst candidate (< 10 inputs and < 10 outputs)."""
    return [r for r in block(692261) if r["input_count"] < 10 and r["output_count"] < 10]


def write_stats(lake: Path, records: list[dict]) -> None:
    """``tx_stats_1m`` of every transaction so far, replacing the table (a window's row is rewritten while
    its late rows arrive, as the stream's upsert does)."""
    stats = stats_1m(records)
    schema = tables.stats_schema()
    for column in schema.names:
        if column not in stats.columns:
            stats[column] = None
    stats["updated_at"] = stats["window_end"]
    write_deltalake(
        str(lake / tables.STATS_1M),
        pa.Table.from_pandas(stats[schema.names], schema=schema, preserve_index=False),
        mode="overwrite",
    )


def stored(lake: Path, name: str) -> pd.DataFrame:
    path = lake / name
    return read_table(path) if DeltaTable.is_deltatable(str(path)) else pd.DataFrame()


def version(lake: Path, name: str) -> int | None:
    path = lake / name
    return DeltaTable(str(path)).version() if DeltaTable.is_deltatable(str(path)) else None


def test_one_service_over_a_growing_lake(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    notifier = RecordingNotifier()
    service = DetectService(settings(lake_root=lake), notifier)
    pool = ordinary()
    assert len(pool) >= QUIET_MINUTES * PER_MINUTE + SURGE + 3 * PER_MINUTE
    quiet = [
        rec
        for i in range(QUIET_MINUTES)
        for rec in restamp(pool[i * PER_MINUTE : (i + 1) * PER_MINUTE], minute(i), 4.0)
    ]
    rest = pool[QUIET_MINUTES * PER_MINUTE :]
    # Minute 12: its quiet share plus the surge, 0.75 s apart from 12:00 to 12:56.
    surge = restamp(rest[: PER_MINUTE + SURGE], minute(12), 0.75)
    rest = rest[PER_MINUTE + SURGE :]
    later = {
        m: restamp(rest[j * PER_MINUTE : (j + 1) * PER_MINUTE], minute(m), 4.0)
        for j, m in enumerate((13, 14))
    }
    # The wallet's fan-outs 5 s apart from 12:50: two in minute 12, two in minute 13, the fifth at 13:55.
    fan_outs = restamp(burst_members()[:4], minute(12) + pd.Timedelta(seconds=50), 5.0)
    fifth = restamp(burst_members()[4:5], minute(13) + pd.Timedelta(seconds=55), 0.0)
    every: list[dict] = []

    def arrive(records: list[dict]) -> None:
        write_transactions(lake, records)
        every.extend(records)
        write_stats(lake, every)

    def poll(n: int) -> PollResult:
        before = len(notifier.texts)
        r = service.poll(now=minute(20 + n))
        assert not r.failures, r.failures
        assert notifier.texts[before:] == r.alerts  # every alert of the poll went out, once
        return r

    # Poll 1: a quiet lake.
    arrive(quiet)
    r = poll(1)
    assert (r.windows_flagged, r.windows_new, r.bursts_found, r.alerts) == (0, 0, 0, [])
    assert version(lake, tables.WINDOW_ANOMALIES) is None and version(lake, tables.COORDINATED_BURSTS) is None

    # Poll 2: minute 12 half-arrived (the surge's first half and two fan-outs): the newest window.
    half = len(surge) // 2
    arrive(surge[:half] + fan_outs[:2])
    r = poll(2)
    assert r.rows_read[tables.STATS_1M] == QUIET_MINUTES + 1
    assert (r.windows_flagged, r.windows_new, r.bursts_found, r.alerts) == (0, 0, 0, [])

    # Poll 3: minute 12 complete, minute 13 with two more fan-outs: the burst straddles both minutes and
    # both polls; minute 12 is now the second-newest window, still not final.
    arrive(surge[half:] + fan_outs[2:] + later[13])
    r = poll(3)
    assert (r.windows_flagged, r.windows_new) == (0, 0)
    assert (r.bursts_found, r.bursts_new, r.bursts_updated) == (1, 1, 0)
    assert r.alert_kinds == ["burst"]
    bursts = stored(lake, tables.COORDINATED_BURSTS)
    assert len(bursts) == 1
    burst = bursts.iloc[0]
    assert set(burst["member_hashes"]) == {rec["hash"] for rec in fan_outs}
    assert burst["size"] == 4 and burst["kind"] == "fan_out"
    assert pd.Timestamp(burst["window_start"]) == pd.Timestamp(fan_outs[0]["first_seen"])
    assert version(lake, tables.WINDOW_ANOMALIES) is None

    # Poll 4: minute 14 arrives, minute 12 is final and flagged; the fifth fan-out grows the burst in place.
    arrive(later[14][:1] + fifth + later[14][1:])
    r = poll(4)
    windows = stored(lake, tables.WINDOW_ANOMALIES)
    assert set(pd.to_datetime(windows["window_start"], utc=True)) == {minute(12)}
    flagged = windows.set_index("metric")
    # Only the transaction count: two fan-outs against none before is z = 2 with the floor of 1 on the
    # deviation, under the threshold of 3 (windows.py); the surge's volume stays within its spread.
    assert list(flagged.index) == ["tx_count"]
    # The whole minute (surge and two fan-outs), not the half the second poll saw.
    assert flagged.loc["tx_count", "value"] == PER_MINUTE + SURGE + 2
    assert flagged.loc["tx_count", "expected"] == pytest.approx(PER_MINUTE)
    assert r.windows_new == len(windows)
    assert (r.bursts_found, r.bursts_new, r.bursts_updated) == (1, 0, 1)
    assert r.alert_kinds == ["window"]  # one alert for the window's metrics, none for the grown burst
    assert "window 2026-01-01 00:12 UTC" in r.alerts[0]
    bursts = stored(lake, tables.COORDINATED_BURSTS)
    assert len(bursts) == 1 and bursts.iloc[0]["burst_id"] == burst["burst_id"]
    assert bursts.iloc[0]["size"] == 5
    assert set(bursts.iloc[0]["member_hashes"]) == {rec["hash"] for rec in fan_outs + fifth}

    # Poll 5: nothing new: nothing written, nothing alerted.
    versions = (version(lake, tables.WINDOW_ANOMALIES), version(lake, tables.COORDINATED_BURSTS))
    r = poll(5)
    assert (r.windows_new, r.bursts_new, r.bursts_updated, r.alerts) == (0, 0, 0, [])
    assert (version(lake, tables.WINDOW_ANOMALIES), version(lake, tables.COORDINATED_BURSTS)) == versions
    assert len(notifier.texts) == 2
