"""REST source: retry classification, backoff, and behaviour against the fake Blockchain.com."""

from __future__ import annotations

import asyncio
import email.utils
import time
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client import REGISTRY
from tenacity import RetryCallState
from typer.testing import CliRunner

from btc_anomaly import config
from btc_anomaly.cli import app
from btc_anomaly.ingestion.records import Failure
from btc_anomaly.ingestion.rest_source import (
    BlockchainClient,
    FetchError,
    RestSource,
    classify_exception,
    classify_response,
    fetch_tx_item,
    latest_block_transactions,
    parse_retry_after,
)
from btc_anomaly.schema import Transaction
from fakes.blockchain_com import FakeBlockchainCom, Fault, fake_blockchain, fake_settings, malformed_txs

__all__ = ["fake_blockchain"]  # the fixture is used by name


def _errors(kind: str) -> float:
    return REGISTRY.get_sample_value("btc_producer_errors_total", {"kind": kind}) or 0.0


def _response(
    status: int, body: bytes, content_type: str = "application/json", **headers: str
) -> httpx.Response:
    return httpx.Response(status, content=body, headers={"content-type": content_type, **headers})


# --- classification -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "kind", "retryable"),
    [
        (_response(429, b"{}", **{"Retry-After": "7"}), "http_429", True),
        (_response(500, b"{}"), "http_5xx", True),
        (_response(503, b"Service Unavailable", "text/plain"), "http_5xx", True),
        (_response(404, b'{"error":"not-found"}'), "http_4xx", False),
        (_response(400, b"{}"), "http_4xx", False),
        (_response(200, b"<html><body>Just a moment</body></html>", "text/html"), "html", True),
        (_response(200, b"  <!DOCTYPE html><html></html>"), "html", True),  # HTML labelled as JSON
        (_response(200, b'{"txs": [{"hash": "ab'), "bad_json", True),
        (_response(200, b""), "bad_json", True),
    ],
)
def test_bad_responses_are_classified(response: httpx.Response, kind: str, retryable: bool) -> None:
    with pytest.raises(FetchError) as info:
        classify_response(response)
    assert info.value.kind == kind
    assert info.value.retryable is retryable


def test_good_json_passes() -> None:
    assert classify_response(_response(200, b'{"txs": []}')) == {"txs": []}


def test_retry_after_is_read() -> None:
    with pytest.raises(FetchError) as info:
        classify_response(_response(429, b"", **{"Retry-After": "7"}))
    assert info.value.retry_after == 7.0


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (httpx.ConnectTimeout("t"), "timeout"),
        (httpx.ReadTimeout("t"), "timeout"),
        (httpx.ConnectError("refused"), "connect"),
        (httpx.RemoteProtocolError("server disconnected"), "connect"),
        (httpx.ReadError("reset"), "connect"),
    ],
)
def test_transport_errors_are_retryable(exc: Exception, kind: str) -> None:
    error = classify_exception(exc)
    assert error is not None and error.kind == kind and error.retryable


def test_non_transport_errors_are_not_classified() -> None:
    assert classify_exception(ValueError("bug")) is None


def test_parse_retry_after_forms() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("-4") == 0.0


def test_backoff_is_exponential_capped_and_honours_retry_after() -> None:
    settings = config.Settings(retry_base_s=0.5, retry_max_wait_s=3.0)
    client = BlockchainClient(settings)

    def state(attempt: int, exc: BaseException) -> RetryCallState:
        s = RetryCallState(None, None, (), {})
        s.attempt_number = attempt
        s.set_exception((type(exc), exc, None))
        return s

    err = FetchError("http_5xx", "x")
    assert [client.backoff(state(n, err)) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert client.backoff(state(1, FetchError("http_429", "x", retry_after=20.0))) == 20.0
    assert client.backoff(state(4, FetchError("http_429", "x", retry_after=0.1))) == 3.0
    asyncio.run(client.aclose())


# --- against the fake ----------------------------------------------------------------------------------


def _run(fake: FakeBlockchainCom, coro_fn: Any, **overrides: Any) -> Any:
    async def go() -> Any:
        async with BlockchainClient(fake_settings(fake, **overrides)) as client:
            return await coro_fn(client)

    return asyncio.run(go())


@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        (Fault.status_code(500), "http_5xx"),
        (Fault.status_code(502), "http_5xx"),
        (Fault.html(), "html"),
        (Fault.truncated(), "bad_json"),
        (Fault.drop(), "connect"),
        (Fault.delay(0.6), "timeout"),
    ],
)
def test_transient_faults_are_retried(fake_blockchain: FakeBlockchainCom, fault: Fault, kind: str) -> None:
    fake_blockchain.script("unconfirmed", fault, fault)
    before = _errors(kind)
    body = _run(fake_blockchain, lambda c: c.unconfirmed(), http_timeout_s=0.3)
    assert len(body["txs"]) == len(fake_blockchain.unconfirmed_txs)
    assert fake_blockchain.count("/unconfirmed-transactions") == 3
    assert _errors(kind) - before == 2


