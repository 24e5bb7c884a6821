"""A lake table whose ``_delta_log`` is torn or missing under the readers: the API and `btc-anomaly detect`.

Readers never crash or answer 500: the API's lake endpoints answer a 503 that names no path and no reader
text (the log has both) while /health, /predict and /ready keep answering; detect counts the failed stage
and its next poll after the repair succeeds. (The stream's side is ``test_stream_delta_log.py``, the
dashboard's is the last test of ``tests/integration/test_dashboard_gunicorn.py``.)
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from deltalake import write_deltalake
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from btc_anomaly.config import Settings
from btc_anomaly.detectors.service import DetectService
from btc_anomaly.model.scoring import score_frame, scored_arrow_schema
from btc_anomaly.processing import tables
from helpers.api_server import in_process_api, sample_records, served_sample_model
from helpers.detectors import RecordingNotifier, burst_members, restamp, write_transactions
from helpers.detectors import settings as detect_settings

RECORDS = sample_records(400)
T0 = pd.Timestamp("2024-05-01T12:00:00Z")


def _tear_last_commit(table: Path) -> Callable[[], None]:
    """Cut the newest commit file in half (a torn write); returns the repair."""
    last = sorted((table / "_delta_log").glob("*.json"))[-1]
    whole = last.read_bytes()
    last.write_bytes(whole[: len(whole) // 2])
    return lambda: last.write_bytes(whole)


def _remove_log(table: Path) -> Callable[[], None]:
    """Move ``_delta_log`` away (a table folder with data files but no log); returns the repair."""
    log, aside = table / "_delta_log", table.parent / f"{table.name}._delta_log.aside"
    shutil.move(log, aside)
    return lambda: shutil.move(aside, log)


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TestClient, Path]]:
    from btc_anomaly.api import lake as api_lake

    monkeypatch.setattr(api_lake, "_REFRESH_S", 0.0)  # every request re-reads the log (else after 1 s)
    lake = tmp_path / "lake"
    served = served_sample_model()
    scored = score_frame(pd.DataFrame(RECORDS), served.model, settings=Settings())
    table = lake / tables.SCORED
    for part in (scored.iloc[:200], scored.iloc[200:]):  # two commits: a torn last one leaves a history
        write_deltalake(
            str(table),
            pa.Table.from_pandas(part, schema=scored_arrow_schema(), preserve_index=False),
            mode="append",
        )
    window = {"api_lake_window_h": 131_400, "api_lake_max_window_h": 131_400}  # the sample spans 2011-2025
    with in_process_api(lake, tmp_path / "state", **window) as client:
        yield client, table


def test_a_torn_scored_log_is_a_503_without_paths_and_the_api_keeps_scoring(
    api: tuple[TestClient, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A reader that opens the table after the damage (a restarted API) cannot read it: 503."""
    client, table = api
    known = RECORDS[3]["hash"]
    repair = _tear_last_commit(table)
    for path in ("/anomalies", f"/transactions/{known}"):
        r = client.get(path)
        assert r.status_code == 503, (path, r.text)
        assert r.json()["detail"] == "the Delta lake cannot be read right now (details in the API log)"
        assert str(table.parent) not in r.text and "_delta_log" not in r.text
    assert "lake read failed" in caplog.text and "Truncated" in caplog.text  # the operator's details
    assert client.get("/health").status_code == 200
    assert client.post("/predict", json=RECORDS[0]).status_code == 200  # scoring needs no lake
    ready = client.get("/ready")
    assert str(table.parent) not in ready.text and "_delta_log" not in ready.text
    repair()
    assert client.get("/anomalies").status_code == 200
    assert client.get(f"/transactions/{known}").json()["hash"] == known


def test_a_log_torn_under_a_running_api_keeps_its_last_good_version(api: tuple[TestClient, Path]) -> None:
    """delta-rs replays only complete commits onto a table it has open: the API goes on answering from
    the last version it read until the log is repaired (then it moves on)."""
    client, table = api
    before = client.get("/anomalies").json()
    _tear_last_commit(table)
    after = client.get("/anomalies")
    assert after.status_code == 200 and after.json() == before


def test_a_missing_scored_log_reads_as_no_table_yet_and_ready_says_so(api: tuple[TestClient, Path]) -> None:
    """Without its log the folder is not a Delta table: nothing scored yet, as on a fresh lake (the
    data files are not read as if they were live)."""
    client, table = api
    repair = _remove_log(table)
    r = client.get("/anomalies")
    assert r.status_code == 200 and r.json()["items"] == []
    assert client.get(f"/transactions/{RECORDS[3]['hash']}").status_code == 404
    assert client.get("/ready").json()["lake"]["table_exists"] is False
    repair()
    assert client.get("/anomalies").json()["items"]


@pytest.mark.parametrize("damage", [_tear_last_commit, _remove_log], ids=["torn", "missing"])
def test_detect_counts_a_damaged_transactions_log_and_recovers(
    tmp_path: Path, damage: Callable[[Path], Callable[[], None]]
) -> None:
    lake = tmp_path / "lake"
    members = restamp(burst_members(), T0, 3.0)
    write_transactions(lake, members[:4])
    write_transactions(lake, members[4:])
    service = DetectService(detect_settings(lake_root=lake), RecordingNotifier())
    repair = damage(lake / tables.TRANSACTIONS)
    failed = service.poll()
    if damage is _remove_log:
        # No log = no table yet (a fresh lake): nothing to detect, nothing written, not a failure.
        assert not failed.failures
        assert not (lake / tables.COORDINATED_BURSTS).exists()
    else:
        assert failed.failures, "a torn log is a failed stage, not an empty lake"
        for stage in failed.failures:
            assert REGISTRY.get_sample_value("btc_detect_poll_failures_total", {"stage": stage}) >= 1
        assert REGISTRY.get_sample_value("btc_detect_consecutive_failed_polls") >= 1
    repair()
    recovered = service.poll()
    assert not recovered.failures
    assert (lake / tables.COORDINATED_BURSTS / "_delta_log").is_dir()
    assert REGISTRY.get_sample_value("btc_detect_consecutive_failed_polls") == 0
