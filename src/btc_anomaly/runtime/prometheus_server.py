"""A Prometheus server (the Debian ``prometheus`` binary, 2.42 here) as a subprocess.

Used by `btc-anomaly prometheus` (foreground) and by the observability integration test (free port,
temporary TSDB, 1 s scrapes). ``--web.enable-lifecycle`` lets a caller reload rules with POST
``/-/reload`` after editing them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from btc_anomaly.runtime.process import ManagedProcess, http_probe


def find_binary(name: str = "prometheus") -> str | None:
    """The executable: an absolute path as given, else from PATH or /usr/bin (Debian)."""
    if os.path.isabs(name):
        return name if os.access(name, os.X_OK) else None
    return shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/local/bin")


@dataclass
class PrometheusServer(ManagedProcess):
    config_file: Path
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 9090
    binary: str = "prometheus"
    retention: str = "15d"
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    name = "prometheus"
    poll_interval_s = 0.2

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return self.url

    @property
    def log_path(self) -> Path:
        return self.data_dir / "prometheus.log"

    def command(self) -> list[str]:
        exe = find_binary(self.binary)
        if exe is None:
            raise FileNotFoundError(
                f"{self.binary!r} not found: install Debian's `prometheus` package (or set "
                "BTC_ANOMALY_PROMETHEUS_BINARY)"
            )
        return [
            exe,
            f"--config.file={self.config_file}",
            f"--storage.tsdb.path={self.data_dir / 'data'}",
            f"--storage.tsdb.retention.time={self.retention}",
            f"--web.listen-address={self.host}:{self.port}",
            "--web.enable-lifecycle",
        ]

    def cwd(self) -> Path:
        return self.data_dir

    def start(self, timeout_s: float = 60.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.spawn()
        self.wait_ready(timeout_s)

    def probe(self) -> None:
        http_probe(f"{self.url}/-/ready")

    # --- HTTP API -----------------------------------------------------------------------------------
    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>``; the ``data`` member, or RuntimeError with Prometheus' error text."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; the result list (a scalar result becomes one unlabelled sample)."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def reload(self) -> None:
        req = urllib.request.Request(f"{self.url}/-/reload", method="POST")
        with urllib.request.urlopen(req, timeout=30):
            pass
