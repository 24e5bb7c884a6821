"""The transactions query's index of stored hashes (stored_hashes.StoredHashes): no false negative for
the dates it covers, whatever the order of loads, batches and evictions. Against real Delta and Spark's
own xxhash64 in tests/integration/test_stream.py."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from btc_anomaly.processing.stored_hashes import StoredHashes
from helpers.stream import sample_lines

DAY = 18_831  # 2021-07-23


@pytest.fixture(scope="module")
def keys() -> np.ndarray:
    """64-bit keys from the bundled real transactions' hashes (their first 8 bytes)."""
    hashes = sorted({orjson.loads(line)["hash"] for line in sample_lines()})
    return np.array([int(h[:16], 16) - 2**63 for h in hashes], dtype=np.int64)


def test_an_empty_index_covers_nothing_and_asks_to_load_everything_from_since() -> None:
    index = StoredHashes()
    assert index.to_load(DAY) == (DAY, None)
    index.loaded(np.array([], np.int64), np.array([], np.int32), DAY)
    assert index.to_load(DAY) is None
    assert index.to_load(DAY + 5) is None
    assert index.to_load(DAY - 3) == (DAY - 3, DAY)  # only the dates not yet covered


def test_every_added_key_is_found_across_many_batches(keys: np.ndarray) -> None:
    index = StoredHashes()
    index.loaded(keys[:1000], np.full(1000, DAY, np.int32), DAY)
    for start in range(1000, len(keys), 37):  # batches of a live stream, merged into runs as they come
        chunk = keys[start : start + 37]
        assert not index.contains(chunk, DAY).any()
        index.stage(chunk, np.full(len(chunk), DAY, np.int32))
        index.commit()
    assert len(index) == len(keys)
    assert index.contains(keys, DAY).all()
    assert len(index._runs) <= 2 * np.log2(len(keys))


def test_a_staged_batch_is_not_indexed_until_committed(keys: np.ndarray) -> None:
    index = StoredHashes()
    index.loaded(keys[:0], np.array([], np.int32), DAY)
    index.stage(keys[:10], np.full(10, DAY, np.int32))
    assert not index.contains(keys[:10], DAY).any()
    index.commit()
    assert index.contains(keys[:10], DAY).all()


def test_only_rows_dated_from_since_count(keys: np.ndarray) -> None:
    index = StoredHashes()
    index.loaded(keys[:4], np.array([DAY - 40, DAY - 1, DAY, DAY + 2], np.int32), DAY - 60)
    assert index.contains(keys[:4], DAY).tolist() == [False, False, True, True]


def test_a_key_stored_under_two_dates_keeps_the_newest(keys: np.ndarray) -> None:
    """Two transactions with one key (or one stored twice beyond the lookback): the newer date decides,
    so a lookup from a later `since` still finds it, in one run or across runs."""
    index = StoredHashes()
    index.add(np.array([keys[0], keys[0]]), np.array([DAY + 3, DAY - 50], np.int32))
    index.add(np.array([keys[1]]), np.array([DAY - 50], np.int32))
    index.add(np.array([keys[1]]), np.array([DAY + 1], np.int32))
    assert index.contains(keys[:2], DAY).tolist() == [True, True]


def test_forgetting_old_dates_narrows_coverage_and_a_reload_restores_it(keys: np.ndarray) -> None:
    index = StoredHashes()
    days = np.array([DAY - 31, DAY - 10, DAY], np.int32)
    index.loaded(keys[:3], days, DAY - 40)
    index.forget_before(DAY - 30)
    assert index.covered_from == DAY - 30
    assert index.contains(keys[:3], DAY - 40).tolist() == [False, True, True]
    assert index.to_load(DAY - 35) == (DAY - 35, DAY - 30)
    index.loaded(keys[:1], days[:1], DAY - 35)  # what the table holds for the missing dates
    assert index.contains(keys[:3], DAY - 35).all()
    index.forget_before(DAY - 50)  # never widens coverage
    assert index.covered_from == DAY - 35


def test_runs_stop_merging_at_the_cap_and_keys_stay_found(
    keys: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    from btc_anomaly.processing import stored_hashes

    monkeypatch.setattr(stored_hashes, "MAX_MERGED_RUN", 256)
    index = StoredHashes()
    for start in range(0, len(keys), 50):
        chunk = keys[start : start + 50]
        index.add(chunk, np.full(len(chunk), DAY, np.int32))
    assert max(len(k) for k, _ in index._runs) <= 256
    assert index.contains(keys, DAY).all()
