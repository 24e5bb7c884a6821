"""runtime/process.py: the subprocess lifecycle the Kafka, MLflow and Prometheus wrappers share."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from btc_anomaly.runtime.kafka_broker import KafkaBroker, free_port
from btc_anomaly.runtime.mlflow_server import MlflowServer
from btc_anomaly.runtime.process import ManagedProcess, http_probe
from btc_anomaly.runtime.prometheus_server import PrometheusServer


@dataclass
class _HttpServer(ManagedProcess):
    """python -m http.server: a real server that takes a moment to listen."""

    folder: Path
    port: int = field(default_factory=free_port)
    args: tuple[str, ...] = ()
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    name = "http server"
    poll_interval_s = 0.05
    stop_timeout_s = 5.0

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.folder / "logs" / "server.log"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(self.port), *self.args]

    def cwd(self) -> Path:
        return self.folder

    def start(self, timeout_s: float = 30.0) -> None:
        self.spawn()
        self.wait_ready(timeout_s)

    def probe(self) -> None:
        http_probe(f"{self.address}/")


def test_start_ready_stop_in_its_own_process_group(tmp_path: Path) -> None:
    with _HttpServer(tmp_path) as server:
        assert server.running
        pid = server._proc.pid  # type: ignore[union-attr]
        assert os.getpgid(pid) == pid != os.getpgid(0)  # its own group: stop() signals nothing else
        http_probe(f"{server.address}/")
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert server.log_path.exists()  # output appended to the log file (folder created)


def test_early_exit_is_reported_with_the_log(tmp_path: Path) -> None:
    server = _HttpServer(tmp_path, args=("--no-such-option",))
    with pytest.raises(RuntimeError, match="http server exited with 2") as info:
        server.start()
    assert "no-such-option" in str(info.value)
    assert not server.running


def test_readiness_timeout_names_the_last_error(tmp_path: Path) -> None:
    class Never(_HttpServer):
        def probe(self) -> None:
            raise ConnectionRefusedError("still starting")

    server = Never(tmp_path)
    try:
        with pytest.raises(TimeoutError, match=r"not ready on .* still starting"):
            server.start(timeout_s=0.5)
    finally:
        server.stop()
    server.stop()  # twice is fine


def test_kill_and_wait(tmp_path: Path) -> None:
    server = _HttpServer(tmp_path)
    server.start()
    proc = server._proc
    server.kill()
    assert proc is not None and proc.returncode == -9
    assert server.wait() == 0 and not server.running  # nothing left to wait for


def test_the_three_servers_use_it(tmp_path: Path) -> None:
    for cls in (KafkaBroker, MlflowServer, PrometheusServer):
        assert issubclass(cls, ManagedProcess)
        for method in ("stop", "kill", "wait_ready", "spawn", "__enter__", "__exit__"):
            assert method not in vars(cls), f"{cls.__name__} re-implements {method}"
    assert MlflowServer(tmp_path).log_path == tmp_path / "server.log"
    assert KafkaBroker(tmp_path, tmp_path).log_path == tmp_path / "logs" / "stdout.log"
