"""Prometheus for the API: request metrics middleware, prediction counters, /metrics exposition.

The metric objects are defined in ``btc_anomaly.monitoring.metrics`` (``# --- api``). With several uvicorn
workers, ``btc-anomaly api`` sets ``PROMETHEUS_MULTIPROC_DIR`` before anything imports prometheus-client,
so every worker writes its values to files there and ``/metrics`` (answered by whichever worker) merges
all of them. Without that variable (tests, an embedded app) the process's default registry is served.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from btc_anomaly.monitoring.exposition import RUNTIME_PREFIXES, PrefixFilter
from btc_anomaly.monitoring.metrics import API_LATENCY, API_PREDICTIONS, API_REQUESTS, API_SCORES

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
UNMATCHED = "<unmatched>"


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


# --- predictions -----------------------------------------------------------------------------------------


def record_predictions(score: np.ndarray, flags: np.ndarray, kinds: np.ndarray) -> None:
    """Counters and the score histogram for one scored batch, one metric update per label set."""
    for kind in ("full", "structural"):
        mask = kinds == kind
        if not mask.any():
            continue
        anomalies = int(np.count_nonzero(flags & mask))
        total = int(np.count_nonzero(mask))
        if anomalies:
            API_PREDICTIONS.labels(label="anomaly", model_kind=kind).inc(anomalies)
        if total - anomalies:
            API_PREDICTIONS.labels(label="normal", model_kind=kind).inc(total - anomalies)
        observe_many(API_SCORES.labels(model_kind=kind), score[mask])


def observe_many(child: Any, values: np.ndarray) -> None:
    """``Histogram.observe`` for a whole array: one increment per bucket instead of one call per value.

    In multiprocess mode every observe is a locked mmap write; 10,000 of them would cost more than
    scoring the batch. Uses the child's bucket/sum values (prometheus-client internals, stable since
    0.4); falls back to observing one by one if they are not there.
    """
    if not len(values):
        return
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for v in values.tolist():
            child.observe(v)
        return
    # _buckets[i] holds the values in (bounds[i-1], bounds[i]] (cumulated on exposition).
    index = np.searchsorted(np.asarray(bounds, dtype=np.float64), values, side="left")
    for i, count in enumerate(np.bincount(index, minlength=len(bounds)).tolist()):
        if count:
            buckets[i].inc(count)
    total.inc(float(values.sum()))


# --- request metrics ---------------------------------------------------------------------------------------


class MetricsMiddleware:
    """Count and time every HTTP request by method, route template and status (pure ASGI: cheap)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app dies before answering, uvicorn answers 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED
            method = scope.get("method", "GET")
            labels = {
                "method": method if method in _METHODS else "other",
                "route": template,
                "status": str(status),
            }
            API_REQUESTS.labels(**labels).inc()
            API_LATENCY.labels(**labels).observe(time.perf_counter() - started)


# --- exposition ----------------------------------------------------------------------------------------


# The API's own families plus the notifier's (it runs in the API process when anomalies are notified).
PREFIXES = ("btc_api_", "btc_notifier_")


def render_metrics() -> tuple[bytes, str]:
    """The Prometheus text exposition of the API (all workers' values in multiprocess mode)."""
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_dir():
        from prometheus_client import multiprocess

        source: Any = CollectorRegistry(auto_describe=False)
        multiprocess.MultiProcessCollector(source)
        registry.register(PrefixFilter(source, PREFIXES))
    else:
        registry.register(PrefixFilter(REGISTRY, PREFIXES + RUNTIME_PREFIXES))
    return generate_latest(registry), CONTENT_TYPE_LATEST
