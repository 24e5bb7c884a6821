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
from dataclasses import dataclass, field
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


def _connections(port: int) -> tuple[int, set[str]]:
    """(TCP connections established to ``port`` on this host, the socket inodes of their connecting
    ends), from Linux' /proc/net/tcp and tcp6, readable without privileges; (0, {}) without /proc."""
    accepted, inodes = 0, set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            # slot, local "ADDR:PORT" (hex), remote, state ("01" = ESTABLISHED), ..., inode (10th)
            fields = line.split()
            if len(fields) < 10 or fields[3] != "01":
                continue
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                accepted += 1
            elif int(fields[2].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return accepted, inodes


def connected_clients(port: int) -> int:
    """TCP connections established to ``port`` on this host, seen from the accepting side."""
    return _connections(port)[0]


def client_pids(port: int) -> set[int]:
    """The processes on this host that hold a connection to ``port`` (found by their sockets' inodes
    under /proc/PID/fd; another user's processes are not readable, so not found)."""
    inodes = {f"socket:[{inode}]" for inode in _connections(port)[1]}
    pids: set[int] = set()
    if not inodes:
        return pids
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in inodes:
                    pids.add(int(entry.name))
                    break
            except OSError:
                continue
    return pids


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: state, ppid, pgrp, ... (empty when gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat[stat.rindex(")") + 2 :].split()


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    stat = _stat(pid)
    return bool(stat) and stat[0] != "Z"


def _descends_from(pid: int, ancestor: int) -> bool:
    for _ in range(64):
        stat = _stat(pid)
        if not stat or pid <= 1:
            return False
        pid = int(stat[1])
        if pid == ancestor:
            return True
    return False


@dataclass
class ClientWatch:
    """The processes seen connected to a server's port lately, sampled while it runs.

    A client that calls now and then (MLflow's: a few requests, then nothing for a minute; the server
    closes idle connections after seconds) has no connection open when a stop comes, yet may call
    again while it stops itself (the stream's scoring batch checking the champion)."""

    port: int
    remember_s: float = 300.0
    # A sample reads every process' descriptors (~20-100 ms): each few seconds is enough for clients
    # that keep a connection a few seconds (MLflow's server closes idle ones after 5 s) and come back.
    every_s: float = 5.0
    seen: dict[int, float] = field(default_factory=dict)
    # Only the stack's own processes count: those under the supervisor that started this one (the
    # grandparent: honcho runs each command from a child of its own), not e.g. a browser on the UI.
    supervisor: int = field(default_factory=lambda: int((_stat(os.getppid()) or ["", "1"])[1]))

    def sample(self) -> None:
        now = time.monotonic()
        ours = (
            pid
            for pid in client_pids(self.port)
            if pid != os.getpid() and self.supervisor > 1 and _descends_from(pid, self.supervisor)
        )
        self.seen.update(dict.fromkeys(ours, now))
        self.seen = {pid: t for pid, t in self.seen.items() if now - t <= self.remember_s}

    def remaining(self) -> set[int]:
        """The processes seen lately that still run."""
        return {pid for pid in self.seen if _alive(pid)}


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
    # ... and until the processes seen connected within this long have exited (0: connections only).
    remember_clients_s: ClassVar[float] = 0.0
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

    def drain(self, give_up: Callable[[], bool] = lambda: False, watch: ClientWatch | None = None) -> None:
        """Before a stop: wait until no client has been connected for ``drain_quiet_s`` and every
        process ``watch`` saw connected lately has exited, for up to ``drain_timeout_s`` (or until
        ``give_up()``, e.g. a second Ctrl-C).

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

        def waiting_for() -> tuple[int, set[int]]:
            return connected_clients(port), watch.remaining() if watch is not None else set()

        clients, processes = waiting_for()
        if clients or processes:
            log.info(
                "%s stopping once its clients are gone (%d connection(s), %d process(es) seen lately; at "
                "most %.0f s, a second signal stops it now)",
                self.name,
                clients,
                len(processes),
                self.drain_timeout_s,
            )
        while time.monotonic() < deadline and not give_up() and self.running:
            if clients or processes:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= self.drain_quiet_s:
                return
            time.sleep(0.25)
            clients, processes = waiting_for()
        if clients or processes:
            log.warning(
                "%s stopping with %d client connection(s) open, client processes %s still running",
                self.name,
                clients,
                sorted(processes),
            )

    def client_watch(self) -> ClientWatch | None:
        """A ``ClientWatch`` of ``client_port`` when this server remembers its clients (None if not)."""
        port = self.client_port()
        if port is None or self.remember_clients_s <= 0:
            return None
        return ClientWatch(port, self.remember_clients_s)

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
