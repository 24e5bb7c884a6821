"""kafka-python's connection logs while a service waits for its broker to come up.

Every Procfile process starts at once, so the producer and ``btc-anomaly kafka``'s readiness probe try the
broker before it listens. kafka-python logs each refused attempt as ``ERROR kafka.net.manager: Connection
failed`` (plus ``Connection lost`` and ``Bootstrap ... not ready`` warnings): a healthy start-up looked
like a failure, and real errors drowned in it. Inside :func:`waiting_for_kafka` those records are dropped;
the caller says at INFO that it waits and why (the client's exception). Outside it, after the first
connection, kafka-python logs as usual, so a broker lost later is still an ERROR.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# The loggers kafka-python (3.x; 2.x names too) reports connection attempts and failures on. A logger's
# filter sees only records logged on that very logger, so each is named.
CONNECTION_LOGGERS = (
    "kafka.net.manager",
    "kafka.net.connection",
    "kafka.net.selector",
    "kafka.net.transport",
    "kafka.conn",
    "kafka.client_async",
    "kafka.cluster",
)


class _DropWhileWaiting(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


_lock = threading.Lock()
_depth = 0
_filter = _DropWhileWaiting()


@contextmanager
def waiting_for_kafka() -> Iterator[None]:
    """Drop kafka-python's connection logs while the block runs (re-entrant, thread-safe)."""
    global _depth
    with _lock:
        if _depth == 0:
            for name in CONNECTION_LOGGERS:
                logging.getLogger(name).addFilter(_filter)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for name in CONNECTION_LOGGERS:
                    logging.getLogger(name).removeFilter(_filter)
