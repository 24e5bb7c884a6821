"""Blockchain.com WebSocket push feed as an async iterator of Transaction and Failure items.

Protocol (``blockchain_ws_url``): after connecting we send ``{"op":"unconfirmed_sub"}`` and, when
``fetch_blocks`` is on, ``{"op":"blocks_sub"}``; the server then pushes ``{"op":"utx","x":{tx}}`` for
each new mempool transaction and ``{"op":"block","x":{"hash":...}}`` for each block, whose transactions
we fetch with REST ``/rawblock`` (the push only lists tx indexes). We send ``{"op":"ping"}`` every
``ws_ping_interval_s`` because the service drops quiet clients; websockets' protocol-level keepalive
runs too, so a dead TCP connection is noticed.

A dropped or refused connection is retried with exponential backoff plus jitter (many clients
reconnecting after an outage should not arrive in lock-step). When the feed has been down for
``ws_fallback_after_s``, REST polling (:class:`~btc_anomaly.ingestion.rest_source.RestSource`) runs
alongside the reconnect attempts and stops as soon as the WebSocket is back. Duplicates this causes
are removed by the producer's dedup.

Bounded memory. Pushes wait in a queue of ``producer_source_queue_max`` items until the producer takes
them. When it is full (Kafka away longer than the queue covers) a push is dropped and counted
(``btc_producer_errors_total{kind="source_dropped"}``, alerted): a push feed cannot be paused — a
reader that stops reading misses its pings and is disconnected, which loses everything after — and a
dropped mempool sighting is not a lost transaction, since the block that confirms it is fetched and
published. Block fetches and the REST fallback wait for room instead of dropping (they are pulls).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from btc_anomaly.config import Settings
from btc_anomaly.ingestion.blockchain_com import from_blockchain_tx
from btc_anomaly.ingestion.records import Failure, Item
from btc_anomaly.ingestion.rest_source import BlockchainClient, FetchError, RestSource, fetch_block_items
from btc_anomaly.monitoring.metrics import (
    PRODUCER_LAST_FETCH,
    PRODUCER_QUEUE_DEPTH,
    PRODUCER_REST_FALLBACK,
    PRODUCER_WS_CONNECTED,
    producer_error,
)
from btc_anomaly.schema import InvalidTransaction

log = logging.getLogger(__name__)


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Delay before reconnect number ``attempt`` (0-based): "equal jitter" exponential backoff.

    Half the exponential step is kept so the delay still grows; the other half is random so clients
    dropped by the same outage spread out.
    """
    step = min(cap, base * 2**attempt)
    return step / 2 + rng.uniform(0, step / 2)


