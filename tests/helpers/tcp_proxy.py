"""A TCP proxy a test can cut and restore: a real outage of a server (MLflow) for one client only.

The session's servers are shared by every test; a process pointed at the proxy sees the server go down
(new connections refused, open ones closed) while the other tests keep using it directly.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

from btc_anomaly.runtime.kafka_broker import free_port

_CHUNK = 1 << 16


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target_host``:``target_port`` while up."""

    def __init__(self, target_host: str, target_port: int, port: int | None = None) -> None:
        self.target = (target_host, target_port)
        self.port = port or free_port()
        self.connections = 0  # accepted since the start: a cut must have had clients to matter
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._accepting: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def is_up(self) -> bool:
        return self._listener is not None

    def start(self) -> TcpProxy:
        """Listen again on the same port (after ``cut``: the server is back)."""
        if self._listener is not None:
            return self
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.2)  # the accept loop notices a cut within this
        self._listener = listener
        self._accepting = threading.Thread(
            target=self._accept, args=(listener,), name=f"tcp-proxy-{self.port}", daemon=True
        )
        self._accepting.start()
        return self

    restore = start

    def cut(self) -> None:
        """The server is gone: the port refuses connections and every open connection is closed."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        if self._accepting is not None:
            self._accepting.join(5)
            self._accepting = None
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for s in sockets:
            _close(s)

    close = cut

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by cut()
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                if self._listener is not listener:  # cut while connecting
                    _close(client)
                    _close(upstream)
                    return
                self._sockets.update((client, upstream))
                self.connections += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(_CHUNK):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            # Either side gone: the connection is over in both directions.
            with self._lock:
                self._sockets.discard(src)
                self._sockets.discard(dst)
            _close(src)
            _close(dst)


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        s.close()


@contextlib.contextmanager
def proxy_to(url: str) -> Iterator[TcpProxy]:
    """A running proxy to the host and port of an ``http://host:port`` URL."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None, url
    with TcpProxy(parts.hostname, parts.port) as proxy:
        yield proxy