def test_429_waits_for_retry_after(fake_blockchain: FakeBlockchainCom) -> None:
    fake_blockchain.script("rawtx", Fault.rate_limit(retry_after="1"))
    tx_hash = next(iter(fake_blockchain.rawtx))
    started = time.monotonic()
    item = _run(fake_blockchain, lambda c: fetch_tx_item(c, tx_hash))
    elapsed = time.monotonic() - started
    assert isinstance(item, Transaction) and item.hash == tx_hash
    assert elapsed >= 1.0  # the backoff alone would have been 5 ms
    assert [status for _, status in fake_blockchain.requests] == [429, 200]


def test_gives_up_after_max_attempts(fake_blockchain: FakeBlockchainCom) -> None:
    fake_blockchain.script("latestblock", *[Fault.status_code(503)] * 10)
    with pytest.raises(FetchError) as info:
        _run(fake_blockchain, lambda c: c.latest_block(), retry_max_attempts=3)
    assert info.value.kind == "http_5xx"
    assert fake_blockchain.count("/latestblock") == 3


def test_not_found_is_not_retried(fake_blockchain: FakeBlockchainCom) -> None:
    with pytest.raises(FetchError) as info:
        _run(fake_blockchain, lambda c: c.rawtx("00" * 32))
    assert info.value.kind == "http_4xx"
    assert fake_blockchain.count("/rawtx") == 1


def test_every_recorded_rawtx_maps(fake_blockchain: FakeBlockchainCom) -> None:
    async def all_txs(client: BlockchainClient) -> list[Any]:
        return [await fetch_tx_item(client, h) for h in fake_blockchain.rawtx]

    items = _run(fake_blockchain, all_txs)
    assert [i.hash for i in items] == list(fake_blockchain.rawtx)
    assert all(isinstance(i, Transaction) and i.source == "rest" and i.block_height for i in items)


def test_poll_failure_is_counted_and_the_next_poll_works(fake_blockchain: FakeBlockchainCom) -> None:
    fake_blockchain.script("unconfirmed", *[Fault.status_code(500)] * 4)
    before = _errors("poll_failed")

    async def two_polls(client: BlockchainClient) -> tuple[list[Any], list[Any]]:
        source = RestSource(client.settings, client)
        return await source.poll_unconfirmed(), await source.poll_unconfirmed()

    first, second = _run(fake_blockchain, two_polls)
    assert first == []
    assert _errors("poll_failed") - before == 1
    assert len(second) == len(fake_blockchain.unconfirmed_txs)
    assert all(isinstance(t, Transaction) and t.block_height is None for t in second)


def test_new_block_is_fetched_once_with_heights(fake_blockchain: FakeBlockchainCom) -> None:
    async def polls(client: BlockchainClient) -> list[list[Any]]:
        source = RestSource(client.settings, client)
        return [await source.poll_latest_block() for _ in range(3)]

    first, second, third = _run(fake_blockchain, polls)
    block = fake_blockchain.block
    assert [t.hash for t in first] == [t["hash"] for t in block["tx"]]
    assert all(t.block_height == block["height"] for t in first)
    assert second == third == []
    assert fake_blockchain.count("/rawblock") == 1
    assert fake_blockchain.count("/latestblock") == 3


def test_failed_block_fetch_is_retried_on_the_next_poll(fake_blockchain: FakeBlockchainCom) -> None:
    fake_blockchain.script("rawblock", *[Fault.html()] * 4)

    async def polls(client: BlockchainClient) -> list[list[Any]]:
        source = RestSource(client.settings, client)
        return [await source.poll_latest_block() for _ in range(2)]

    first, second = _run(fake_blockchain, polls)
    assert first == []
    assert len(second) == len(fake_blockchain.block["tx"])


def test_malformed_transactions_become_failures(fake_blockchain: FakeBlockchainCom) -> None:
    broken = malformed_txs(fake_blockchain.unconfirmed_txs[0])
    fake_blockchain.unconfirmed_txs.extend(tx for tx, _ in broken)

    async def poll(client: BlockchainClient) -> list[Any]:
        return await RestSource(client.settings, client).poll_unconfirmed()

    items = _run(fake_blockchain, poll)
    failures = [i for i in items if isinstance(i, Failure)]
    assert len(items) - len(failures) == len(fake_blockchain.unconfirmed_txs) - len(broken)
    assert len(failures) == len(broken)
    for failure, (raw, word) in zip(failures, broken, strict=True):
        assert failure.raw == raw
        assert word in failure.reason
        assert failure.source == "rest"


def test_latest_block_transactions(fake_blockchain: FakeBlockchainCom) -> None:
    txs = _run(fake_blockchain, lambda c: latest_block_transactions(c, 3))
    assert [t.hash for t in txs] == [t["hash"] for t in fake_blockchain.block["tx"][-3:]]


def test_cli_latest_block_prints_json_lines(
    fake_blockchain: FakeBlockchainCom, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BTC_ANOMALY_BLOCKCHAIN_BASE_URL", fake_blockchain.base_url)
    config.get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["latest-block", "--n", "4"])
    finally:
        config.get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    lines = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert [d["hash"] for d in lines] == [t["hash"] for t in fake_blockchain.block["tx"][-4:]]
    assert all(d["block_height"] == fake_blockchain.block["height"] for d in lines)