class WsSource:
    """Blockchain.com WebSocket with reconnects and a REST fallback."""

    def __init__(
        self,
        settings: Settings,
        client: BlockchainClient,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.client = client
        self.rest = RestSource(settings, client, source="rest")
        self._rng = rng or random.Random()
        self._clock = clock
        self._queue: asyncio.Queue[Item] = asyncio.Queue(maxsize=max(1, settings.producer_source_queue_max))
        self.dropped = 0  # pushes dropped because the queue was full
        self._down_since: float | None = None
        self._fallback: asyncio.Task[None] | None = None
        self._block_tasks: set[asyncio.Task[None]] = set()
        self._fetching: set[str] = set()  # block hashes being fetched: a repeated announcement waits for it
        self.connects = 0  # successful connections so far (tests and logs)

    # --- public ------------------------------------------------------------------------------------

    @property
    def fallback_active(self) -> bool:
        return self._fallback is not None

    async def stream(self) -> AsyncIterator[Item]:
        self._down_since = self._clock()
        tasks = [asyncio.create_task(self._ws_loop()), asyncio.create_task(self._watchdog())]
        try:
            while True:
                getter = asyncio.ensure_future(self._queue.get())
                done, _ = await asyncio.wait([getter, *tasks], return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    PRODUCER_QUEUE_DEPTH.labels(queue="ws").set(self._queue.qsize())
                    yield getter.result()
                    continue
                getter.cancel()
                for task in tasks:  # a loop task ending means a bug: surface it, never hang silently
                    if task.done():
                        task.result()
        finally:
            for task in [*tasks, *self._block_tasks]:
                task.cancel()
            self._stop_fallback()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            PRODUCER_WS_CONNECTED.set(0)

    def __aiter__(self) -> AsyncIterator[Item]:
        return self.stream()

    # --- connection --------------------------------------------------------------------------------

    async def _ws_loop(self) -> None:
        s = self.settings
        attempt = 0
        while True:
            try:
                async with connect(
                    s.blockchain_ws_url,
                    open_timeout=s.http_timeout_s,
                    ping_interval=s.ws_ping_interval_s,
                    ping_timeout=s.http_timeout_s,
                    max_size=16 * 1024 * 1024,
                ) as ws:
                    attempt = 0
                    self._connected()
                    await self._session(ws)
                log.warning("websocket closed by the server")
            except (OSError, TimeoutError, WebSocketException) as exc:
                log.warning("websocket down: %s", exc or type(exc).__name__)
            producer_error("ws_disconnect")
            self._disconnected()
            delay = backoff_delay(attempt, s.ws_reconnect_base_s, s.ws_reconnect_max_s, self._rng)
            attempt += 1
            await asyncio.sleep(delay)

    async def _session(self, ws: ClientConnection) -> None:
        await ws.send('{"op":"unconfirmed_sub"}')
        if self.settings.fetch_blocks:
            await ws.send('{"op":"blocks_sub"}')
        pinger = asyncio.create_task(self._ping(ws))
        try:
            async for message in ws:
                self._handle(message)
        finally:
            pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError, WebSocketException, OSError):
                await pinger

    async def _ping(self, ws: ClientConnection) -> None:
        while True:
            await asyncio.sleep(self.settings.ws_ping_interval_s)
            await ws.send('{"op":"ping"}')

    def _connected(self) -> None:
        self.connects += 1
        self._down_since = None
        PRODUCER_WS_CONNECTED.set(1)
        self._stop_fallback()
        log.info("websocket connected to %s", self.settings.blockchain_ws_url)

    def _disconnected(self) -> None:
        PRODUCER_WS_CONNECTED.set(0)
        if self._down_since is None:
            self._down_since = self._clock()

    # --- messages ----------------------------------------------------------------------------------

    def _handle(self, message: str | bytes) -> None:
        try:
            data = orjson.loads(message)
        except orjson.JSONDecodeError as exc:
            self._offer(Failure(raw=message, reason=f"bad JSON: {exc}", source="ws"))
            return
        op = data.get("op") if isinstance(data, dict) else None
        if op == "utx":
            try:
                tx = from_blockchain_tx(data.get("x"), source="ws")
            except InvalidTransaction as exc:
                self._offer(Failure(raw=message, reason=exc.reason, source="ws"))
                return
            PRODUCER_LAST_FETCH.labels(source="ws").set(time.time())
            self._offer(tx)
        elif op == "block" and self.settings.fetch_blocks:
            block = data.get("x")
            block_hash = block.get("hash") if isinstance(block, dict) else None
            if not isinstance(block_hash, str):
                self._offer(Failure(raw=message, reason="block message without a hash", source="ws"))
                return
            if block_hash == self.rest.last_block_hash or block_hash in self._fetching:
                return
            # Fetch in the background: a rawblock can take seconds and utx messages keep coming.
            self._fetching.add(block_hash)
            task = asyncio.create_task(self._fetch_block(block_hash))
            self._block_tasks.add(task)
            task.add_done_callback(self._block_tasks.discard)
        elif op not in ("pong", "block"):
            log.debug("ignored websocket message op=%r", op)

    def _offer(self, item: Item) -> None:
        """Queue a push, or drop and count it when the queue is full (see the module docstring)."""
        try:
            self._queue.put_nowait(item)
            PRODUCER_QUEUE_DEPTH.labels(queue="ws").set(self._queue.qsize())
        except asyncio.QueueFull:
            self.dropped += 1
            producer_error("source_dropped")
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning(
                    "producer queue full (%d items): %d websocket pushes dropped so far",
                    self._queue.maxsize,
                    self.dropped,
                )

    async def _fetch_block(self, block_hash: str) -> None:
        try:
            # The transactions come from /rawblock, so they are REST records whatever announced the block.
            items = await fetch_block_items(self.client, block_hash, "rest")
        except FetchError as exc:
            producer_error("poll_failed")
            log.warning("rawblock %s failed: %s", block_hash, exc)
            return
        finally:
            self._fetching.discard(block_hash)
        self.rest.last_block_hash = block_hash
        for item in items:
            await self._queue.put(item)

    # --- REST fallback -----------------------------------------------------------------------------

    async def _watchdog(self) -> None:
        tick = max(0.05, min(1.0, self.settings.ws_fallback_after_s / 4))
        while True:
            await asyncio.sleep(tick)
            down = self._down_since
            if (
                down is not None
                and self._fallback is None
                and self._clock() - down >= self.settings.ws_fallback_after_s
            ):
                log.warning("websocket down for %.0f s: polling REST until it is back", self._clock() - down)
                self._fallback = asyncio.create_task(self._poll_rest())
                PRODUCER_REST_FALLBACK.set(1)

    async def _poll_rest(self) -> None:
        async for item in self.rest.stream():
            await self._queue.put(item)

    def _stop_fallback(self) -> None:
        if self._fallback is not None:
            self._fallback.cancel()
            self._fallback = None
            PRODUCER_REST_FALLBACK.set(0)
            log.info("websocket back: REST fallback stopped")
