"""WebSocket source against the fake feed: subscribe, ping, utx, blocks, drops, reconnect, REST fallback."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable
from typing import Any

import orjson
from prometheus_client import REGISTRY

from btc_anomaly.ingestion.records import Failure, Item
from btc_anomaly.ingestion.rest_source import BlockchainClient
from btc_anomaly.ingestion.ws_source import WsSource, backoff_delay
from btc_anomaly.schema import Transaction
from fakes.blockchain_com import FakeBlockchainCom, fake_blockchain, fake_settings, malformed_txs

__all__ = ["fake_blockchain"]  # the fixture is used by name


def _errors(kind: str) -> float:
    return REGISTRY.get_sample_value("btc_producer_errors_total", {"kind": kind}) or 0.0


def collect(
    fake: FakeBlockchainCom,
    done: Callable[[list[Item], WsSource], bool],
    *,
    timeout: float = 10.0,
    during: Callable[[list[Item], WsSource], None] | None = None,
    **overrides: Any,
) -> tuple[list[Item], WsSource]:
    """Run a WsSource against the fake until ``done(items, source)``; fail after ``timeout``."""

    async def go() -> tuple[list[Item], WsSource]:
        async with BlockchainClient(fake_settings(fake, **overrides)) as client:
            source = WsSource(client.settings, client, rng=random.Random(1))
            items: list[Item] = []
            stream = source.stream()

            async def consume() -> None:
                async for item in stream:
                    items.append(item)
                    if during is not None:
                        during(items, source)
                    if done(items, source):
                        return

            async def watch() -> None:  # conditions that do not need a new item (e.g. pings)
                while not done(items, source):
                    await asyncio.sleep(0.02)

            tasks = [asyncio.create_task(consume()), asyncio.create_task(watch())]
            finished, pending = await asyncio.wait(
                tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            await stream.aclose()
            assert finished, f"timed out with {len(items)} items"
            return items, source

    return asyncio.run(go())


def test_backoff_grows_with_jitter_and_cap() -> None:
    rng = random.Random(7)
    for attempt in range(12):
        step = min(30.0, 0.5 * 2**attempt)
        delays = [backoff_delay(attempt, 0.5, 30.0, rng) for _ in range(200)]
        assert all(step / 2 <= d <= step for d in delays)
        assert len(set(delays)) > 150  # jittered, not lock-step
    assert backoff_delay(50, 0.5, 30.0, rng) <= 30.0


def test_utx_messages_become_transactions(fake_blockchain: FakeBlockchainCom) -> None:
    txs = fake_blockchain.unconfirmed_txs[:6]
    fake_blockchain.ws_utx(txs)
    items, _ = collect(fake_blockchain, lambda items, _: len(items) >= 6)
    assert [i.hash for i in items if isinstance(i, Transaction)] == [t["hash"] for t in txs]
    assert all(isinstance(i, Transaction) and i.source == "ws" and i.block_height is None for i in items)
    ops = [m["op"] for m in fake_blockchain.ws_received]
    assert ops[:2] == ["unconfirmed_sub", "blocks_sub"]


def test_ping_op_is_sent_every_interval(fake_blockchain: FakeBlockchainCom) -> None:
    def pings() -> list[float]:
        return [m["at"] for m in fake_blockchain.ws_received if m["op"] == "ping"]

    collect(fake_blockchain, lambda *_: len(pings()) >= 3, ws_ping_interval_s=0.15)
    at = pings()
    gaps = [b - a for a, b in itertools.pairwise(at)]
    assert all(0.1 <= g <= 1.0 for g in gaps), gaps  # every 0.15 s, with slack for a loaded machine


def test_block_message_fetches_the_block_over_rest(fake_blockchain: FakeBlockchainCom) -> None:
    block = fake_blockchain.block
    fake_blockchain.ws_block(block["hash"])
    fake_blockchain.ws_block(block["hash"])  # announced twice: fetched once
    fake_blockchain.ws_utx(fake_blockchain.unconfirmed_txs[:1])
    items, _ = collect(fake_blockchain, lambda items, _: len(items) >= len(block["tx"]) + 1)
    confirmed = [i for i in items if isinstance(i, Transaction) and i.block_height == block["height"]]
    assert [t.hash for t in confirmed] == [t["hash"] for t in block["tx"]]
    time.sleep(0.2)
    assert fake_blockchain.count(f"/rawblock/{block['hash']}") == 1


def test_malformed_messages_become_failures(fake_blockchain: FakeBlockchainCom) -> None:
    broken = malformed_txs(fake_blockchain.unconfirmed_txs[0])
    fake_blockchain.ws_utx([tx for tx, _ in broken])
    fake_blockchain.ws_script.append({"op": "block", "x": {"height": 1}})
    items, _ = collect(fake_blockchain, lambda items, _: len(items) >= len(broken) + 1)
    assert all(isinstance(i, Failure) and i.source == "ws" for i in items)
    for item, (_, word) in zip(items, broken, strict=False):
        assert isinstance(item, Failure) and word in item.reason
    assert "block message without a hash" in items[-1].reason  # type: ignore[union-attr]


def test_drop_mid_stream_reconnects_and_continues(fake_blockchain: FakeBlockchainCom) -> None:
    txs = fake_blockchain.unconfirmed_txs[:12]
    fake_blockchain.ws_drop_after = [4, 3]  # first two connections die mid-stream
    fake_blockchain.ws_utx(txs)
    before = _errors("ws_disconnect")
    items, source = collect(fake_blockchain, lambda items, _: len(items) >= 12)
    assert [i.hash for i in items if isinstance(i, Transaction)] == [t["hash"] for t in txs]
    assert source.connects == 3
    assert fake_blockchain.ws_connections == 3
    assert _errors("ws_disconnect") - before == 2
    assert [m["op"] for m in fake_blockchain.ws_received].count("unconfirmed_sub") == 3  # re-subscribed


def test_rest_fallback_while_down_and_back_to_ws(fake_blockchain: FakeBlockchainCom) -> None:
    fake_blockchain.ws_refuse = 10**6  # the feed is down
    ws_txs = fake_blockchain.unconfirmed_txs[:3]
    seen_fallback: list[bool] = []

    def during(items: list[Item], source: WsSource) -> None:
        seen_fallback.append(source.fallback_active)
        if (
            any(isinstance(i, Transaction) and i.source == "rest" for i in items)
            and fake_blockchain.ws_refuse
        ):
            fake_blockchain.ws_refuse = 0  # the feed comes back
            fake_blockchain.ws_utx(ws_txs)

    def done(items: list[Item], _: WsSource) -> bool:
        return sum(1 for i in items if isinstance(i, Transaction) and i.source == "ws") >= 3

    items, source = collect(fake_blockchain, done, during=during, ws_fallback_after_s=0.3, timeout=15)
    rest = [i for i in items if isinstance(i, Transaction) and i.source == "rest"]
    assert {t.hash for t in rest} >= {t["hash"] for t in fake_blockchain.unconfirmed_txs}
    assert any(seen_fallback)
    assert source.connects >= 1
    assert not source.fallback_active  # REST polling stopped once the WebSocket was back
    assert REGISTRY.get_sample_value("btc_producer_rest_fallback_active") == 0


def test_blocks_sub_only_when_fetching_blocks(fake_blockchain: FakeBlockchainCom) -> None:
    fake_blockchain.ws_utx(fake_blockchain.unconfirmed_txs[:1])
    collect(fake_blockchain, lambda items, _: len(items) >= 1, fetch_blocks=False)
    assert [m["op"] for m in fake_blockchain.ws_received if m["op"].endswith("_sub")] == ["unconfirmed_sub"]


def test_no_fallback_within_the_grace_period(fake_blockchain: FakeBlockchainCom) -> None:
    fake_blockchain.ws_refuse = 10**6

    def attempts() -> int:
        return 10**6 - fake_blockchain.ws_refuse

    # Waits for reconnect attempts, not for a wall-clock span: a loaded machine may run few per second.
    # The delays between them are test_backoff_grows_with_jitter_and_cap's subject.
    _, source = collect(fake_blockchain, lambda *_: attempts() >= 3, ws_fallback_after_s=30)
    assert attempts() >= 3
    assert not source.fallback_active
    assert fake_blockchain.count("/unconfirmed-transactions") == 0


def test_pushes_beyond_the_queue_bound_are_dropped_and_counted(fake_blockchain: FakeBlockchainCom) -> None:
    """Memory stays bounded while the producer does not take items (Kafka away): the push feed cannot be
    paused, so pushes past ``producer_source_queue_max`` are dropped, counted and logged."""
    txs = fake_blockchain.unconfirmed_txs[:8]
    before = _errors("source_dropped")

    async def go() -> tuple[list[Item], WsSource]:
        async with BlockchainClient(fake_settings(fake_blockchain, producer_source_queue_max=3)) as client:
            source = WsSource(client.settings, client)
            for tx in txs:  # nobody reads the queue meanwhile
                source._handle(orjson.dumps({"op": "utx", "x": tx}))
            depths.append(REGISTRY.get_sample_value("btc_producer_queue_depth", {"queue": "ws"}))
            queued = [source._queue.get_nowait() for _ in range(source._queue.qsize())]
            return queued, source

    depths: list[float | None] = []
    queued, source = asyncio.run(go())
    assert depths == [3.0], "the queue-depth gauge shows the full queue"
    assert [i.hash for i in queued if isinstance(i, Transaction)] == [t["hash"] for t in txs[:3]]
    assert source.dropped == 5 and _errors("source_dropped") - before == 5
