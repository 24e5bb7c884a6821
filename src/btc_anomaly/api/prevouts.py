"""Prevout lookups for ``/predict/raw``: Blockchain.com ``/rawtx/{parent}`` gives each spent output's value
and script, which is what fee, input value and input addresses need.

Bounded so a slow or absent source never makes the endpoint slow: one attempt per parent with
``api_prevout_timeout_s``, at most ``api_prevout_concurrency`` in flight, at most ``api_prevout_max_parents``
parents per request, and the whole lookup cut at twice the timeout. A connection failure or an HTTP 429 opens
a circuit breaker: the source is skipped at once (scored by the structural forest, with the reason in the
response) for ``_DOWN_S`` seconds, or for as long as the 429's Retry-After asks. The API shares the producer's
Blockchain.com quota, so clients of /predict/raw must not be able to spend it by retrying into a rate limit.
Parents are cached (LRU): a confirmed transaction never changes. A parent answered not-found is remembered
for ``api_prevout_not_found_ttl_s`` (it may still appear: a mempool parent the source has not seen yet), so a
client repeating one unknown parent costs one upstream request per TTL, not one per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from btc_anomaly.config import Settings
from btc_anomaly.ingestion.decode import Prevout, PrevoutKey
from btc_anomaly.monitoring.metrics import API_PREVOUT_LOOKUPS, API_PREVOUT_PAUSED_UNTIL

log = logging.getLogger(__name__)

_DOWN_S = 30.0
_CACHE_SIZE = 20_000
_NOT_FOUND_SIZE = 20_000
Outputs = dict[int, Prevout]


@dataclass
class Resolution:
    prevouts: dict[PrevoutKey, Prevout] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # parent txid → why it is unknown


class PrevoutResolver:
    """One per worker process; its HTTP client lives on the worker's event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.source = settings.blockchain_base_url
        self._cache: OrderedDict[str, Outputs] = OrderedDict()
        self._not_found: OrderedDict[str, tuple[float, str]] = OrderedDict()  # txid → (until, reason)
        self._client: object | None = None
        self._sem: asyncio.Semaphore | None = None
        self._down_until = 0.0
        self._down_reason = ""

    def _http(self) -> object:
        if self._client is None:
            from btc_anomaly.ingestion.rest_source import BlockchainClient

            # One attempt with a short timeout: a client is waiting on this request.
            quick = self.settings.model_copy(
                update={"retry_max_attempts": 1, "http_timeout_s": self.settings.api_prevout_timeout_s}
            )
            self._client = BlockchainClient(quick)
            self._sem = asyncio.Semaphore(max(1, self.settings.api_prevout_concurrency))
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()  # type: ignore[attr-defined]
            self._client = None

    async def resolve(self, parents: Iterable[str]) -> Resolution:
        result = Resolution()
        wanted: list[str] = []
        now = time.monotonic()
        for txid in dict.fromkeys(parents):
            outputs = self._cache.get(txid)
            if outputs is not None:
                self._cache.move_to_end(txid)
                API_PREVOUT_LOOKUPS.labels(result="cached").inc()
                result.prevouts.update({(txid, n): p for n, p in outputs.items()})
            elif (missing := self._not_found.get(txid)) is not None and missing[0] > now:
                API_PREVOUT_LOOKUPS.labels(result="cached_not_found").inc()
                result.errors[txid] = missing[1]
            else:
                wanted.append(txid)
        if not wanted:
            return result
        cap = self.settings.api_prevout_max_parents
        if time.monotonic() < self._down_until:
            self._skip(result, wanted, f"prevout source unreachable: {self._down_reason}")
            return result
        self._skip(result, wanted[cap:], f"more than {cap} parent transactions in one request")
        wanted = wanted[:cap]
        client = self._http()
        tasks = {txid: asyncio.ensure_future(self._fetch(client, txid)) for txid in wanted}
        _, pending = await asyncio.wait(tasks.values(), timeout=2 * self.settings.api_prevout_timeout_s)
        for task in pending:
            task.cancel()
        for txid, task in tasks.items():
            if task in pending or task.cancelled():
                API_PREVOUT_LOOKUPS.labels(result="failed").inc()
                result.errors[txid] = "lookup timed out"
                continue
            outputs, error = task.result()
            if outputs is None:
                result.errors[txid] = error
                continue
            result.prevouts.update({(txid, n): p for n, p in outputs.items()})
        return result

    def _open(self, reason: str, seconds: float) -> None:
        """Skip the source for ``seconds`` (the breaker); said once in the log, not once per request."""
        until = time.monotonic() + seconds
        if until > self._down_until:
            API_PREVOUT_PAUSED_UNTIL.set(time.time() + seconds)
            if time.monotonic() >= self._down_until:
                log.warning("prevout lookups at %s paused for %.0f s: %s", self.source, seconds, reason)
            self._down_until = until
            self._down_reason = reason

    def _remember_not_found(self, txid: str, reason: str) -> None:
        ttl = self.settings.api_prevout_not_found_ttl_s
        if ttl <= 0:
            return
        self._not_found[txid] = (time.monotonic() + ttl, reason)
        self._not_found.move_to_end(txid)
        if len(self._not_found) > _NOT_FOUND_SIZE:
            self._not_found.popitem(last=False)

    def _skip(self, result: Resolution, txids: list[str], reason: str) -> None:
        if txids:
            API_PREVOUT_LOOKUPS.labels(result="skipped").inc(len(txids))
        for txid in txids:
            result.errors[txid] = reason

    async def _fetch(self, client: object, txid: str) -> tuple[Outputs | None, str]:
        from btc_anomaly.ingestion.rest_source import FetchError

        assert self._sem is not None
        async with self._sem:
            if time.monotonic() < self._down_until:
                API_PREVOUT_LOOKUPS.labels(result="skipped").inc()
                return None, f"prevout source unreachable: {self._down_reason}"
            try:
                body = await client.rawtx(txid)  # type: ignore[attr-defined]
            except FetchError as exc:
                if exc.kind == "http_4xx":
                    API_PREVOUT_LOOKUPS.labels(result="not_found").inc()
                    reason = f"parent {txid[:16]}… not found at {self.source} ({exc})"
                    self._remember_not_found(txid, reason)
                    return None, reason
                if exc.kind == "http_429":
                    pause = _DOWN_S if exc.retry_after is None else exc.retry_after
                    self._open(f"rate limited (HTTP 429), paused for {pause:.0f} s", pause)
                    API_PREVOUT_LOOKUPS.labels(result="rate_limited").inc()
                    return None, f"parent {txid[:16]}… not looked up: {self.source} rate limited (HTTP 429)"
                if exc.kind == "connect":
                    self._open(str(exc)[:200], _DOWN_S)
                API_PREVOUT_LOOKUPS.labels(result="failed").inc()
                return None, f"parent {txid[:16]}… lookup failed: {exc}"[:300]
        outputs = parse_rawtx_outputs(body, txid)
        if outputs is None:
            API_PREVOUT_LOOKUPS.labels(result="failed").inc()
            return None, f"parent {txid[:16]}…: unexpected /rawtx answer"
        API_PREVOUT_LOOKUPS.labels(result="fetched").inc()
        self._cache[txid] = outputs
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return outputs, ""


def parse_rawtx_outputs(body: object, txid: str) -> Outputs | None:
    """``{vout: (value, scriptPubKey)}`` from a Blockchain.com tx object, or None if it is not that tx."""
    if not isinstance(body, dict) or str(body.get("hash", "")).lower() != txid:
        return None
    outs = body.get("out")
    if not isinstance(outs, list):
        return None
    result: Outputs = {}
    for position, out in enumerate(outs):
        if not isinstance(out, dict):
            return None
        n, value, script = out.get("n", position), out.get("value"), out.get("script", "")
        if not isinstance(n, int) or not isinstance(value, int) or value < 0 or not isinstance(script, str):
            return None
        try:
            result[n] = (value, bytes.fromhex(script))
        except ValueError:
            return None
    return result
