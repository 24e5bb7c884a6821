"""Replay: timing math (injected clock, no sleeping), re-stamping, loop hashes, bad lines, block files."""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import itertools
import threading
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from btc_anomaly.config import PROJECT_ROOT
from btc_anomaly.ingestion.records import Encoded, Failure
from btc_anomaly.ingestion.replay_source import (
    BLOCK_INTERVAL_S,
    BlockFileSource,
    IsoStamper,
    ReplaySource,
    block_offsets,
    loop_hash,
    read_lines,
)
from btc_anomaly.schema import Transaction, _iso

SAMPLE = PROJECT_ROOT / "data" / "sample" / "transactions.jsonl.gz"
BLOCKS = Path(__file__).resolve().parents[1] / "fixtures" / "blocks"
WALL = 1_763_700_000.25  # fixed "now" for re-stamping


class FakeClock:
    """Monotonic clock whose sleep advances time instantly and records each wait."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.fixture(scope="module")
def sample_lines() -> list[bytes]:
    return list(read_lines([SAMPLE]))


def _sorted_by_block(lines: list[bytes]) -> list[bytes]:
    """Three blocks of 3, 1 and 2 transactions, plus 2 unconfirmed ones, from the real sample."""
    by_height: dict[int, list[bytes]] = {}
    for line in lines:
        by_height.setdefault(orjson.loads(line)["block_height"], []).append(line)
    big = [h for h, v in by_height.items() if len(v) >= 3]
    one, two = big[0], big[1]
    unconfirmed = []
    for line in by_height[big[2]][:2]:
        d = orjson.loads(line)
        d["block_height"] = None
        unconfirmed.append(orjson.dumps(d))
    return [*by_height[one][:3], by_height[two][0], *by_height[big[3]][:2], *unconfirmed]


# --- timing math ----------------------------------------------------------------------------------


def test_block_offsets_spread_each_block_over_the_interval() -> None:
    offsets, length = block_offsets([7, 7, 7, 8, 9, 9, None, None])
    assert offsets == [0, 200, 400, 600, 1200, 1500, 1800, 2100]
    assert length == 4 * BLOCK_INTERVAL_S


def test_a_height_seen_again_later_is_a_new_block() -> None:
    offsets, length = block_offsets([5, 6, 5])
    assert offsets == [0, 600, 1200]
    assert length == 1800


@pytest.mark.parametrize("speed", [1.0, 10.0, 0.5])
def test_paced_replay_sends_each_tx_at_offset_over_speed(
    tmp_path: Path, sample_lines: list[bytes], speed: float
) -> None:
    path = write_lines(tmp_path / "s.jsonl", _sorted_by_block(sample_lines))
    clock = FakeClock()
    source = ReplaySource([path], speed=speed, clock=clock, sleep=clock.sleep, wall=lambda: WALL)
    start = clock.now
    sent_at = [clock.now - start for _ in source]
    expected = [o / speed for o in [0, 200, 400, 600, 1200, 1500, 1800, 2100]]
    assert sent_at == pytest.approx(expected)


def test_timing_continues_across_loops(tmp_path: Path, sample_lines: list[bytes]) -> None:
    path = write_lines(tmp_path / "s.jsonl", _sorted_by_block(sample_lines))
    clock = FakeClock()
    source = ReplaySource([path], speed=60.0, loop=True, clock=clock, sleep=clock.sleep, wall=lambda: WALL)
    start = clock.now
    times = [clock.now - start for _ in itertools.islice(source, 16)]
    one_loop = [o / 60 for o in [0, 200, 400, 600, 1200, 1500, 1800, 2100]]
    assert times == pytest.approx(one_loop + [t + 2400 / 60 for t in one_loop])


def test_speed_zero_never_sleeps(tmp_path: Path, sample_lines: list[bytes]) -> None:
    path = write_lines(tmp_path / "s.jsonl", sample_lines[:50])
    clock = FakeClock()
    items = list(ReplaySource([path], speed=0, clock=clock, sleep=clock.sleep))
    assert len(items) == 50
    assert clock.sleeps == []


def test_negative_speed_is_rejected(tmp_path: Path, sample_lines: list[bytes]) -> None:
    with pytest.raises(ValueError):
        ReplaySource([write_lines(tmp_path / "s.jsonl", sample_lines[:1])], speed=-1)


def test_stop_ends_a_paced_replay(tmp_path: Path, sample_lines: list[bytes]) -> None:
    path = write_lines(tmp_path / "s.jsonl", _sorted_by_block(sample_lines))
    stop = threading.Event()
    clock = FakeClock()

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        stop.set()  # a signal arrives while waiting for the next tx

    items = list(ReplaySource([path], speed=1, stop=stop, clock=clock, sleep=sleep))
    assert len(items) == 1


# --- content ----------------------------------------------------------------------------------------


def test_replayed_records_are_the_sample_restamped(sample_lines: list[bytes]) -> None:
    source = ReplaySource([SAMPLE], wall=lambda: WALL)
    items = list(source)
    assert len(items) == len(sample_lines) == len(source)
    stamp = dt.datetime(2025, 11, 21, 4, 40, 0, 250000, tzinfo=dt.UTC)
    assert dt.datetime.fromtimestamp(WALL, dt.UTC) == stamp
    for item, line in zip(items, sample_lines, strict=True):
        assert isinstance(item, Encoded)
        original = Transaction.from_json(line)
        replayed = Transaction.from_json(item.value)
        assert replayed.first_seen == stamp
        assert replayed.source == "replay"
        assert replayed.model_dump(exclude={"first_seen", "source"}) == original.model_dump(
            exclude={"first_seen", "source"}
        )
        assert item.hash == original.hash
        assert item.unconfirmed == (original.block_height is None)
        assert item.value == replayed.to_json_bytes()  # byte-identical to the canonical serializer


def test_loops_get_fresh_deterministic_hashes(tmp_path: Path, sample_lines: list[bytes]) -> None:
    path = write_lines(tmp_path / "s.jsonl", sample_lines[:5])
    first = [i.hash for i in itertools.islice(ReplaySource([path], loop=True), 15)]
    again = [i.hash for i in itertools.islice(ReplaySource([path], loop=True), 15)]
    assert first == again
    originals = [orjson.loads(line)["hash"] for line in sample_lines[:5]]
    assert first[:5] == originals
    assert first[5:10] == [hashlib.sha256((h + "1").encode()).hexdigest() for h in originals]
    assert first[10:15] == [loop_hash(h, 2) for h in originals]
    assert len(set(first)) == 15
    item = list(itertools.islice(ReplaySource([path], loop=True), 6))[5]
    assert Transaction.from_json(item.value).hash == item.hash == first[5]


def test_partitions_are_precomputed_per_loop(tmp_path: Path, sample_lines: list[bytes]) -> None:
    from kafka.partitioner.default import murmur2

    path = write_lines(tmp_path / "s.jsonl", sample_lines[:20])
    for item in itertools.islice(ReplaySource([path], loop=True, num_partitions=3), 60):
        assert isinstance(item, Encoded)
        assert item.partition == (murmur2(item.hash.encode()) & 0x7FFFFFFF) % 3


def test_bad_lines_become_failures_in_place(tmp_path: Path, sample_lines: list[bytes]) -> None:
    broken = orjson.loads(sample_lines[1])
    broken["fee"] = -1
    lines = [sample_lines[0], b'{"hash": "trunc', orjson.dumps(broken), sample_lines[2]]
    path = tmp_path / "s.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n".join(lines)))
    items = list(itertools.islice(ReplaySource([path], loop=True), 6))
    kinds = [type(i).__name__ for i in items]
    assert kinds == ["Encoded", "Failure", "Failure", "Encoded", "Encoded", "Encoded"]  # failures only once
    bad_json, bad_fee = items[1], items[2]
    assert isinstance(bad_json, Failure) and isinstance(bad_fee, Failure)
    assert bad_json.raw == lines[1] and "JSON" in bad_json.reason
    assert "fee" in bad_fee.reason
    assert bad_fee.source == "replay"


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_iso_stamper_matches_the_schema_serializer(unix: float) -> None:
    micros = int(unix * 1_000_000)
    as_datetime = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=micros)
    assert IsoStamper()(unix) == _iso(as_datetime).encode()


def test_iso_stamper_cache_follows_the_second() -> None:
    stamp = IsoStamper()
    assert stamp(59.999999) == b"1970-01-01T00:00:59.999999Z"
    assert stamp(60.5) == b"1970-01-01T00:01:00.500000Z"
    assert stamp(60.75) == b"1970-01-01T00:01:00.750000Z"


# --- raw block files ----------------------------------------------------------------------------------


def test_block_files_with_prevouts_give_exact_fees() -> None:
    rbtc = BLOCKS / "rbtc"
    block = rbtc / "mainnet-000000000000000004c2b624ed5d7756c508d90fd0da2c7c679febfa6c4735f0.raw.gz"
    utxos = rbtc / "mainnet-000000000000000004c2b624ed5d7756c508d90fd0da2c7c679febfa6c4735f0.utxos.json.gz"
    txs = list(BlockFileSource([block], prevout_paths=[utxos]))
    assert len(txs) == 784
    assert all(isinstance(t, Transaction) and t.block_height == 388_381 and t.source == "block" for t in txs)
    assert all(t.fee is not None for t in txs)
    assert sum(t.fee for t in txs if isinstance(t, Transaction) and t.fee) == 15_227_937


def test_blk_dat_frames_and_hex_blocks_decode() -> None:
    items = list(BlockFileSource([BLOCKS / "btcd" / "277647.dat.gz", BLOCKS / "bitcoinkit" / "block1.raw"]))
    assert len(items) == 213 + 1
    assert all(isinstance(t, Transaction) for t in items)


def test_undecodable_block_file_is_one_failure(tmp_path: Path) -> None:
    good = (BLOCKS / "bitcoinkit" / "block1.raw").read_bytes()
    bad = tmp_path / "broken.raw"
    bad.write_bytes(good[:-10])
    items = list(BlockFileSource([bad, BLOCKS / "bitcoinkit" / "block1.raw"]))
    assert isinstance(items[0], Failure)
    assert items[0].reason.startswith("broken.raw: ")
    assert items[0].raw == good[:-10]
    assert isinstance(items[1], Transaction)
