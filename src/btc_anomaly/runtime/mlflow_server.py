"""A local MLflow tracking + registry server (sqlite backend, proxied local artifacts) as a subprocess.

Used by `btc-anomaly mlflow` (foreground) and by the test suite (one server per pytest session). State
lives in one folder: ``mlflow.db`` (runs, registry) and ``artifacts/`` (served through the server with
``--artifacts-destination``, so clients never need the folder's path: ``mlflow-artifacts:/`` URIs).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from btc_anomaly.runtime.process import ManagedProcess, http_probe

JOB_EXECUTION_ENV = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"


@dataclass
class MlflowServer(ManagedProcess):
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 5000
    workers: int = 1
    allowed_hosts: str | None = None  # e.g. "mlflow:5000,localhost:5000" behind a container name
    cors_allowed_origins: str | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    name = "mlflow server"
    drain_timeout_s = 90.0  # the stream's scoring batch and a trainer's run finish first
    # Its clients call now and then (the stream's champion checks, every model_reload_s by default).
    remember_clients_s = 300.0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return self.url

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

    def client_port(self) -> int:
        return self.port

    def cwd(self) -> Path:
        return self.data_dir

    def environment(self) -> dict[str, str]:
        # MLflow 3's server also starts a job runner and 7 huey worker processes (GenAI jobs, trace
        # rollups) unless told not to: ~250 MB and ~4 s of CPU each at start-up, for nothing we use.
        return {**os.environ, JOB_EXECUTION_ENV: os.environ.get(JOB_EXECUTION_ENV, "false")}

    def start(self, timeout_s: float = 120.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "artifacts").mkdir(exist_ok=True)
        self.spawn()
        self.wait_ready(timeout_s)

    def probe(self) -> None:
        """Ready means /health answers 200, which the server only does once the db is migrated."""
        http_probe(f"{self.url}/health")
