"""Blockchain.com REST: a retrying HTTP client and a polling source of canonical transactions.

Every request goes through :meth:`BlockchainClient.get_json`, which turns each way a public API fails
into a :class:`FetchError` with a ``kind`` and retries the transient ones with exponential backoff
(tenacity): HTTP 429 (waiting at least what ``Retry-After`` asks), 5xx, timeouts, connection errors,
an HTML page instead of JSON (rate-limit or maintenance pages from the CDN) and truncated JSON. Other
4xx are not retried. A poll that still fails is counted (``poll_failed``) and the next poll goes on.

:class:`RestSource` polls ``/unconfirmed-transactions`` every ``poll_interval_s`` and, when
``fetch_blocks`` is on, ``/latestblock``; a block hash it has not handled yet is fetched with
``/rawblock/{hash}`` so the transactions it confirms are published again with ``block_height`` set.
The block current at start-up counts as new. Blocks mined between two polls other than the latest are
not walked back to (the WebSocket source announces every block; REST is its fallback).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from btc_anomaly.config import Settings
from btc_anomaly.ingestion.blockchain_com import from_blockchain_tx, parse_rawblock, parse_unconfirmed
from btc_anomaly.ingestion.records import Failure, Item
from btc_anomaly.monitoring.metrics import PRODUCER_LAST_FETCH, producer_error
from btc_anomaly.schema import InvalidTransaction, Source, Transaction

log = logging.getLogger(__name__)

USER_AGENT = "btc-anomaly/0.1"


class FetchError(Exception):
    """One failed HTTP attempt. ``kind`` is the metrics label; ``retryable`` drives tenacity."""

    def __init__(self, kind: str, message: str, *, retryable: bool = True, retry_after: float | None = None):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.retryable = retryable
        self.retry_after = retry_after


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def classify_response(response: httpx.Response) -> Any:
    """The decoded JSON body of a response, or a FetchError saying why it is not usable."""
    status = response.status_code
    if status == 429:
        raise FetchError(
            "http_429", "rate limited", retry_after=parse_retry_after(response.headers.get("Retry-After"))
        )
    if status >= 500:
        raise FetchError("http_5xx", f"HTTP {status}")
    if status >= 400:
        raise FetchError("http_4xx", f"HTTP {status}", retryable=False)
    body = response.content
    content_type = response.headers.get("content-type", "")
    if "html" in content_type or body.lstrip()[:1] == b"<":
        # CDNs answer rate limits and maintenance with a 200 HTML page.
        raise FetchError("html", f"HTML instead of JSON ({len(body)} bytes)")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise FetchError("bad_json", f"invalid or truncated JSON ({len(body)} bytes): {exc}") from None


def classify_exception(exc: BaseException) -> FetchError | None:
    """Map a transport exception to a FetchError; None for anything that is not a transport problem."""
    if isinstance(exc, httpx.TimeoutException):
        return FetchError("timeout", str(exc) or type(exc).__name__)
    if isinstance(exc, httpx.TransportError):
        return FetchError("connect", str(exc) or type(exc).__name__)
    return None


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, FetchError) and exc.retryable


class BlockchainClient:
    """Async JSON client of the Blockchain.com REST API with retries; one per event loop."""

    def __init__(self, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        self._http = httpx.AsyncClient(
            base_url=settings.blockchain_base_url,
            timeout=settings.http_timeout_s,
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
            transport=transport,
            follow_redirects=True,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> BlockchainClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def backoff(self, state: RetryCallState) -> float:
        """Exponential backoff; a 429's Retry-After is honoured even when it is longer."""
        s = self.settings
        wait = min(s.retry_max_wait_s, s.retry_base_s * 2 ** (state.attempt_number - 1))
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, FetchError) and exc.retry_after is not None:
            return max(wait, exc.retry_after)
        return wait

    async def _get_once(self, path: str, params: dict[str, str] | None) -> Any:
        try:
            response = await self._http.get(path, params=params)
        except httpx.HTTPError as exc:
            error = classify_exception(exc)
            if error is None:
                raise
            producer_error(error.kind)
            raise error from None
        try:
            return classify_response(response)
        except FetchError as error:
            producer_error(error.kind)
            raise

    async def get_json(self, path: str, params: dict[str, str] | None = None) -> Any:
        """GET and decode JSON, retrying transient failures; raises the last FetchError when out of tries."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.settings.retry_max_attempts),
            wait=self.backoff,
            retry=retry_if_exception(_is_retryable),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._get_once(path, params)
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    # --- endpoints -------------------------------------------------------------------------------

    async def unconfirmed(self) -> Any:
        return await self.get_json("/unconfirmed-transactions", {"format": "json"})

    async def latest_block(self) -> dict[str, Any]:
        body = await self.get_json("/latestblock")
        if not isinstance(body, dict) or not isinstance(body.get("hash"), str):
            raise FetchError("bad_json", "latestblock without a hash", retryable=False)
        return body

    async def rawblock(self, block_hash: str) -> Any:
        return await self.get_json(f"/rawblock/{block_hash}")

    async def rawtx(self, tx_hash: str) -> Any:
        return await self.get_json(f"/rawtx/{tx_hash}")


def _failures(failures: list[tuple[Any, str]], source: str) -> list[Item]:
    return [Failure(raw=raw, reason=reason, source=source) for raw, reason in failures]


async def fetch_block_items(client: BlockchainClient, block_hash: str, source: Source) -> list[Item]:
    """All transactions of one block (plus failures); raises FetchError when the block cannot be fetched."""
    body = await client.rawblock(block_hash)
    try:
        block = parse_rawblock(body, source=source)
    except InvalidTransaction as exc:
        return [Failure(raw=body, reason=f"rawblock {block_hash}: {exc.reason}", source=source)]
    PRODUCER_LAST_FETCH.labels(source=source).set(time.time())
    log.info("block %s (height %s): %d transactions", block_hash, block.height, len(block.transactions))
    return [*block.transactions, *_failures(block.failures, source)]


async def fetch_tx_item(client: BlockchainClient, tx_hash: str, source: Source = "rest") -> Item:
    """One transaction by hash via /rawtx; raises FetchError when it cannot be fetched."""
    body = await client.rawtx(tx_hash)
    try:
        return from_blockchain_tx(body, source=source)
    except InvalidTransaction as exc:
        return Failure(raw=body, reason=exc.reason, source=source)


async def latest_block_transactions(client: BlockchainClient, n: int) -> list[Transaction]:
    """The last ``n`` transactions (block order) of the current block: /latestblock then /rawblock."""
    latest = await client.latest_block()
    block = parse_rawblock(await client.rawblock(latest["hash"]), source="rest")
    return block.transactions[-n:] if n > 0 else []


class RestSource:
    """Polls Blockchain.com; an async iterator of Transaction and Failure items."""

    def __init__(self, settings: Settings, client: BlockchainClient, *, source: Source = "rest") -> None:
        self.settings = settings
        self.client = client
        self.source: Source = source
        # Shared with the WebSocket source, so a block it already announced is not fetched twice.
        self.last_block_hash: str | None = None

    async def poll_unconfirmed(self) -> list[Item]:
        try:
            body = await self.client.unconfirmed()
        except FetchError as exc:
            producer_error("poll_failed")
            log.warning("unconfirmed-transactions poll failed: %s", exc)
            return []
        try:
            txs, failures = parse_unconfirmed(body, source=self.source)
        except InvalidTransaction as exc:
            return [Failure(raw=body, reason=f"unconfirmed-transactions: {exc.reason}", source=self.source)]
        PRODUCER_LAST_FETCH.labels(source=self.source).set(time.time())
        return [*txs, *_failures(failures, self.source)]

    async def poll_latest_block(self) -> list[Item]:
        try:
            latest = await self.client.latest_block()
            block_hash = latest["hash"]
            if block_hash == self.last_block_hash:
                return []
            items = await fetch_block_items(self.client, block_hash, self.source)
        except FetchError as exc:
            producer_error("poll_failed")
            log.warning("block poll failed: %s", exc)
            return []
        self.last_block_hash = block_hash
        return items

    async def poll_once(self) -> list[Item]:
        items = await self.poll_unconfirmed()
        if self.settings.fetch_blocks:
            items.extend(await self.poll_latest_block())
        return items

    async def stream(self) -> AsyncIterator[Item]:
        interval = self.settings.poll_interval_s
        while True:
            started = time.monotonic()
            for item in await self.poll_once():
                yield item
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    def __aiter__(self) -> AsyncIterator[Item]:
        return self.stream()


async def fetch_tx_items(settings: Settings, hashes: list[str]) -> AsyncIterator[Item]:
    """One-shot source for ``produce --source rest HASH...``: each tx by /rawtx, failures counted."""
    async with BlockchainClient(settings) as client:
        for tx_hash in hashes:
            try:
                yield await fetch_tx_item(client, tx_hash)
            except FetchError as exc:
                producer_error("poll_failed")
                log.warning("rawtx %s failed: %s", tx_hash, exc)
