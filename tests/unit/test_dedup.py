"""Dedup: the LRU stays within capacity, forgets the least recently seen, and keys on confirmation state."""

from __future__ import annotations

import pytest

from btc_anomaly.ingestion.dedup import Dedup

H1, H2, H3, H4 = ("1" * 64, "2" * 64, "3" * 64, "4" * 64)


def test_capacity_bounds_memory_and_evicts_oldest() -> None:
    d = Dedup(3)
    for h in (H1, H2, H3, H4):
        assert not d.seen(Dedup.key(h, None))
    assert len(d) == 3
    assert Dedup.key(H1, None) not in d  # oldest gone: seen again it is new again
    assert not d.seen(Dedup.key(H1, None))
    assert len(d) == 3


def test_a_hit_refreshes_recency() -> None:
    d = Dedup(3)
    for h in (H1, H2, H3):
        d.seen(Dedup.key(h, None))
    assert d.seen(Dedup.key(H1, None))  # H1 is now the most recent
    d.seen(Dedup.key(H4, None))
    assert Dedup.key(H1, None) in d
    assert Dedup.key(H2, None) not in d


def test_confirmation_is_published_again_but_only_once() -> None:
    d = Dedup(10)
    assert not d.seen(Dedup.key(H1, None))  # first seen in the mempool
    assert d.seen(Dedup.key(H1, None))  # polled again: skip
    assert not d.seen(Dedup.key(H1, 800_000))  # now in a block: publish again
    assert d.seen(Dedup.key(H1, 800_000))  # same block seen again: skip
    assert d.seen(Dedup.key(H1, 800_001))  # any height counts as "confirmed": skip
    assert d.seen(Dedup.key(H1, None))  # still remembered as seen unconfirmed


def test_height_zero_is_confirmed() -> None:
    assert Dedup.key(H1, 0) != Dedup.key(H1, None)


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Dedup(0)
