"""A local MLflow tracking + registry server (sqlite backend, proxied local artifacts) as a subprocess.

Used by `btc-anomaly mlflow` (foreground) and by the test suite (one server per pytest session). State
lives in one folder: ``mlflow.db`` (runs, registry) and ``artifacts/`` (served through the server with
``--artifacts-destination``, so clients never need the folder's path: ``mlflow-artifacts:/`` URIs).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class MlflowServer:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 5000
    workers: int = 1
    allowed_hosts: str | None = None  # e.g. "mlflow:5000,localhost:5000" behind a container name
    cors_allowed_origins: str | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    def command(self) -> list[str]:
        db = (self.data_dir / "mlflow.db").resolve()
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--artifacts-destination",
            str((self.data_dir / "artifacts").resolve()),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
        ]
        if self.allowed_hosts:
            cmd += ["--allowed-hosts", self.allowed_hosts]
        if self.cors_allowed_origins:
            cmd += ["--cors-allowed-origins", self.cors_allowed_origins]
        return cmd

    def start(self, timeout_s: float = 120.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "artifacts").mkdir(exist_ok=True)
        out = self.log_path.open("ab")
        # Own process group: stop() signals the server and the workers it forks, nothing else.
        self._proc = subprocess.Popen(
            self.command(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.data_dir
        )
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float) -> None:
        """Ready means /health answers 200, which the server only does once the db is migrated."""
        deadline = time.monotonic() + timeout_s
        last: Exception | str | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
                raise RuntimeError(f"mlflow server exited with {self._proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}"
            except (urllib.error.URLError, OSError) as exc:
                last = exc
            time.sleep(0.3)
        raise TimeoutError(f"mlflow server not healthy on {self.url} after {timeout_s}s: {last}")

    def stop(self, timeout_s: float = 20.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait(self) -> int:
        """Block until the server exits (foreground use)."""
        return self._proc.wait() if self._proc is not None else 0
