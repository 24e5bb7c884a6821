"""The lifecycle shared by the local servers (Kafka broker, MLflow, Prometheus) run as subprocesses.

``ManagedProcess`` is a base class: a subclass says how to run itself (``command``, ``log_path``, the
working folder) and when it is ready (``probe``), and gets the rest: start in its own process group with
output appended to the log file, wait for readiness while watching for an early exit, stop with SIGTERM
then SIGKILL, hard kill, and use as a context manager. Stopping signals the process group, so servers that
fork workers (MLflow's gunicorn) go down whole and nothing outside the group is touched.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self


class NotReady(Exception):
    """A readiness probe's answer when the server is up but not ready yet."""


def http_probe(url: str, timeout_s: float = 2.0) -> None:
    """Ready when ``url`` answers 200; raises otherwise (connection errors included)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        if resp.status != 200:
            raise NotReady(f"HTTP {resp.status}")


def connected_clients(port: int) -> int:
    """TCP connections established to ``port`` on this host, seen from the accepting side (Linux'
    /proc/net/tcp and tcp6, readable without privileges; 0 where there is no /proc)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # fields: slot, local "ADDR:PORT" (hex), remote, state ("01" = ESTABLISHED), ...
            if len(fields) > 3 and fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


class ManagedProcess:
    """Subprocess lifecycle of a local server; subclasses define ``command``, ``log_path`` and ``probe``.

    Subclasses are dataclasses holding ``_proc`` (``field(default=None, init=False, repr=False)``)."""

    name: ClassVar[str] = "process"
    poll_interval_s: ClassVar[float] = 0.3  # between readiness probes
    stop_timeout_s: ClassVar[float] = 20.0  # SIGTERM grace before SIGKILL
    # How long a stop asked of the foreground server (`btc-anomaly kafka|mlflow`) waits for its clients
    # to disconnect first: 0 = none (see drain).
    drain_timeout_s: ClassVar[float] = 0.0
    # ... and until no client has been connected for this long: a client that is stopping may open a
    # connection for its last calls (a trainer marking its run stopped) a moment after the signal.
    drain_quiet_s: ClassVar[float] = 3.0
    _proc: subprocess.Popen[bytes] | None

    # --- what a subclass provides ------------------------------------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def log_path(self) -> Path:
        raise NotImplementedError

    @property
    def address(self) -> str:
        """Where the server listens, for messages."""
        raise NotImplementedError

    def probe(self) -> None:
        """Return when the server is ready; raise (any exception) when it is not yet."""
        raise NotImplementedError

    def cwd(self) -> Path | None:
        return None

    def environment(self) -> dict[str, str] | None:
        """The child's environment (None: this process' own)."""
        return None

    def client_port(self) -> int | None:
        """The port whose clients ``drain`` waits for (None: it waits for nobody)."""
        return None

    def exit_message(self, returncode: int) -> str:
        return f"{self.name} exited with {returncode}:\n{self.log_tail(2000)}"

    # --- lifecycle ---------------------------------------------------------------------------------
    def spawn(self) -> None:
        """Start ``command()`` in a new process group, stdout and stderr appended to ``log_path``."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:  # the child keeps its own copy of the descriptor
            self._proc = subprocess.Popen(
                self.command(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.cwd(),
                env=self.environment(),
            )

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(self.exit_message(self._proc.returncode))
            try:
                self.probe()
                return
            except NotReady as exc:
                last = str(exc)
            except Exception as exc:  # not up yet: any probe error means "try again"
                last = exc
            time.sleep(self.poll_interval_s)
        raise TimeoutError(f"{self.name} not ready on {self.address} after {timeout_s}s: {last}")

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGTERM to the process group, SIGKILL if it is still there after ``timeout_s``."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(self.stop_timeout_s if timeout_s is None else timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def drain(self, give_up: Callable[[], bool] = lambda: False) -> None:
        """Before a stop: wait until no client has been connected for ``drain_quiet_s``, for up to
        ``drain_timeout_s`` (or until ``give_up()``, e.g. a second Ctrl-C).

        honcho (`make demo`) signals every process of the stack at once: a broker or a registry that
        went at once would fail its clients' last work (the stream's running micro-batch, the
        producer's flush, a trainer's run) into retries, errors and a SIGKILL. Waiting lets them stop
        first; a client still there after ``drain_timeout_s`` does not hold the stop any longer."""
        port = self.client_port()
        if port is None or self.drain_timeout_s <= 0 or not self.running:
            return
        log = logging.getLogger(f"btc_anomaly.{self.name.split()[0]}")
        now = time.monotonic()
        deadline, quiet_since = now + self.drain_timeout_s, now
        clients = connected_clients(port)
        if clients:
            log.info(
                "%s stopping once its %d client connection(s) close (at most %.0f s)",
                self.name,
                clients,
                self.drain_timeout_s,
            )
        while time.monotonic() < deadline and not give_up() and self.running:
            if clients:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= self.drain_quiet_s:
                return
            time.sleep(0.25)
            clients = connected_clients(port)
        if clients:
            log.warning("%s stopping with %d client connection(s) still open", self.name, clients)

    def kill(self) -> None:
        """Hard stop (kill -9 of the process group), for fault tests."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait(self) -> int:
        """Block until the server exits (foreground use)."""
        return self._proc.wait() if self._proc is not None else 0

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    # --- context manager: started on entry (unless running), stopped on exit -------------------------
    def __enter__(self) -> Self:
        if not self.running:
            self.start()  # type: ignore[attr-defined]
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
