"""The stored-hash index's contract at its edges: coverage bounds, the newest date per key, merge limits,
staging, forgetting exactly the dates before a day. Keys are xxhash64 values of real sample transactions'
hashes (as Spark computes them), so they are spread like the stream's keys."""

from __future__ import annotations

import numpy as np
import pytest

from btc_anomaly.processing import stored_hashes
from btc_anomaly.processing.stored_hashes import StoredHashes
from helpers.detectors import sample_records

DAY = 18_831  # 2021-07-23


def _keys(n: int) -> np.ndarray:
    """Distinct int64 keys from real transaction hashes (their first 8 bytes, signed like xxhash64's)."""
    raw = [int.from_bytes(bytes.fromhex(r["hash"][:16]), "big", signed=True) for r in sample_records()[:n]]
    keys = np.array(raw, dtype=np.int64)
    assert len(np.unique(keys)) == n
    return keys


def _days(n: int, day: int = DAY) -> np.ndarray:
    return np.full(n, day, dtype=np.int32)


def test_coverage_bounds() -> None:
    index = StoredHashes()
    assert index.to_load(DAY) == (DAY, None)
    index.loaded(_keys(3), _days(3), DAY)
    assert index.covered_from == DAY
    assert index.to_load(DAY) is None  # exactly the covered day: nothing to load
    assert index.to_load(DAY + 1) is None
    assert index.to_load(DAY - 1) == (DAY - 1, DAY)
    empty = StoredHashes()
    empty.loaded(np.zeros(0, np.int64), np.zeros(0, np.int32), DAY)  # an empty table still covers the range
    assert empty.to_load(DAY) is None and len(empty) == 0


def test_a_key_counts_once_per_run_with_its_newest_date() -> None:
    k = _keys(2)
    index = StoredHashes()
    index.add(np.array([k[0], k[1], k[0]]), np.array([DAY + 2, DAY, DAY + 5], dtype=np.int32))
    assert len(index) == 2
    assert index.contains(k, DAY + 5).tolist() == [True, False]
    assert index.contains(k, DAY + 6).tolist() == [False, False]
    assert index.contains(k, DAY).tolist() == [True, True]  # a date equal to since counts


def test_lookups_map_back_to_the_probe_order_and_miss_outside_the_run() -> None:
    k = np.sort(_keys(6))
    index = StoredHashes()
    assert index.contains(k, DAY).tolist() == [False] * 6  # nothing stored yet
    index.add(k[1:5], _days(4))
    probes = np.array([k[5], k[0], k[3], k[1], k[4], k[2]])  # unsorted, with keys past both ends
    assert index.contains(probes, DAY).tolist() == [False, False, True, True, True, True]
    assert index.contains(np.zeros(0, np.int64), DAY).tolist() == []
    assert index.contains(list(probes[:3]), DAY).dtype == np.bool_


def test_runs_merge_when_the_older_is_at_most_twice_the_newer() -> None:
    k = _keys(6)
    index = StoredHashes()
    index.add(k[:4], _days(4))
    index.add(k[:2], _days(2, DAY + 1))  # 4 <= 2 * 2: merged, the repeated keys counted once
    assert len(index) == 4
    index.add(k[4:5], _days(1))  # 4 > 2 * 1: a run of its own
    index.add(k[:1], _days(1, DAY + 3))  # 1 <= 2 * 1 and then 4 <= 2 * 2: all merged into one run
    assert len(index) == 5
    assert index.contains(k[:2], DAY + 1).tolist() == [True, True]
    assert index.contains(k[:2], DAY + 2).tolist() == [True, False]
    index.add(np.zeros(0, np.int64), np.zeros(0, np.int32))  # nothing added: no empty run either
    assert len(index) == 5


def test_a_run_three_times_the_newer_stays_apart() -> None:
    k = _keys(3)
    index = StoredHashes()
    index.add(k, _days(3))
    index.add(k[:1], _days(1, DAY + 1))  # 3 > 2 * 1: not merged, so the repeated key is in both runs
    assert len(index) == 4
    assert index.contains(k[:1], DAY + 1).tolist() == [True]


def test_runs_stop_merging_at_exactly_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    k = _keys(4)
    monkeypatch.setattr(stored_hashes, "MAX_MERGED_RUN", 4)
    capped = StoredHashes()
    capped.add(k[:2], _days(2))
    capped.add(k[:2], _days(2))  # 2 + 2 = the cap: merged
    assert len(capped) == 2
    capped.add(k[2:4], _days(2))  # 2 + 2 = 4 <= cap: merged again
    capped.add(k[:2], _days(2))  # 4 <= 2 * 2 but 4 + 2 > cap: a separate run, its keys counted again
    assert len(capped) == 6
    assert capped.contains(k, DAY).all()


def test_staged_rows_count_once_committed_once() -> None:
    k = _keys(3)
    index = StoredHashes()
    index.commit()  # nothing staged
    assert len(index) == 0
    index.stage(k, _days(3))
    assert len(index) == 0 and not index.contains(k, DAY).any()
    index.commit()
    index.commit()  # the batch is indexed once
    assert len(index) == 3 and index.contains(k, DAY).all()


def test_forget_before_keeps_the_day_itself_and_moves_coverage() -> None:
    k = _keys(4)
    index = StoredHashes()
    index.forget_before(DAY + 10)  # nothing covered: nothing to forget
    assert index.covered_from is None
    index.add(k[:2], np.array([DAY - 5, DAY - 5], dtype=np.int32))  # added before any load
    index.forget_before(DAY + 10)
    assert len(index) == 2 and index.covered_from is None

    index.loaded(k[2:], np.array([DAY, DAY + 1], dtype=np.int32), DAY)
    index.forget_before(DAY)  # the covered day itself: a no-op, even for rows dated before it
    assert len(index) == 4 and index.covered_from == DAY
    assert index.contains(k[:1], DAY - 5).tolist() == [True]
    index.forget_before(DAY + 1)
    assert index.covered_from == DAY + 1
    assert len(index) == 1
    assert index.contains(k, DAY - 10).tolist() == [False, False, False, True]
    index.forget_before(DAY + 2)  # the last run empties and goes
    assert len(index) == 0 and index.covered_from == DAY + 2
    assert not index.contains(k, 0).any()
