"""Prevout lookups for ``/predict/raw``: Blockchain.com ``/rawtx/{parent}`` gives each spent output's value
and script, which is what fee, input value and input addresses need.

Bounded so a slow or absent source never makes the endpoint slow: one attempt per parent with
``api_prevout_timeout_s``, at most ``api_prevout_concurrency`` in flight, at most ``api_prevout_max_parents``
parents per request, and the whole lookup cut at twice the timeout. A connection failure marks the source
unreachable for ``_DOWN_S`` seconds, during which requests skip the lookup at once (scored by the structural
forest, with the reason in the response). Parents are cached (LRU): a confirmed transaction never changes.
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
from btc_anomaly.monitoring.metrics import API_PREVOUT_LOOKUPS

log = logging.getLogger(__name__)

_DOWN_S = 30.0
_CACHE_SIZE = 20_000
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
        for txid in dict.fromkeys(parents):
            outputs = self._cache.get(txid)
            if outputs is not None:
                self._cache.move_to_end(txid)
                API_PREVOUT_LOOKUPS.labels(result="cached").inc()
                result.prevouts.update({(txid, n): p for n, p in outputs.items()})
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
                    return None, f"parent {txid[:16]}… not found at {self.source} ({exc})"
                if exc.kind == "connect":
                    self._down_until = time.monotonic() + _DOWN_S
                    self._down_reason = str(exc)[:200]
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
