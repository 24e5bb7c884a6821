"""Serve one service's metrics on its own port.

``monitoring/metrics.py`` registers every service's metrics in one default registry, so a plain
``start_http_server`` would also export the other services' unlabelled gauges, at 0 (a trainer would
report ``btc_producer_last_publish_timestamp_seconds 0``). This serves only the families whose names
start with the given prefixes, plus the process/runtime collectors. Every service exposes its metrics
through here: ``serve_metrics`` for the ones with their own metrics port (producer ``btc_producer_``,
stream ``btc_stream_`` + ``btc_notifier_``, trainer ``btc_trainer_``, detect ``btc_detect_`` +
``btc_notifier_``), ``render`` for the ones that answer
/metrics on their own HTTP server (dashboard ``btc_dashboard_``; the API has its multiprocess-aware
variant in ``api/telemetry.py``, ``btc_api_`` + ``btc_notifier_``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
    start_http_server,
)

RUNTIME_PREFIXES = ("process_", "python_")


class PrefixFilter:
    """A collector that yields only the families of ``inner`` whose names start with ``prefixes``."""

    def __init__(self, inner: Any, prefixes: tuple[str, ...]) -> None:
        self.inner = inner
        self.prefixes = prefixes

    def collect(self) -> Iterable[Any]:
        for family in self.inner.collect():
            if family.name.startswith(self.prefixes):
                yield family


def filtered_registry(*prefixes: str, runtime: bool = True) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PrefixFilter(REGISTRY, prefixes + (RUNTIME_PREFIXES if runtime else ())))
    return registry


def serve_metrics(port: int, *prefixes: str, addr: str = "0.0.0.0") -> Any:
    """Start a daemon HTTP thread serving /metrics with only ``prefixes``; returns the server (or None
    when ``port`` is 0)."""
    if not port:
        return None
    server, _thread = start_http_server(port, addr=addr, registry=filtered_registry(*prefixes))
    return server


def render(*prefixes: str) -> tuple[bytes, str]:
    """(body, content type) of a /metrics answer with only ``prefixes`` (plus the runtime collectors)."""
    return generate_latest(filtered_registry(*prefixes)), CONTENT_TYPE_LATEST
