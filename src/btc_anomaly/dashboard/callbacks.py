"""Dash callbacks: thin wrappers that read component values, call ``views`` and time themselves.

Every callback is wrapped by ``instrumented``: its duration goes to
``btc_dashboard_callback_duration_seconds{callback}``, an exception to
``btc_dashboard_callback_errors{callback}`` and the log, and the page gets the callback's fallback
outputs (an error banner, empty figures) instead of a broken panel.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from dash import Dash, Input, Output, State, ctx, html, no_update
from dash.exceptions import PreventUpdate

from btc_anomaly.dashboard import figures
from btc_anomaly.dashboard.layout import ID
from btc_anomaly.dashboard.views import (
    DashboardState,
    detail_for_point,
    filters_from_inputs,
    now_utc,
    render_detail,
    render_model,
    render_overview,
    render_table,
)
from btc_anomaly.monitoring.metrics import DASHBOARD_CALLBACK_ERRORS, DASHBOARD_CALLBACK_LATENCY

log = logging.getLogger(__name__)

FILTER_INPUTS = [
    Input(ID.window, "value"),
    Input(ID.custom_start, "value"),
    Input(ID.custom_end, "value"),
    Input(ID.threshold, "value"),
    Input(ID.min_value, "value"),
]


def instrumented(
    name: str, fallback: Callable[[Exception], Any]
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            except PreventUpdate:
                raise
            except Exception as exc:
                DASHBOARD_CALLBACK_ERRORS.labels(callback=name).inc()
                log.exception("dashboard callback %s failed", name)
                return fallback(exc)
            finally:
                DASHBOARD_CALLBACK_LATENCY.labels(callback=name).observe(time.perf_counter() - started)

        return timed

    return wrap


def _error_banner(exc: Exception) -> html.Div:
    return html.Div(
        f"Could not read the lake: {type(exc).__name__}: {str(exc)[:300]}",
        className="banner error",
        id="banner-error",
    )


def register(app: Dash, state: DashboardState) -> None:
    @app.callback(
        Output(ID.page_overview, "style"),
        Output(ID.page_model, "style"),
        Output(ID.nav_overview, "className"),
        Output(ID.nav_model, "className"),
        Input(ID.url, "pathname"),
    )
    def route(pathname: str | None) -> tuple[Any, ...]:
        on_model = (pathname or "/").rstrip("/").endswith("/model")
        shown, hidden = {"display": "block"}, {"display": "none"}
        return (
            hidden if on_model else shown,
            shown if on_model else hidden,
            "nav" if on_model else "nav active",
            "nav active" if on_model else "nav",
        )

    @app.callback(Output(ID.custom_range, "style"), Input(ID.window, "value"))
    def toggle_custom(window: str | None) -> dict[str, str]:
        return {"display": "flex"} if window == "custom" else {"display": "none"}

    def overview_fallback(exc: Exception) -> tuple[Any, ...]:
        broken = figures.empty("", "Data unavailable: see the banner")
        return ([], _error_banner(exc), broken, broken, broken, "", None, "error")

    @app.callback(
        Output(ID.kpis, "children"),
        Output(ID.banner, "children"),
        Output(ID.timeseries, "figure"),
        Output(ID.histogram, "figure"),
        Output(ID.scatter, "figure"),
        Output(ID.threshold_label, "children"),
        Output(ID.view_key, "data"),
        Output(ID.updated, "children"),
        Input(ID.tick, "n_intervals"),
        *FILTER_INPUTS,
        State(ID.model_threshold, "data"),
        State(ID.view_key, "data"),
        State(ID.url, "pathname"),
    )
    @instrumented("refresh_panels", overview_fallback)
    def refresh_panels(
        _tick: int | None,
        window: str | None,
        custom_start: str | None,
        custom_end: str | None,
        threshold: float | None,
        min_value: float | None,
        model_threshold: float | None,
        view_key: str | None,
        pathname: str | None,
    ) -> tuple[Any, ...]:
        if (pathname or "").rstrip("/").endswith("/model") and ctx.triggered_id == ID.tick:
            raise PreventUpdate  # the overview is hidden: do not spend the refresh on it
        filters, problem = filters_from_inputs(
            window, custom_start, custom_end, threshold, min_value, model_threshold
        )
        view = render_overview(
            state, filters, now_utc(), model_threshold=model_threshold, previous_key=view_key, problem=problem
        )
        unchanged = view.timeseries is None
        return (
            view.kpis,
            view.banner,
            no_update if unchanged else view.timeseries,
            no_update if unchanged else view.histogram,
            no_update if unchanged else view.scatter,
            view.threshold_label,
            view.view_key,
            view.updated,
        )

    def table_fallback(exc: Exception) -> tuple[Any, ...]:
        return [], 1, f"Table unavailable: {type(exc).__name__}: {str(exc)[:200]}"

    @app.callback(
        Output(ID.table, "data"),
        Output(ID.table, "page_count"),
        Output(ID.table_caption, "children"),
        Input(ID.tick, "n_intervals"),
        *FILTER_INPUTS,
        Input(ID.table, "page_current"),
        Input(ID.table, "sort_by"),
        Input(ID.severity, "value"),
        State(ID.model_threshold, "data"),
        State(ID.url, "pathname"),
    )
    @instrumented("table_page", table_fallback)
    def table_page(
        _tick: int | None,
        window: str | None,
        custom_start: str | None,
        custom_end: str | None,
        threshold: float | None,
        min_value: float | None,
        page_current: int | None,
        sort_by: list[dict[str, str]] | None,
        severity: str | None,
        model_threshold: float | None,
        pathname: str | None,
    ) -> tuple[Any, ...]:
        if (pathname or "").rstrip("/").endswith("/model") and ctx.triggered_id == ID.tick:
            raise PreventUpdate
        filters, _ = filters_from_inputs(
            window, custom_start, custom_end, threshold, min_value, model_threshold
        )
        view = render_table(
            state, filters, now_utc(), page=page_current or 0, sort_by=sort_by, min_severity=severity or None
        )
        return view.rows, view.page_count, view.caption

    def detail_fallback(exc: Exception) -> list[Any]:
        return [
            html.Div(
                f"Could not load the transaction: {type(exc).__name__}: {str(exc)[:300]}",
                className="banner error",
            )
        ]

    @app.callback(
        Output(ID.detail, "children"),
        Input(ID.table, "active_cell"),
        Input(ID.scatter, "clickData"),
        State(ID.table, "data"),
        prevent_initial_call=True,
    )
    @instrumented("detail", detail_fallback)
    def detail(
        active_cell: dict[str, Any] | None, click: dict[str, Any] | None, rows: list[dict[str, Any]] | None
    ) -> list[Any]:
        if ctx.triggered_id == ID.scatter and click and click.get("points"):
            custom = click["points"][0].get("customdata") or []
            if len(custom) < 2:
                raise PreventUpdate
            return detail_for_point(state, int(custom[0]), float(custom[1]))
        if not active_cell or not rows:
            raise PreventUpdate
        row_id = active_cell.get("row_id")
        row = next((r for r in rows if r.get("id") == row_id), None)
        if row is None and 0 <= active_cell.get("row", -1) < len(rows):
            row = rows[active_cell["row"]]
        if row is None:
            raise PreventUpdate
        return render_detail(state, row["hash"], row.get("first_seen_us"))

    @app.callback(
        Output(ID.threshold, "value"),
        Output(ID.model_threshold, "data"),
        Input(ID.threshold_reset, "n_clicks"),
        prevent_initial_call=True,
    )
    @instrumented("reset_threshold", lambda exc: (no_update, no_update))
    def reset_threshold(_clicks: int | None) -> tuple[Any, Any]:
        value = state.cache.snapshot.model_threshold()
        if value is None:
            raise PreventUpdate
        return value, value

    def model_fallback(exc: Exception) -> tuple[Any, ...]:
        return [], [], figures.empty("Training metrics by version", "unavailable"), [_error_banner(exc)]

    @app.callback(
        Output(ID.versions, "data"),
        Output(ID.history, "data"),
        Output(ID.model_metrics, "figure"),
        Output(ID.model_status, "children"),
        Input(ID.url, "pathname"),
        Input(ID.model_tick, "n_intervals"),
    )
    @instrumented("model_page", model_fallback)
    def model_page(pathname: str | None, _tick: int | None) -> tuple[Any, ...]:
        if not (pathname or "").rstrip("/").endswith("/model"):
            raise PreventUpdate
        if ctx.triggered_id == ID.url:
            state.models.refresh_soon()  # someone opened the page: fetch fresh data in the background
        view = render_model(state, now_utc())
        return view.versions, view.history, view.figure, view.status
