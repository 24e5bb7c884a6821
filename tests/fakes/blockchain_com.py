"""A local stand-in for Blockchain.com (REST + WebSocket) serving recorded real responses, with faults.

Data. Everything served comes from real recorded responses in ``tests/fixtures/api/blockchain_info``:
``/rawtx/{hash}`` and ``/rawblock/{hash}`` are served verbatim. No real ``/unconfirmed-transactions`` or
``/latestblock`` response was ever recorded, so those are assembled from recorded tx objects, which
have exactly the schema of ``/unconfirmed-transactions``' ``txs[]`` (Blockchain.com uses one tx object
everywhere; ``/multiaddr`` adds the wallet-only ``balance``/``result`` keys, removed here):

* ``/unconfirmed-transactions?format=json`` = ``{"txs": [...]}`` with the /rawtx txs, the complete
  /multiaddr txs (those listing all their outputs) and the non-coinbase txs of the recorded block,
  all with ``block_height``/``block_index`` null, as if seen in the mempool before being mined.
* ``/latestblock`` = the recorded block's ``hash, height, time, block_index, txIndexes``.
* WebSocket ``utx`` messages carry the same tx objects; ``block`` messages carry the block's hash.

Faults, scripted per endpoint and consumed one per request (then the endpoint answers normally):
``Fault.rate_limit(retry_after)`` (429 + Retry-After), ``Fault.status(500)``, ``Fault.html()`` (a 200
HTML page, as a CDN serves), ``Fault.truncated()`` (the real body cut in half), ``Fault.delay(s)``
(answers late, to trigger client timeouts), ``Fault.drop()`` (closes the connection without an
answer). Malformed tx objects are real ones with a field broken (:func:`malformed_txs`). On the
WebSocket, ``ws_drop_after`` drops the TCP connection mid-stream after N messages and ``ws_refuse``
rejects handshakes (the feed being down).

Runs on 127.0.0.1 free ports: a threaded ``http.server`` and a ``websockets`` sync server, each in a
thread. :func:`fake_blockchain` is the pytest fixture.
"""

from __future__ import annotations

import copy
import gzip
import http.server
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.sync.server import Server, ServerConnection, serve

from btc_anomaly.config import Settings

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "api" / "blockchain_info"


def _load(path: Path) -> Any:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return json.loads(data)


def _complete(tx: dict[str, Any]) -> bool:
    return len(tx.get("out", [])) == tx.get("vout_sz") and len(tx.get("inputs", [])) == tx.get("vin_sz")


def _mempool_view(tx: dict[str, Any]) -> dict[str, Any]:
    tx = {k: v for k, v in tx.items() if k not in ("balance", "result")}
    tx["block_height"] = None
    tx["block_index"] = None
    return tx


