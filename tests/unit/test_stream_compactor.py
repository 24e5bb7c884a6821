"""When the transactions query compacts (stream.Compactor); the compaction itself runs against real Delta
in tests/integration/test_stream.py."""

from __future__ import annotations

import datetime as dt

import pytest

from btc_anomaly.processing import stream
from btc_anomaly.processing.stream import Compactor

D1, D2, D3 = dt.date(2021, 7, 23), dt.date(2021, 7, 21), dt.date(2021, 7, 25)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dt.date | None]]:
    seen: list[tuple[str, dt.date | None]] = []

    def fake_compact(_spark: object, path: str, since: dt.date | None) -> int:
        seen.append((path, since))
        return 3

    monkeypatch.setattr(stream, "compact", fake_compact)
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

    monkeypatch.setattr(stream, "compact", failing)
    c = Compactor("/lake/transactions", every=1)
    c.wrote(D1)
    c.run_if_due(object())  # logs, does not raise
    assert "compaction of transactions from 2021-07-23 failed" in caplog.text
    assert (c.since, c.batches) == (D1, 0)  # the partitions stay pending for the next try
