"""Component tree of the dashboard: an overview page and a model page behind one ``dcc.Location``.

Both pages stay in the DOM and are shown or hidden by path, so the filters of the overview survive a
visit to the model page. Component ids live in ``ID`` so callbacks and browser tests share them.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from dash import dash_table, dcc, html

from btc_anomaly.config import Settings

ID = SimpleNamespace(
    url="url",
    tick="tick",
    model_tick="model-tick",
    model_threshold="model-threshold",
    view_key="view-key",
    nav_overview="nav-overview",
    nav_model="nav-model",
    updated="updated",
    banner="banner",
    page_overview="page-overview",
    page_model="page-model",
    kpis="kpis",
    window="window",
    custom_range="custom-range",
    custom_start="custom-start",
    custom_end="custom-end",
    threshold="threshold",
    threshold_reset="threshold-reset",
    threshold_label="threshold-label",
    min_value="min-value",
    timeseries="timeseries",
    histogram="histogram",
    scatter="scatter",
    table="anomalies",
    table_caption="table-caption",
    severity="severity-filter",
    detail="detail",
    model_status="model-status",
    versions="versions",
    history="history",
    model_metrics="model-metrics",
)

WINDOW_OPTIONS = [
    {"label": "15 min", "value": "15m"},
    {"label": "1 h", "value": "1h"},
    {"label": "24 h", "value": "24h"},
    {"label": "all", "value": "all"},
    {"label": "custom", "value": "custom"},
]
# anomaly_score = 1 - p (p: share of the training window at least as unusual); the model's threshold is
# 1 - contamination, 0.99 by default, so the slider spans "1 in 10" to "1 in 1,000".
THRESHOLD_MIN, THRESHOLD_MAX, THRESHOLD_STEP = 0.90, 0.999, 0.001
DEFAULT_THRESHOLD = 0.99  # slider position before any row was scored

TABLE_COLUMNS = [
    {"name": "time (UTC)", "id": "time"},
    {"name": "hash", "id": "hash_link", "presentation": "markdown"},
    {"name": "value (BTC)", "id": "value_btc", "type": "numeric"},
    {"name": "fee rate (sat/vB)", "id": "fee_rate", "type": "numeric"},
    {"name": "score", "id": "score", "type": "numeric"},
    {"name": "risk", "id": "risk", "type": "numeric"},
    {"name": "severity", "id": "severity"},
    {"name": "reasons", "id": "reasons_text"},
]
SEVERITY_OPTIONS = [
    {"label": "forest anomalies", "value": ""},
    {"label": "risk: medium or above", "value": "medium"},
    {"label": "risk: high or above", "value": "high"},
    {"label": "risk: severe", "value": "severe"},
]
VERSION_COLUMNS = [
    {"name": "version", "id": "version"},
    {"name": "aliases", "id": "aliases"},
    {"name": "registered (UTC)", "id": "created"},
    {"name": "rows", "id": "rows"},
    {"name": "window (UTC)", "id": "window"},
    {"name": "anomaly rate", "id": "anomaly_rate"},
    {"name": "threshold (full)", "id": "threshold_full"},
    {"name": "score p99 (full)", "id": "score_p99_full"},
    {"name": "bench ROC-AUC", "id": "bench_roc_auc"},
    {"name": "bench P@50", "id": "bench_precision_at_50"},
    {"name": "bench 8-field ROC-AUC", "id": "bench_summary_roc_auc"},
    {"name": "bench normal flags", "id": "bench_normal_flag_rate"},
    {"name": "gate", "id": "status"},
]
HISTORY_COLUMNS = [
    {"name": "decided (UTC)", "id": "decided_at"},
    {"name": "version", "id": "version"},
    {"name": "decision", "id": "status"},
    {"name": "by", "id": "decided_by"},
    {"name": "previous champion", "id": "previous_champion"},
    {"name": "reason", "id": "reason"},
]

_TABLE_STYLE: dict[str, Any] = {
    "style_table": {"overflowX": "auto"},
    "style_cell": {
        # DataTable's own stylesheet sets a monospace font on cells; "inherit" does not beat it.
        "fontFamily": "Inter, system-ui, -apple-system, Segoe UI, Roboto, sans-serif",
        "fontSize": "13px",
        "padding": "6px 8px",
        "textAlign": "left",
        "whiteSpace": "normal",
        "height": "auto",
        "border": "none",
        "borderBottom": "1px solid #eee",
    },
    "style_header": {"fontWeight": "600", "backgroundColor": "#fafafa", "borderBottom": "2px solid #ddd"},
}


def _graph(component_id: str, height: int) -> dcc.Graph:
    return dcc.Graph(
        id=component_id,
        config={"displaylogo": False, "responsive": True},
        style={"height": f"{height}px"},
    )


def overview_page(settings: Settings, model_threshold: float | None) -> html.Div:
    slider_value = model_threshold if model_threshold is not None else DEFAULT_THRESHOLD
    marks = {v: f"{v:g}" for v in (0.9, 0.95, 0.98, 0.99, 0.995, 0.999)}
    return html.Div(
        id=ID.page_overview,
        children=[
            html.Div(id=ID.kpis, className="kpis"),
            html.Div(
                className="card filters",
                children=[
                    html.Div(
                        className="filter",
                        children=[
                            html.Label("Time range", htmlFor=ID.window),
                            dcc.RadioItems(
                                id=ID.window,
                                options=WINDOW_OPTIONS,
                                value=settings.dashboard_default_window,
                                inline=True,
                                className="segmented",
                            ),
                            html.Div(
                                id=ID.custom_range,
                                className="custom-range",
                                style={"display": "none"},
                                children=[
                                    dcc.Input(
                                        id=ID.custom_start,
                                        type="text",
                                        placeholder="from, e.g. 2021-07-23 00:00",
                                        debounce=True,
                                    ),
                                    dcc.Input(
                                        id=ID.custom_end,
                                        type="text",
                                        placeholder="to (exclusive), UTC",
                                        debounce=True,
                                    ),
                                ],
                            ),
                        ],
                    ),
                    html.Div(
                        className="filter threshold",
                        children=[
                            html.Label(
                                ["Anomaly threshold ", html.Span(id=ID.threshold_label, className="muted")],
                                htmlFor=ID.threshold,
                            ),
                            html.Div(
                                className="slider-row",
                                children=[
                                    html.Div(
                                        dcc.Slider(
                                            id=ID.threshold,
                                            min=THRESHOLD_MIN,
                                            max=THRESHOLD_MAX,
                                            step=THRESHOLD_STEP,
                                            value=slider_value,
                                            marks=marks,
                                            updatemode="mouseup",
                                        ),
                                        className="slider",
                                    ),
                                    html.Button(
                                        "model",
                                        id=ID.threshold_reset,
                                        className="button",
                                        title="Back to the champion's own threshold",
                                    ),
                                ],
                            ),
                        ],
                    ),
                    html.Div(
                        className="filter",
                        children=[
                            html.Label("Minimum value (BTC)", htmlFor=ID.min_value),
                            dcc.Input(
                                id=ID.min_value,
                                type="number",
                                min=0,
                                step="any",
                                value=0,
                                debounce=True,
                                className="number",
                            ),
                        ],
                    ),
                ],
            ),
            html.Div(className="card", children=_graph(ID.timeseries, 520)),
            html.Div(
                className="grid-2",
                children=[
                    html.Div(className="card", children=_graph(ID.histogram, 380)),
                    html.Div(className="card", children=_graph(ID.scatter, 380)),
                ],
            ),
            html.Div(
                className="grid-table",
                children=[
                    html.Div(
                        className="card",
                        children=[
                            html.H3("Top anomalies"),
                            dcc.Dropdown(
                                id=ID.severity,
                                options=SEVERITY_OPTIONS,
                                value="",
                                clearable=False,
                                searchable=False,
                                className="severity-filter",
                            ),
                            html.Div(id=ID.table_caption, className="muted caption"),
                            dash_table.DataTable(
                                id=ID.table,
                                columns=TABLE_COLUMNS,
                                data=[],
                                page_action="custom",
                                page_current=0,
                                page_size=settings.dashboard_page_size,
                                page_count=1,
                                sort_action="custom",
                                sort_mode="single",
                                sort_by=[{"column_id": "score", "direction": "desc"}],
                                markdown_options={"link_target": "_blank"},
                                cell_selectable=True,
                                style_cell_conditional=[
                                    {"if": {"column_id": "reasons_text"}, "minWidth": "260px"},
                                    {"if": {"column_id": "hash_link"}, "fontFamily": "monospace"},
                                    {"if": {"column_id": "time"}, "whiteSpace": "nowrap"},
                                ],
                                style_data_conditional=[
                                    {
                                        "if": {"state": "active"},
                                        "backgroundColor": "#fdecea",
                                        "border": "none",
                                    },
                                    {
                                        "if": {
                                            "filter_query": '{severity} = "severe"',
                                            "column_id": "severity",
                                        },
                                        "color": "#b71c1c",
                                        "fontWeight": "bold",
                                    },
                                    {
                                        "if": {
                                            "filter_query": '{severity} = "high"',
                                            "column_id": "severity",
                                        },
                                        "color": "#e65100",
                                    },
                                ],
                                **_TABLE_STYLE,
                            ),
                        ],
                    ),
                    html.Div(
                        id=ID.detail,
                        className="card detail",
                        children=html.Div(
                            "Click a row of the table or a point of the scatter to see the transaction.",
                            className="muted",
                        ),
                    ),
                ],
            ),
        ],
    )


def model_page() -> html.Div:
    return html.Div(
        id=ID.page_model,
        style={"display": "none"},
        children=[
            html.Div(id=ID.model_status, className="card model-status"),
            html.Div(
                className="card",
                children=[
                    html.H3("Registered versions"),
                    dash_table.DataTable(
                        id=ID.versions,
                        columns=VERSION_COLUMNS,
                        data=[],
                        page_size=20,
                        style_data_conditional=[
                            {
                                "if": {"filter_query": '{aliases} contains "champion"'},
                                "backgroundColor": "#eef6ee",
                                "fontWeight": "600",
                            }
                        ],
                        **_TABLE_STYLE,
                    ),
                ],
            ),
            html.Div(className="card", children=_graph(ID.model_metrics, 320)),
            html.Div(
                className="card",
                children=[
                    html.H3("Promotion history"),
                    dash_table.DataTable(
                        id=ID.history,
                        columns=HISTORY_COLUMNS,
                        data=[],
                        page_size=20,
                        style_data_conditional=[
                            {"if": {"filter_query": '{status} = "refused"'}, "color": "#b23b3b"},
                        ],
                        **_TABLE_STYLE,
                    ),
                ],
            ),
        ],
    )


def build_layout(settings: Settings, model_threshold: float | None) -> html.Div:
    return html.Div(
        className="app",
        children=[
            dcc.Location(id=ID.url),
            dcc.Interval(id=ID.tick, interval=int(settings.dashboard_refresh_s * 1000)),
            # Re-reads the poller's in-memory snapshot only; the registry itself is polled at its own pace.
            dcc.Interval(id=ID.model_tick, interval=int(settings.dashboard_refresh_s * 1000)),
            dcc.Store(id=ID.model_threshold, data=model_threshold),
            dcc.Store(id=ID.view_key),
            html.Header(
                className="header",
                children=[
                    html.Div(
                        ["btc-anomaly", html.Span(" live transaction anomalies", className="muted")],
                        className="brand",
                    ),
                    html.Nav(
                        [
                            dcc.Link("Overview", href="/", id=ID.nav_overview, className="nav active"),
                            dcc.Link("Model", href="/model", id=ID.nav_model, className="nav"),
                        ]
                    ),
                    html.Div(id=ID.updated, className="muted updated"),
                ],
            ),
            html.Div(id=ID.banner),
            html.Main([overview_page(settings, model_threshold), model_page()]),
        ],
    )