def malformed_txs(base: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """Real tx objects with one thing broken, and a word the rejection reason must contain."""
    no_hash = copy.deepcopy(base)
    del no_hash["hash"]
    bad_value = copy.deepcopy(base)
    bad_value["out"][0]["value"] = -5
    short = copy.deepcopy(base)
    short["vout_sz"] = len(short["out"]) + 1
    no_inputs = copy.deepcopy(base)
    no_inputs["hash"] = "ab" * 32
    del no_inputs["inputs"]
    return [(no_hash, "hash"), (bad_value, "negative"), (short, "incomplete"), (no_inputs, "inputs")]


@dataclass(frozen=True)
class Fault:
    kind: str
    status: int = 200
    retry_after: str | None = None
    seconds: float = 0.0

    @classmethod
    def rate_limit(cls, retry_after: str | None = "1") -> Fault:
        return cls("rate_limit", 429, retry_after=retry_after)

    @classmethod
    def status_code(cls, status: int) -> Fault:
        return cls("status", status)

    @classmethod
    def html(cls) -> Fault:
        return cls("html")

    @classmethod
    def truncated(cls) -> Fault:
        return cls("truncated")

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        return cls("delay", seconds=seconds)

    @classmethod
    def drop(cls) -> Fault:
        return cls("drop")


_HTML = (
    b"<!DOCTYPE html><html><head><title>Just a moment...</title></head>"
    b"<body>Checking your browser</body></html>"
)


class FakeBlockchainCom:
    def __init__(self, fixtures: Path = FIXTURES) -> None:
        self.rawtx: dict[str, dict[str, Any]] = {
            p.stem: _load(p) for p in sorted((fixtures / "rawtx").glob("*.json"))
        }
        self.blocks: dict[str, dict[str, Any]] = {}
        for p in sorted((fixtures / "rawblock").glob("*.json*")):
            block = _load(p)
            self.blocks[block["hash"]] = block
        multiaddr: list[dict[str, Any]] = []
        for p in sorted((fixtures / "multiaddr").glob("*.json*")):
            multiaddr.extend(_load(p)["txs"])
        pool: dict[str, dict[str, Any]] = {}
        for tx in [*self.rawtx.values(), *multiaddr, *(t for b in self.blocks.values() for t in b["tx"])]:
            is_coinbase = any(i.get("prev_out") is None for i in tx["inputs"])
            if _complete(tx) and not is_coinbase:
                pool.setdefault(tx["hash"], _mempool_view(tx))
        self.unconfirmed_txs: list[dict[str, Any]] = list(pool.values())
        self.latest_hash: str | None = next(iter(self.blocks), None)
        self.faults: dict[str, deque[Fault]] = {}
        self.requests: list[tuple[str, int]] = []
        self.ws_script: list[dict[str, Any]] = []
        self.ws_cursor = 0
        self.ws_drop_after: list[int] = []  # per upcoming connection: drop after N messages
        self.ws_refuse = 0  # handshakes to refuse
        self.ws_received: list[dict[str, Any]] = []
        self.ws_connections = 0
        self._lock = threading.Lock()
        self._http: http.server.ThreadingHTTPServer | None = None
        self._ws: Server | None = None
        self._threads: list[threading.Thread] = []

    # --- scripting ---------------------------------------------------------------------------------

    def script(self, endpoint: str, *faults: Fault) -> None:
        """Queue faults for an endpoint: unconfirmed, latestblock, rawblock or rawtx."""
        with self._lock:
            self.faults.setdefault(endpoint, deque()).extend(faults)

    def ws_utx(self, txs: list[dict[str, Any]]) -> None:
        with self._lock:
            self.ws_script.extend({"op": "utx", "x": tx} for tx in txs)

    def ws_block(self, block_hash: str) -> None:
        block = self.blocks[block_hash]
        with self._lock:
            self.ws_script.append(
                {"op": "block", "x": {"hash": block_hash, "height": block["height"], "time": block["time"]}}
            )

    def count(self, endpoint_prefix: str) -> int:
        return sum(1 for path, _ in self.requests if path.startswith(endpoint_prefix))

    @property
    def block(self) -> dict[str, Any]:
        assert self.latest_hash is not None
        return self.blocks[self.latest_hash]

    # --- lifecycle ---------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        assert self._http is not None
        return f"http://127.0.0.1:{self._http.server_address[1]}"

    @property
    def ws_url(self) -> str:
        assert self._ws is not None
        return f"ws://127.0.0.1:{self._ws.socket.getsockname()[1]}/inv"

    def start(self) -> FakeBlockchainCom:
        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self._http.daemon_threads = True
        self._ws = serve(self._ws_handler, "127.0.0.1", 0, process_request=self._ws_gate, compression=None)
        http_server = self._http
        for target in (lambda: http_server.serve_forever(poll_interval=0.02), self._ws.serve_forever):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._ws is not None:
            self._ws.shutdown()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> FakeBlockchainCom:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- WebSocket -------------------------------------------------------------------------------

    def _ws_gate(self, conn: ServerConnection, request: Request) -> Response | None:
        with self._lock:
            if self.ws_refuse > 0:
                self.ws_refuse -= 1
                return conn.respond(503, "feed down\n")
        return None

    def _ws_handler(self, conn: ServerConnection) -> None:
        with self._lock:
            self.ws_connections += 1
            drop_after = self.ws_drop_after.pop(0) if self.ws_drop_after else None
        subs: set[str] = set()
        sent = 0
        while True:
            try:
                message = conn.recv(timeout=0.02)
            except TimeoutError:
                message = None
            except ConnectionClosed:
                return
            if message is not None:
                op = json.loads(message).get("op")
                self.ws_received.append({"op": op, "at": time.monotonic()})
                if op == "ping":
                    conn.send('{"op":"pong"}')
                elif op in ("unconfirmed_sub", "blocks_sub"):
                    subs.add(op)
            while True:
                with self._lock:
                    if self.ws_cursor >= len(self.ws_script):
                        break
                    msg = self.ws_script[self.ws_cursor]
                    needs = {"utx": "unconfirmed_sub", "block": "blocks_sub"}.get(msg["op"])
                    if needs is not None and needs not in subs:
                        break
                    if drop_after is not None and sent >= drop_after:
                        break
                    self.ws_cursor += 1
                conn.send(json.dumps(msg))
                sent += 1
            if drop_after is not None and sent >= drop_after:
                # Let what was sent reach the client, then cut TCP without a close frame: a real drop.
                time.sleep(0.2)
                conn.socket.shutdown(socket.SHUT_RDWR)
                return

    # --- REST --------------------------------------------------------------------------------------

    def _next_fault(self, endpoint: str) -> Fault | None:
        with self._lock:
            queue = self.faults.get(endpoint)
            return queue.popleft() if queue else None

    def respond(self, path: str) -> tuple[str, Fault | None, int, bytes]:
        """(endpoint, fault, status, body) for a GET of ``path``."""
        parts = urlsplit(path).path.strip("/").split("/")
        endpoint = {"unconfirmed-transactions": "unconfirmed"}.get(parts[0], parts[0])
        body: Any = None
        if endpoint == "unconfirmed":
            with self._lock:
                body = {"txs": list(self.unconfirmed_txs)}
        elif endpoint == "latestblock" and self.latest_hash is not None:
            b = self.blocks[self.latest_hash]
            body = {
                "hash": b["hash"],
                "time": b["time"],
                "block_index": b["block_index"],
                "height": b["height"],
                "txIndexes": [t["tx_index"] for t in b["tx"]],
            }
        elif endpoint == "rawblock" and len(parts) == 2:
            body = self.blocks.get(parts[1])
        elif endpoint == "rawtx" and len(parts) == 2:
            body = self.rawtx.get(parts[1])
        fault = self._next_fault(endpoint)
        if body is None:
            return endpoint, fault, 404, b'{"error":"not-found"}'
        return endpoint, fault, 200, json.dumps(body).encode()


def _handler_class(fake: FakeBlockchainCom) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in separate writes

        def do_GET(self) -> None:
            _, fault, status, body = fake.respond(self.path)
            content_type = "application/json"
            headers: dict[str, str] = {}
            if fault is not None and fault.kind == "drop":
                fake.requests.append((self.path, 0))
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if fault is not None and fault.kind in ("rate_limit", "status"):
                status, body = fault.status, b'{"error":"fault"}'
                if fault.retry_after is not None:
                    headers["Retry-After"] = fault.retry_after
            elif fault is not None and fault.kind == "html":
                content_type, body = "text/html; charset=utf-8", _HTML
            elif fault is not None and fault.kind == "truncated":
                body = body[: len(body) // 2]
            fake.requests.append((self.path, status))  # on arrival, so requests a client gave up on count
            if fault is not None and fault.kind == "delay":
                time.sleep(fault.seconds)
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client timed out and left: that was the point

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep pytest output clean; requests are recorded in fake.requests

    return Handler


def fake_settings(fake: FakeBlockchainCom, base: Settings | None = None, **overrides: Any) -> Settings:
    """Settings pointing at the fake, with waits shrunk so fault tests take milliseconds."""
    values: dict[str, Any] = {
        "blockchain_base_url": fake.base_url,
        "blockchain_ws_url": fake.ws_url,
        "poll_interval_s": 0.05,
        "http_timeout_s": 2.0,
        "retry_max_attempts": 4,
        "retry_base_s": 0.005,
        "retry_max_wait_s": 0.05,
        "ws_ping_interval_s": 5.0,
        "ws_reconnect_base_s": 0.02,
        "ws_reconnect_max_s": 0.1,
        "ws_fallback_after_s": 60.0,
        "producer_metrics_port": 0,
        **overrides,
    }
    return (base or Settings()).model_copy(update=values)


@pytest.fixture
def fake_blockchain() -> Iterator[FakeBlockchainCom]:
    with FakeBlockchainCom() as fake:
        yield fake
