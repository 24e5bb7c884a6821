"""`btc-anomaly kafka|mlflow` stop after their clients (runtime/process.ManagedProcess.drain).

`make demo`'s Ctrl-C has honcho SIGTERM every process at once: a broker or registry that went at once
would fail the stream's running micro-batch, the producer's flush and a trainer's run. A real server
and a real TCP client here: the drain holds while the client is connected and ends when it leaves.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from btc_anomaly.runtime.kafka_broker import KafkaBroker, free_port
from btc_anomaly.runtime.mlflow_server import MlflowServer
from btc_anomaly.runtime.process import ClientWatch, ManagedProcess, connected_clients, http_probe


@dataclass
class _Server(ManagedProcess):
    """python -m http.server, drained like the broker and the registry."""

    folder: Path
    port: int = field(default_factory=free_port)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    name = "http server"
    poll_interval_s = 0.05
    stop_timeout_s = 5.0
    drain_timeout_s = 600.0  # longer than the test: only the client's leaving ends the drain
    drain_quiet_s = 0.0

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.folder / "server.log"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(self.port)]

    def start(self, timeout_s: float = 30.0) -> None:
        self.spawn()
        self.wait_ready(timeout_s)

    def probe(self) -> None:
        http_probe(f"{self.address}/")

    def client_port(self) -> int:
        return self.port


def _until(predicate: object, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_Server]:
    with _Server(tmp_path) as s:
        _until(lambda: connected_clients(s.port) == 0, "the readiness probe's connection to close")
        yield s


def test_drain_waits_for_the_clients_to_leave(server: _Server) -> None:
    client = socket.create_connection(("127.0.0.1", server.port))
    try:
        _until(lambda: connected_clients(server.port) == 1, "the client's connection")
        drained = threading.Event()
        waiter = threading.Thread(target=lambda: (server.drain(), drained.set()), daemon=True)
        waiter.start()
        assert not drained.wait(1.0), "drain returned while a client was still connected"
    finally:
        client.close()
    assert drained.wait(60), "drain did not return once the client had left"
    assert server.running  # drain only waits: the stop is the caller's


# A client that connects, leaves, and still runs: the stream between two champion checks.
_CLIENT = """
import socket, sys
conn = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print("connected", flush=True)
sys.stdin.readline()
conn.close()
print("left", flush=True)
sys.stdin.readline()
"""


def test_drain_waits_for_a_process_seen_connected_lately(server: _Server) -> None:
    client = subprocess.Popen(
        [sys.executable, "-c", _CLIENT, str(server.port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdin is not None and client.stdout is not None
    try:
        assert client.stdout.readline() == "connected\n"
        watch = ClientWatch(server.port, supervisor=os.getpid())  # the client is this test's child
        _until(lambda: watch.sample() or client.pid in watch.seen, "the client to be seen")
        client.stdin.write("\n")
        client.stdin.flush()
        assert client.stdout.readline() == "left\n"
        _until(lambda: connected_clients(server.port) == 0, "the client's connection to close")
        drained = threading.Event()
        waiter = threading.Thread(target=lambda: (server.drain(watch=watch), drained.set()), daemon=True)
        waiter.start()
        assert not drained.wait(1.0), "drain returned while a client process seen lately still ran"
        client.stdin.write("\n")
        client.stdin.flush()
        client.wait(30)
        assert drained.wait(60), "drain did not return once the client process had exited"
    finally:
        client.kill()
        client.wait()


def test_a_second_signal_ends_the_drain(server: _Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port)):
        _until(lambda: connected_clients(server.port) == 1, "the client's connection")
        server.drain(give_up=lambda: True)  # returns at once, the client still there
        assert connected_clients(server.port) == 1


def test_the_broker_and_the_registry_drain_their_own_port(tmp_path: Path) -> None:
    broker = KafkaBroker(data_dir=tmp_path / "k", jars_root=tmp_path, port=free_port())
    registry = MlflowServer(data_dir=tmp_path / "m", port=free_port())
    for proc in (broker, registry):
        assert proc.client_port() == proc.port and proc.drain_timeout_s > 0
    # MLflow's clients call now and then: it also waits for the processes it saw lately.
    assert broker.client_watch() is None
    assert registry.client_watch() is not None
