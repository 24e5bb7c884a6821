"""Parts of the producer without a broker: partitioning, the dead-letter envelope, event-time bounds,
the bounded hand-over from async sources."""

from __future__ import annotations

import base64
import datetime as dt
import threading
import time
from collections.abc import AsyncIterator

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kafka.partitioner.default import murmur2
from typer.testing import CliRunner

from btc_anomaly.cli import app
from btc_anomaly.ingestion.partitioning import murmur2_batch, partitions_for
from btc_anomaly.ingestion.producer import DLQ_RAW_MAX, dlq_envelope, iterate_async
from btc_anomaly.ingestion.records import Failure
from btc_anomaly.schema import FIRST_SEEN_TOO_EARLY, first_seen_error, first_seen_too_late


@given(
    st.integers(min_value=0, max_value=70),
    st.lists(st.binary(min_size=70, max_size=70), min_size=1, max_size=30),
)
def test_batch_murmur2_matches_the_java_client_reference(length: int, blobs: list[bytes]) -> None:
    keys = [b[:length] for b in blobs]
    assert murmur2_batch(keys).tolist() == [murmur2(k) & 0xFFFFFFFF for k in keys]


@given(st.lists(st.binary(max_size=80), max_size=30), st.integers(min_value=1, max_value=64))
def test_partitions_match_kafkas_default_partitioner(keys: list[bytes], n: int) -> None:
    assert partitions_for(keys, n) == [(murmur2(k) & 0x7FFFFFFF) % n for k in keys]


NOW = dt.datetime(2025, 1, 2, 3, 4, 5, 600_000, tzinfo=dt.UTC)


def test_envelope_of_a_json_object_keeps_it_as_json_text() -> None:
    raw = {"hash": "ab" * 32, "out": [{"value": -1}]}
    env = orjson.loads(dlq_envelope(Failure(raw=raw, reason="negative", source="rest"), now=NOW))
    assert env == {
        "reason": "negative",
        "source": "rest",
        "time": "2025-01-02T03:04:05.600000Z",
        "raw": orjson.dumps(raw).decode(),
        "raw_encoding": "json",
        "raw_truncated": False,
    }


def test_envelope_of_binary_is_base64_and_huge_payloads_are_cut() -> None:
    binary = orjson.loads(dlq_envelope(Failure(raw=b"\xff\x00\xfe", reason="r", source="block")))
    assert binary["raw_encoding"] == "base64" and base64.b64decode(binary["raw"]) == b"\xff\x00\xfe"
    huge = orjson.loads(dlq_envelope(Failure(raw="x" * (DLQ_RAW_MAX + 10), reason="r", source="ws")))
    assert huge["raw_truncated"] is True and len(huge["raw"]) == DLQ_RAW_MAX
    empty = orjson.loads(dlq_envelope(Failure(raw=None, reason="r", source="ws")))
    assert empty["raw"] is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["produce", "--source", "kafka"], "expected rest, ws, replay or blocks"),
        (["produce", "--source", "blocks"], "needs one or more block files"),
        (["produce", "--source", "ws", "x.json"], "takes no paths"),
    ],
)
def test_produce_rejects_bad_arguments_before_connecting(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, args, env={"BTC_ANOMALY_PRODUCER_METRICS_PORT": "0"})
    assert result.exit_code == 2
    assert message in result.output.replace("\n", " ")


# --- event-time bounds (issue #19 item 5) -------------------------------------------------------------


def test_first_seen_must_lie_between_genesis_and_now_plus_skew() -> None:
    skew = 7200.0
    genesis = dt.datetime(2009, 1, 3, tzinfo=dt.UTC)
    assert first_seen_error(genesis, max_skew_s=skew, now=NOW) is None
    assert first_seen_error(genesis - dt.timedelta(microseconds=1), max_skew_s=skew, now=NOW) == (
        FIRST_SEEN_TOO_EARLY
    )
    edge = NOW + dt.timedelta(seconds=skew)
    assert first_seen_error(edge, max_skew_s=skew, now=NOW) is None
    assert first_seen_error(edge + dt.timedelta(microseconds=1), max_skew_s=skew, now=NOW) == (
        "first_seen more than 7200 s in the future"
    )
    next_year = dt.datetime.now(dt.UTC) + dt.timedelta(days=365)  # now defaults to the wall clock
    assert first_seen_error(next_year, max_skew_s=skew) == first_seen_too_late(skew)


# --- bounded hand-over from async sources (issue #19 item 4) ------------------------------------------


def test_a_slow_consumer_holds_an_async_source_at_the_queue_bound() -> None:
    """The source is not read while the queue is full: memory is bounded by ``maxsize`` items, and
    nothing is lost or reordered."""
    produced: list[int] = []

    async def source() -> AsyncIterator[int]:
        for i in range(50):
            produced.append(i)
            yield i

    depths: list[int] = []
    items = iterate_async(source, threading.Event(), maxsize=5, on_depth=depths.append)
    got = [next(i for i in items if i is not None)]
    deadline = time.monotonic() + 30
    while not depths or depths[-1] != 5:  # the pump reports the depth each time it finds the queue full
        assert time.monotonic() < deadline, f"queue never filled ({len(produced)} produced)"
        time.sleep(0.01)
    # Taken: 1; queued: 5; the one the pump waits to put: 1 (the async generator runs one item ahead).
    assert len(produced) <= 1 + 5 + 1
    got += [i for i in items if i is not None]
    assert got == list(range(50))
