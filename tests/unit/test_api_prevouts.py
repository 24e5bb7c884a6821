"""Prevout lookups of /predict/raw against the recorded Blockchain.com stand-in (real parent transactions)."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import REGISTRY

from btc_anomaly.api.prevouts import PrevoutResolver, parse_rawtx_outputs
from fakes.blockchain_com import FakeBlockchainCom, Fault, fake_blockchain, fake_settings
from helpers.api_server import historical_cases, rawtx_object

__all__ = ["fake_blockchain"]  # the fixture is used by name


def _parents() -> dict[str, dict]:
    out = {}
    for case in historical_cases():
        for prev in case["prev_transactions"]:
            obj = rawtx_object(prev["transaction"])
            out[obj["hash"]] = obj
    return out


def test_resolver_fetches_caches_and_reports(fake_blockchain: FakeBlockchainCom) -> None:
    parents = _parents()
    fake_blockchain.rawtx.update(parents)
    settings = fake_settings(fake_blockchain, api_prevout_timeout_s=1.0)
    resolver = PrevoutResolver(settings)
    unknown = "ab" * 32

    async def run() -> None:
        first = await resolver.resolve([*parents, unknown])
        assert set(first.errors) == {unknown} and "not found" in first.errors[unknown]
        for txid, obj in parents.items():
            assert first.prevouts[(txid, 0)] == (
                obj["out"][0]["value"],
                bytes.fromhex(obj["out"][0]["script"]),
            )
        before = fake_blockchain.count("/rawtx")
        again = await resolver.resolve(list(parents))
        assert again.prevouts == {k: v for k, v in first.prevouts.items()}
        assert fake_blockchain.count("/rawtx") == before, "parents are cached"
        await resolver.aclose()

    asyncio.run(run())


def test_resolver_gives_up_quickly(fake_blockchain: FakeBlockchainCom) -> None:
    parents = _parents()
    fake_blockchain.rawtx.update(parents)
    txid = next(iter(parents))
    fake_blockchain.script("rawtx", Fault.delay(3.0))
    resolver = PrevoutResolver(fake_settings(fake_blockchain, api_prevout_timeout_s=0.3))

    async def run() -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await resolver.resolve([txid])
        assert loop.time() - started < 1.5
        assert txid in result.errors and not result.prevouts
        await resolver.aclose()

    asyncio.run(run())


def test_resolver_skips_an_unreachable_source(fake_blockchain: FakeBlockchainCom) -> None:
    settings = fake_settings(
        fake_blockchain, blockchain_base_url="http://127.0.0.1:9", api_prevout_timeout_s=0.5
    )
    resolver = PrevoutResolver(settings)

    async def run() -> None:
        first = await resolver.resolve(["ab" * 32])
        assert "connect" in first.errors["ab" * 32]
        second = await resolver.resolve(["cd" * 32])
        assert "unreachable" in second.errors["cd" * 32]
        await resolver.aclose()

    asyncio.run(run())


def test_resolver_caps_parents_per_request(fake_blockchain: FakeBlockchainCom) -> None:
    resolver = PrevoutResolver(fake_settings(fake_blockchain, api_prevout_max_parents=2))

    async def run() -> None:
        result = await resolver.resolve([f"{i:064x}" for i in range(5)])
        skipped = [e for e in result.errors.values() if "more than 2" in e]
        assert len(skipped) == 3
        await resolver.aclose()

    asyncio.run(run())


def test_parse_rawtx_outputs_rejects_other_shapes() -> None:
    obj = rawtx_object(historical_cases()[0]["prev_transactions"][0]["transaction"])
    assert parse_rawtx_outputs(obj, obj["hash"])
    assert parse_rawtx_outputs(obj, "00" * 32) is None
    assert (
        parse_rawtx_outputs({"hash": obj["hash"], "out": [{"value": -1, "script": ""}]}, obj["hash"]) is None
    )
    assert (
        parse_rawtx_outputs({"hash": obj["hash"], "out": [{"value": 1, "script": "zz"}]}, obj["hash"]) is None
    )
    assert parse_rawtx_outputs("<html>", obj["hash"]) is None


def test_not_found_parents_are_not_asked_again_within_the_ttl(fake_blockchain: FakeBlockchainCom) -> None:
    unknown = "ab" * 32
    cached = PrevoutResolver(fake_settings(fake_blockchain, api_prevout_not_found_ttl_s=600.0))
    uncached = PrevoutResolver(fake_settings(fake_blockchain, api_prevout_not_found_ttl_s=0.0))

    async def run() -> None:
        for _ in range(3):
            result = await cached.resolve([unknown])
            assert "not found" in result.errors[unknown] and not result.prevouts
        assert fake_blockchain.count(f"/rawtx/{unknown}") == 1, "one upstream request per TTL"
        for _ in range(2):
            await uncached.resolve([unknown])
        assert fake_blockchain.count(f"/rawtx/{unknown}") == 3, "TTL 0: asked every time"
        await cached.aclose()
        await uncached.aclose()

    asyncio.run(run())


def test_a_429_opens_the_breaker_for_retry_after(fake_blockchain: FakeBlockchainCom) -> None:
    parents = _parents()
    fake_blockchain.rawtx.update(parents)
    first, second = list(parents)[:2]
    fake_blockchain.script("rawtx", Fault.rate_limit(retry_after="3600"))
    resolver = PrevoutResolver(fake_settings(fake_blockchain))

    async def run() -> None:
        limited = await resolver.resolve([first])
        assert "HTTP 429" in limited.errors[first]
        paused_until = REGISTRY.get_sample_value("btc_api_prevout_paused_until_timestamp_seconds")
        assert paused_until is not None and paused_until > time.time() + 3000, "the pause is exported"
        # The source answers normally again, but the client asked for an hour: nothing is sent meanwhile.
        later = await resolver.resolve([first, second])
        assert set(later.errors) == {first, second} and not later.prevouts
        assert all("rate limited" in e and "paused for 3600 s" in e for e in later.errors.values())
        assert fake_blockchain.count("/rawtx") == 1
        await resolver.aclose()

    asyncio.run(run())


def test_a_429_without_retry_after_opens_the_breaker_too(fake_blockchain: FakeBlockchainCom) -> None:
    parents = _parents()
    fake_blockchain.rawtx.update(parents)
    txid = next(iter(parents))
    fake_blockchain.script("rawtx", Fault.rate_limit(retry_after=None))
    resolver = PrevoutResolver(fake_settings(fake_blockchain))

    async def run() -> None:
        await resolver.resolve([txid])
        again = await resolver.resolve([txid])
        assert "rate limited" in again.errors[txid] and fake_blockchain.count("/rawtx") == 1
        await resolver.aclose()

    asyncio.run(run())
