"""``create_app(settings)``: the Dash app of ``btc-anomaly dashboard`` (default :8050).

The Flask server under Dash also answers ``/metrics`` (Prometheus text format, the default registry
with the ``btc_dashboard_*`` metrics) and ``/healthz``.

Serving. ``serve()`` runs one gunicorn process with request threads (``dashboard_threads``): a single
process keeps one Delta cache and one MLflow poller for every browser, and the NumPy work of a
callback releases the GIL for most of its time. Without gunicorn it falls back to Werkzeug's threaded
server.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dash import Dash
from flask import Response

from btc_anomaly.config import Settings, get_settings
from btc_anomaly.dashboard import callbacks
from btc_anomaly.dashboard.data import Filters
from btc_anomaly.dashboard.layout import build_layout
from btc_anomaly.dashboard.views import DashboardState, now_utc

log = logging.getLogger(__name__)
ASSETS = Path(__file__).parent / "assets"


def create_app(settings: Settings | None = None, state: DashboardState | None = None) -> Dash:
    settings = settings or get_settings()
    state = state or DashboardState.from_settings(settings)
    app = Dash(
        __name__,
        title="btc-anomaly",
        assets_folder=str(ASSETS),
        update_title=None,  # no "Updating..." tab title flicker on every live refresh
        serve_locally=True,  # the analyst's network may not reach a CDN
    )

    def layout() -> Any:
        # A function: evaluated on every page load, so the threshold slider starts at the current
        # champion's threshold as found in the newest scored rows.
        filters = Filters(window=settings.dashboard_default_window)
        try:
            threshold = state.snapshot(filters, now_utc()).model_threshold()
        except Exception:  # the page must load even if the lake cannot be read; the banner says why
            log.exception("reading the lake for the page layout")
            threshold = None
        return build_layout(settings, threshold)

    app.layout = layout
    callbacks.register(app, state)
    _routes(app)
    _trusted_hosts(app, settings.allowed_host_list)
    app.dashboard_state = state  # type: ignore[attr-defined]
    return app


def _routes(app: Dash) -> None:
    from btc_anomaly.monitoring.exposition import render

    server = app.server

    @server.route("/metrics")
    def metrics() -> Response:
        body, content_type = render("btc_dashboard_")  # not the other services' series at 0
        return Response(body, mimetype=content_type)

    @server.route("/healthz")
    def healthz() -> Response:
        return Response("ok\n", mimetype="text/plain")


def _trusted_hosts(app: Dash, allowed: list[str]) -> None:
    """400 for a Host header outside ``allowed_hosts`` (DNS rebinding), like the API's TrustedHostMiddleware."""
    if not allowed or "*" in allowed:
        return
    from flask import request
    from werkzeug.sansio.utils import host_is_trusted

    @app.server.before_request
    def check_host() -> Response | None:
        if not host_is_trusted(request.headers.get("Host", ""), allowed):
            return Response("Invalid host header\n", status=400, mimetype="text/plain")
        return None


def serve(settings: Settings) -> None:
    """Run the dashboard in the foreground on ``dashboard_host:dashboard_port``."""
    bind = f"{settings.dashboard_host}:{settings.dashboard_port}"
    try:
        from gunicorn.app.base import BaseApplication
    except ImportError:
        log.warning("gunicorn not installed: serving with Werkzeug's threaded server")
        from werkzeug.serving import run_simple

        run_simple(
            settings.dashboard_host, settings.dashboard_port, create_app(settings).server, threaded=True
        )
        return

    class _Gunicorn(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in {
                "bind": bind,
                "workers": 1,
                "worker_class": "gthread",
                "threads": max(1, settings.dashboard_threads),
                "timeout": 120,
                "graceful_timeout": 10,
                "accesslog": None,
                "errorlog": "-",
                "loglevel": "info",
            }.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            # Build the app in the worker, after gunicorn's fork: delta-rs refuses to run in a process
            # forked from one that already opened a table ("Forked process detected").
            return create_app(settings).server

    log.info("dashboard on http://%s (metrics at /metrics)", bind)
    _Gunicorn().run()
