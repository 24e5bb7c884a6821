"""Window and burst detectors on replayed real transactions, and the `btc-anomaly detect` service over a
real (deltalake) lake: findings land in Delta once, alerts go out once, a restart repeats nothing."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from deltalake import write_deltalake

from btc_anomaly.detectors.bursts import detect_bursts
from btc_anomaly.detectors.service import DetectService
from btc_anomaly.detectors.windows import detect_windows, ewma_z
from btc_anomaly.model.scoring import ChampionModel, score_frame, scored_arrow_schema
from btc_anomaly.processing import tables
from btc_anomaly.processing.delta_reader import read_table
from helpers.detectors import (
    FUNDER,
    RecordingNotifier,
    block,
    burst_members,
    fitted_bundle,
    record,
    restamp,
    run_detect_once,
    settings,
    stats_1m,
    write_transactions,
)

T0 = pd.Timestamp("2026-01-01T00:00:00Z")
STEADY = 1200  # 20 tx/min for an hour
BURST = 300  # replayed into 45 s of minute 45 (fewer when the sample holds some of the block out)


def _ordinary(height: int) -> list[dict]:
    return [r for r in block(height) if r["input_count"] < 10 and r["output_count"] < 10]


def _burst_size() -> int:
    return len(block(481824)[STEADY : STEADY + BURST])


def _steady_with_burst(with_burst: bool = True) -> list[dict]:
    recs = block(481824)
    steady = restamp(recs[:STEADY], T0, 3.0)
    burst = restamp(recs[STEADY : STEADY + BURST], T0 + pd.Timedelta(minutes=45), 0.15) if with_burst else []
    return steady + burst


def test_ewma_flags_the_window_a_burst_is_replayed_into() -> None:
    flagged = detect_windows(stats_1m(_steady_with_burst()), span=30, threshold=3.0, min_windows=10)
    counts = flagged[flagged["metric"] == "tx_count"]
    assert list(counts["window_start"]) == [T0 + pd.Timedelta(minutes=45)]
    row = counts.iloc[0]
    assert row["value"] == 20 + _burst_size() and row["expected"] == pytest.approx(20) and row["z"] > 3
    calm = detect_windows(stats_1m(_steady_with_burst(False)), span=30, threshold=3.0, min_windows=10)
    assert (calm["metric"] != "tx_count").all()


def test_ewma_z_uses_only_the_past_and_a_spike_does_not_mask_the_next() -> None:
    values = pd.Series([10.0] * 20 + [100.0, 100.0] + [10.0] * 5).to_numpy()
    z, expected, _ = ewma_z(values, span=10, threshold=3.0)
    assert z[20] > 3 and z[21] > 3  # the clipped update keeps the second spike visible
    assert expected[20] == 10.0


def test_a_replayed_burst_of_fan_outs_becomes_one_coordinated_event() -> None:
    members = restamp(burst_members(), T0 + pd.Timedelta(minutes=30), 3.0)
    stream = restamp(_ordinary(692261)[:1200], T0, 3.0)
    # The block's other real fan-outs, spread five minutes apart: not a burst.
    others = [
        r for r in block(692261) if r["output_count"] >= 10 and r["hash"] not in {m["hash"] for m in members}
    ]
    spread = restamp(others[:8], T0 + pd.Timedelta(seconds=7), 300.0)
    events = detect_bursts(pd.DataFrame(stream + members + spread), window_s=60, min_size=3)
    assert len(events) == 1
    e = events.iloc[0]
    assert e["kind"] == "fan_out" and e["size"] == len(members)
    assert set(e["member_hashes"]) == {m["hash"] for m in members}
    assert e["representative_hash"] in set(e["member_hashes"])
    assert FUNDER in e["shared_addresses"]
    assert 36 <= e["avg_outputs"] <= 59
    # Stable id: the same burst seen again with one member fewer (an earlier poll) keeps its id.
    again = detect_bursts(pd.DataFrame(stream + members[:-1]), window_s=60, min_size=3)
    assert again.iloc[0]["burst_id"] == e["burst_id"]


# --- the service --------------------------------------------------------------------------------------------


def _write_stats(lake: Path, records: list[dict]) -> None:
    stats = stats_1m(records)
    schema = tables.stats_schema()
    for c in schema.names:
        if c not in stats:
            stats[c] = T0 if c == "updated_at" else None
    write_deltalake(
        str(lake / tables.STATS_1M),
        pa.Table.from_pandas(stats[schema.names], schema=schema, preserve_index=False),
    )


def _write_scored(lake: Path, records: list[dict]) -> None:
    model = ChampionModel(bundle=fitted_bundle(), name="m", version="5", run_id=None)
    out = score_frame(pd.DataFrame(records), model, settings=settings())
    table = pa.Table.from_pandas(out, schema=scored_arrow_schema(), preserve_index=False)
    write_deltalake(str(lake / "scored_transactions"), table, mode="append")


def test_detect_service_writes_once_alerts_once_and_survives_a_restart(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    s = settings(lake_root=lake)
    members = restamp(burst_members(), T0 + pd.Timedelta(minutes=50), 3.0)
    stream = _steady_with_burst() + members
    write_transactions(lake, stream)
    _write_stats(lake, stream)
    _write_scored(lake, [record("9e8530a3589b")])  # history before the service starts: never alerted

    notifier = RecordingNotifier()
    first = DetectService(s, notifier).poll()
    assert first.windows_new >= 1 and first.bursts_new == 1 and first.risky_transactions == 0
    windows = read_table(lake / tables.WINDOW_ANOMALIES)
    assert T0 + pd.Timedelta(minutes=45) in set(windows.loc[windows["metric"] == "tx_count", "window_start"])
    bursts = read_table(lake / tables.COORDINATED_BURSTS)
    assert len(bursts) == 1 and set(bursts.iloc[0]["member_hashes"]) == {m["hash"] for m in members}
    assert any(f"coordinated fan-out burst of {len(members)} transactions" in t for t in notifier.texts)
    assert any(f"transactions per minute = {20 + _burst_size()}" in t for t in notifier.texts)
    # One alert per flagged window (all its metrics in it) and one per burst.
    assert len(notifier.texts) == windows["window_start"].nunique() + 1

    # A severe transaction scored after the service started: one alert naming what fired and why.
    _write_scored(lake, [record("dbf58d5997f7"), record("1823999231ae")])
    second = DetectService(s, notifier)
    before = len(notifier.texts)
    r = second.poll()
    assert (r.windows_new, r.bursts_new, r.risky_transactions) == (0, 0, 1)
    (alert,) = notifier.texts[before:]
    assert "severe transaction" in alert and "dbf58d5997f7" in alert
    assert "watchlist ofac_sdn: spends from 3HqA7i3ttECLvgqvq69HNxxUP5BL7Z5YgA, listed as sanctions" in alert

    # Restart: nothing is written or alerted again.
    versions = {t: _version(lake / t) for t in (tables.WINDOW_ANOMALIES, tables.COORDINATED_BURSTS)}
    r = DetectService(s, notifier).poll()
    assert (r.windows_new, r.bursts_new, r.bursts_updated, r.risky_transactions) == (0, 0, 0, 0)
    assert len(notifier.texts) == before + 1
    assert {t: _version(lake / t) for t in versions} == versions


def _version(path: Path) -> int:
    from deltalake import DeltaTable

    return DeltaTable(str(path)).version()


def test_detect_cli_once_on_an_empty_lake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    result = run_detect_once(monkeypatch, tmp_path / "lake")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1]) == {
        "window_anomalies_new": 0,
        "bursts_new": 0,
        "bursts_updated": 0,
        "risky_transactions": 0,
        "alerts": 0,
        "failed_stages": [],
    }
