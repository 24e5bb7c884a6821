"""What each callback renders, as plain functions of the dashboard state and the filter values.

``callbacks.py`` only wires these to Dash (and times them); the benchmark and the tests call them
directly. ``DashboardState`` is everything one dashboard process shares between requests: settings,
the scored-rows cache and the MLflow poller.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dash import html

from btc_anomaly.config import Settings
from btc_anomaly.dashboard import data, figures
from btc_anomaly.dashboard.lake import (
    ScoredCache,
    Snapshot,
    from_us,
    lookup_row,
    to_us,
)
from btc_anomaly.dashboard.model_info import ModelInfo, ModelSnapshot
from btc_anomaly.detectors.rules import RULES_BY_ID

SCORED_TABLE = "scored_transactions"
TRANSACTIONS_TABLE = "transactions"
NONE = "\u2013"  # an en dash for a value that is not known
DETAIL_MAX_IO = 50  # inputs/outputs listed in the detail panel; the rest are counted


@dataclass
class DashboardState:
    settings: Settings
    scored_path: Path
    transactions_path: Path
    cache: ScoredCache
    models: ModelInfo
    started: float = field(default_factory=lambda: dt.datetime.now(dt.UTC).timestamp())

    @classmethod
    def from_settings(cls, settings: Settings) -> DashboardState:
        scored = settings.dashboard_scored_table or settings.lake_table(SCORED_TABLE)
        return cls(
            settings=settings,
            scored_path=Path(scored),
            transactions_path=settings.lake_table(TRANSACTIONS_TABLE),
            cache=ScoredCache(scored, settings.dashboard_cache_max_rows),
            models=ModelInfo(settings),
        )

    def snapshot(self, filters: data.Filters, now: dt.datetime) -> Snapshot:
        start, _ = data.window_bounds(filters, now)
        return self.cache.ensure(start)


def filters_from_inputs(
    window: str | None,
    custom_start: str | None,
    custom_end: str | None,
    threshold: float | None,
    min_value: float | str | None,
    model_threshold: float | None,
) -> tuple[data.Filters, str | None]:
    """Filters from the raw component values, and a message for input that could not be used."""
    problem = None
    start = end = None
    if window == "custom":
        try:
            start = data.parse_time(custom_start)
            end = data.parse_time(custom_end)
        except (ValueError, TypeError):
            problem = "Custom range: use dates like 2021-07-23 or 2021-07-23 14:30 (UTC)."
    try:
        min_btc = max(0.0, float(min_value)) if min_value not in (None, "") else 0.0
    except (TypeError, ValueError):
        min_btc, problem = 0.0, "Minimum value must be a number of BTC."
    # The slider at the champion's own threshold means "as scored": per-forest thresholds.
    cut = (
        None
        if threshold is None or (model_threshold is not None and abs(threshold - model_threshold) < 1e-9)
        else float(threshold)
    )
    return (
        data.Filters(
            window=window if window in data.WINDOWS else "1h",
            start=start,
            end=end,
            threshold=cut,
            min_value_btc=min_btc,
        ),
        problem,
    )


# --- small formatting helpers --------------------------------------------------------------------------


def fmt_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def fmt_time(us: int) -> str:
    return from_us(us).strftime("%Y-%m-%d %H:%M:%S")


def fmt_btc(sat: float | int | None) -> str:
    return NONE if sat is None else f"{sat / data.SAT_PER_BTC:,.8f}"


def explorer_link(settings: Settings, tx_hash: str) -> str:
    return settings.dashboard_explorer_url.replace("{hash}", tx_hash)


def _kpi(label: str, value: str, sub: str = "", *, kpi_id: str, tone: str = "") -> html.Div:
    return html.Div(
        className=f"kpi {tone}".strip(),
        id=f"kpi-{kpi_id}",
        children=[
            html.Div(label, className="kpi-label"),
            html.Div(value, className="kpi-value"),
            html.Div(sub, className="kpi-sub"),
        ],
    )


# --- overview ---------------------------------------------------------------------------------------------


@dataclass
class Overview:
    kpis: list[Any]
    banner: Any
    timeseries: Any  # a figure dict, or None = unchanged since view_key
    histogram: Any
    scatter: Any
    threshold_label: str
    view_key: str
    updated: str


def waiting_message(state: DashboardState) -> str:
    return (
        f"Waiting for data: no scored transactions in {state.scored_path} yet. Start the pipeline "
        "(`btc-anomaly produce`, `btc-anomaly stream`); this page refreshes by itself."
    )


def _model_kpi(snap: ModelSnapshot, now: dt.datetime) -> html.Div:
    if snap.champion is None:
        sub = snap.error or "no champion in the registry yet"
        return _kpi("Champion model", NONE, sub, kpi_id="model", tone="warn" if snap.error else "")
    since = snap.champion_promoted or snap.champion_created
    age = f"age {fmt_duration((now - since).total_seconds())}" if since else ""
    sub = age + (f" · {snap.error}" if snap.error else "")
    return _kpi("Champion model", f"v{snap.champion}", sub, kpi_id="model", tone="warn" if snap.error else "")


def render_overview(
    state: DashboardState,
    filters: data.Filters,
    now: dt.datetime,
    *,
    model_threshold: float | None,
    previous_key: str | None = None,
    problem: str | None = None,
) -> Overview:
    """KPIs, banner and the three charts. Figures come back as None when ``previous_key`` says the
    browser already shows them (same table version, filters and time bucket)."""
    s = state.settings
    snap = state.snapshot(filters, now)
    model = state.models.get()
    sel = data.select(snap, filters, now)
    k = data.kpis(sel, now, rate_window_s=s.dashboard_rate_window_s, stale_after_s=s.dashboard_stale_after_s)

    cut = filters.threshold if filters.threshold is not None else (model_threshold or snap.model_threshold())
    threshold_label = (
        f"{cut:.4f} (model)" if filters.threshold is None and cut is not None else f"{cut:.4f}" if cut else ""
    )
    rate = NONE if k.anomaly_rate is None else f"{k.anomaly_rate:.2%} of {k.tx:,} tx"
    fresh_value = NONE if k.freshness_s is None else fmt_duration(k.freshness_s)
    fresh_sub = (
        "no scored rows yet"
        if k.freshness_s is None
        else (
            f"stale: nothing scored for over {fmt_duration(s.dashboard_stale_after_s)}"
            if k.stale
            else "since the last scored row"
        )
    )
    window_rate = "" if k.tx_per_min_window is None else f"window average {k.tx_per_min_window:,.1f}/min"
    kpis = [
        _kpi(
            "Transactions / min",
            f"{k.tx_per_min_recent:,.1f}",
            f"last {fmt_duration(s.dashboard_rate_window_s)}" + (f" · {window_rate}" if window_rate else ""),
            kpi_id="tx",
        ),
        _kpi(
            "Anomalies in window",
            f"{k.anomalies:,}",
            rate,
            kpi_id="anomalies",
            tone="alert" if k.anomalies else "",
        ),
        _model_kpi(model, now),
        _kpi(
            "Pipeline freshness",
            fresh_value,
            fresh_sub,
            kpi_id="freshness",
            tone="" if k.freshness_s is None else "alert" if k.stale else "ok",
        ),
    ]

    banners = []
    if snap.empty and snap.table_rows == 0:
        banners.append(html.Div(waiting_message(state), className="banner info", id="banner-waiting"))
    elif k.stale and k.freshness_s is not None:
        banners.append(
            html.Div(
                f"Pipeline looks stale: the newest scored row is {fmt_duration(k.freshness_s)} old "
                f"(warning after {fmt_duration(s.dashboard_stale_after_s)}). Check the stream and the producer.",
                className="banner warn",
                id="banner-stale",
            )
        )
    if snap.truncated:
        banners.append(
            html.Div(
                f"Showing the newest {snap.rows:,} of {snap.table_rows:,} scored rows "
                "(BTC_ANOMALY_DASHBOARD_CACHE_MAX_ROWS).",
                className="banner info",
            )
        )
    if problem:
        banners.append(html.Div(problem, className="banner warn"))

    now_us = to_us(now)
    relative = data.WINDOWS.get(filters.window) is not None
    bucket = (
        data.bucket_width(sel.start_us, sel.end_us, s.dashboard_max_bins) if relative and sel.start_us else 0
    )
    key = "|".join(
        map(
            str,
            (
                snap.version,
                snap.rows,
                len(snap.files),
                filters,
                model_threshold,
                now_us // (bucket * data.US_PER_S) if bucket else "",
            ),
        )
    )
    updated = f"updated {now.strftime('%H:%M:%S')} UTC · table v{snap.version if snap.version is not None else NONE}"
    if key == previous_key:
        return Overview(kpis, banners, None, None, None, threshold_label, key, updated)

    uirev = f"{filters.window}|{filters.start}|{filters.end}"
    if sel.n == 0:
        msg = "Waiting for data" if snap.empty else "No transactions in this time range"
        ts_fig = figures.empty("Activity", msg)
        hist_fig = figures.empty("Anomaly score distribution", msg)
        scatter_fig = figures.empty("Value vs fee rate", msg)
    else:
        series = data.timeseries(
            sel, max_bins=s.dashboard_max_bins, ewma_span=s.dashboard_ewma_span, ewma_k=s.dashboard_ewma_k
        )
        ts_fig = figures.timeseries(series, uirev)
        hist_fig = figures.score_histogram(
            data.score_histogram(sel), filters.threshold, model_threshold or snap.model_threshold(), uirev
        )
        sample = data.scatter_sample(
            sel, max_points=s.dashboard_max_points, max_anomalies=s.dashboard_max_anomaly_points
        )
        scatter_fig = figures.scatter(sample, sel.ts[sample.idx], sel.n, uirev)
    return Overview(kpis, banners, ts_fig, hist_fig, scatter_fig, threshold_label, key, updated)


# --- top anomalies table ---------------------------------------------------------------------------------

_SORT_COLUMNS = {
    "time": "time",
    "value_btc": "value",
    "fee_rate": "fee_rate",
    "score": "score",
    "risk": "risk",
}


def _reasons_cell(reasons: list[str]) -> str:
    """The top reason in full; the others are in the detail panel (a cell of three reasons is a page)."""
    if not reasons:
        return "(below the model's threshold: no explanation stored)"
    more = f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else ""
    return reasons[0] + more


@dataclass
class TableView:
    rows: list[dict[str, Any]]
    page_count: int
    caption: str


def render_table(
    state: DashboardState,
    filters: data.Filters,
    now: dt.datetime,
    *,
    page: int = 0,
    sort_by: list[dict[str, str]] | None = None,
    min_severity: str | None = None,
) -> TableView:
    s = state.settings
    snap = state.snapshot(filters, now)
    sel = data.select(snap, filters, now)
    column, descending = "score", True
    if sort_by:
        column = _SORT_COLUMNS.get(sort_by[0].get("column_id", ""), "score")
        descending = sort_by[0].get("direction", "desc") == "desc"
    result = data.anomalies_page(
        sel,
        sort_by=column,
        descending=descending,
        page=page or 0,
        page_size=s.dashboard_page_size,
        min_severity=min_severity,
    )
    rows = [
        {
            "id": r["hash"],
            "hash": r["hash"],
            "first_seen_us": r["first_seen_us"],
            "time": fmt_time(r["first_seen_us"]),
            "hash_link": f"[{r['hash'][:16]}…]({explorer_link(s, r['hash'])})",
            "value_btc": round(r["value_btc"], 8),
            "fee_rate": None if r["fee_rate"] is None else round(r["fee_rate"], 2),
            "score": round(r["score"], 4),
            "risk": None if r["risk"] is None else round(r["risk"], 1),
            "severity": r["severity"] or "",
            "reasons_text": _reasons_cell(r["reasons"]),
        }
        for r in result.rows
    ]
    what = f"transactions of severity {min_severity} or above" if min_severity else "anomalies"
    if result.total == 0:
        caption = f"No {what} in this range." if sel.n else "Waiting for data."
    else:
        caption = f"{result.total:,} {what} · page {result.page + 1} of {result.page_count}"
    return TableView(rows, result.page_count, caption)


# --- detail panel ----------------------------------------------------------------------------------------------


def _io_table(title: str, items: list[dict[str, Any]], total: int | None) -> html.Div:
    shown = items[:DETAIL_MAX_IO]
    rows = [
        html.Tr(
            [
                html.Td(i.get("address") or NONE, className="mono"),
                html.Td(fmt_btc(i.get("value")), className="num"),
                html.Td(i.get("script_type") or ""),
            ]
        )
        for i in shown
    ]
    more = (total or len(items)) - len(shown)
    return html.Div(
        className="io",
        children=[
            html.H4(f"{title} ({total if total is not None else len(items):,})"),
            html.Table(
                [
                    html.Thead(html.Tr([html.Th("address"), html.Th("BTC"), html.Th("type")])),
                    html.Tbody(rows),
                ],
                className="io-table",
            ),
            html.Div(f"… and {more:,} more", className="muted") if more > 0 else None,
        ],
    )


def _risk_hits(scored: dict[str, Any]) -> list[Any]:
    """The detectors' findings of a scored row: rules that fired and watchlisted addresses it touches."""
    items: list[Any] = []
    for rule_id in scored.get("rule_hits") or []:
        rule = RULES_BY_ID.get(rule_id)
        items.append(html.Li(f"rule {rule_id}: {rule.description if rule else ''}"))
    for hit in scored.get("watchlist_hits") or []:
        verb = "spends from" if hit.get("side") == "input" else "pays"
        label = f" ({hit['label']})" if hit.get("label") else ""
        items.append(html.Li(f"watchlist {hit['list']}: {verb} {hit['address']}, {hit['category']}{label}"))
    if not items:
        return []
    return [html.H4("Detectors"), html.Ul(items, className="reasons")]


def detail_for_point(state: DashboardState, first_seen_us: int, score: float) -> list[Any]:
    """The detail panel of a scatter point, which carries (first_seen, score) rather than its hash."""
    tx_hash = state.cache.snapshot.locate(first_seen_us, score)
    if tx_hash is None:
        return [html.Div("That point is no longer in the lake's cached rows.", className="muted")]
    return render_detail(state, tx_hash, first_seen_us)


def render_detail(state: DashboardState, tx_hash: str, first_seen_us: int | None) -> list[Any]:
    """The detail panel of one transaction: its score and explanation, and its inputs/outputs from the
    ``transactions`` table (read from the ``date`` partition of its first_seen only)."""
    s = state.settings
    scored = lookup_row(state.scored_path, tx_hash, first_seen_us)
    if first_seen_us is None and scored and scored.get("first_seen"):
        first_seen_us = to_us(scored["first_seen"])
    tx = lookup_row(state.transactions_path, tx_hash, first_seen_us)
    head = [
        html.H3("Transaction"),
        html.A(
            tx_hash,
            href=explorer_link(s, tx_hash),
            target="_blank",
            rel="noopener",
            className="mono hash",
            id="detail-hash",
        ),
    ]
    if scored is None and tx is None:
        return [
            *head,
            html.Div("Not found in the lake (compacted away or not scored yet).", className="muted"),
        ]
    facts: list[tuple[str, str]] = []
    src = {**(tx or {}), **(scored or {})}
    if first_seen_us is not None:
        facts.append(("first seen (UTC)", fmt_time(first_seen_us)))
    if scored is not None:
        flagged = scored["anomaly_score"] > scored["threshold"]
        facts += [
            (
                "score",
                f"{scored['anomaly_score']:.4f} vs threshold {scored['threshold']:.4f}"
                + (" · anomalous" if flagged else " · normal"),
            ),
            ("model", f"{scored['model_name']} v{scored['model_version']} ({scored['model_kind']} forest)"),
        ]
        if scored.get("risk_score") is not None:
            facts.append(("risk", f"{scored['risk_score']:.1f} / 100 · {scored.get('severity') or NONE}"))
    facts.append(("value", f"{fmt_btc(src.get('output_value'))} BTC"))
    if src.get("fee") is not None:
        facts.append(("fee", f"{src['fee']:,} sat"))
    if src.get("fee_rate") is not None:
        facts.append(("fee rate", f"{src['fee_rate']:,.2f} sat/vB"))
    elif src.get("fee") is not None and src.get("vsize"):
        facts.append(("fee rate", f"{src['fee'] / src['vsize']:,.2f} sat/vB"))
    if src.get("vsize") is not None:
        facts.append(("vsize", f"{src['vsize']:,} vB"))
    facts.append(("inputs / outputs", f"{src.get('input_count', NONE)} / {src.get('output_count', NONE)}"))
    height = src.get("block_height")
    facts.append(("block", f"{height:,}" if height is not None else "unconfirmed"))
    reasons = list((scored or {}).get("reasons") or [])
    explanation = (
        html.Ul([html.Li(r) for r in reasons], className="reasons")
        if reasons
        else html.Div(
            "No explanation stored: the model explains only the rows it flagged.", className="muted"
        )
    )
    body: list[Any] = [
        html.Dl([part for k, v in facts for part in (html.Dt(k), html.Dd(v))], className="facts"),
        html.H4("Why it was flagged" if reasons else "Explanation"),
        explanation,
        *_risk_hits(scored or {}),
    ]
    if tx is None:
        body.append(
            html.Div(
                f"Inputs and outputs unavailable: {tx_hash[:16]}… is not in {state.transactions_path}.",
                className="muted",
            )
        )
    else:
        body += [
            _io_table("Inputs", list(tx.get("inputs") or []), tx.get("input_count")),
            _io_table("Outputs", list(tx.get("outputs") or []), tx.get("output_count")),
        ]
    return [*head, *body]


# --- model page ---------------------------------------------------------------------------------------------


@dataclass
class ModelView:
    versions: list[dict[str, Any]]
    history: list[dict[str, Any]]
    figure: Any
    status: list[Any]


def _pct(value: Any) -> str:
    try:
        return f"{float(value):.2%}"
    except (TypeError, ValueError):
        return ""


def _num(value: Any, digits: int = 4) -> str:
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return ""


def _short_time(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    if isinstance(value, str) and value:
        return value.replace("T", " ")[:16]
    return ""


NO_BENCH = "\u2014"  # versions trained before the benchmark (or whose evaluation failed)


def render_model(state: DashboardState, now: dt.datetime) -> ModelView:
    snap = state.models.get()
    versions = [
        {
            "version": v["version"],
            "aliases": ", ".join(v.get("aliases") or []),
            "created": _short_time(v.get("created")),
            "rows": f"{int(float(v['train.rows'])):,}" if v.get("train.rows") else "",
            "window": f"{_short_time(v.get('train.window_start'))} → {_short_time(v.get('train.window_end'))}"
            if v.get("train.window_start")
            else "",
            "anomaly_rate": _pct(v.get("anomaly_rate")),
            "threshold_full": _num(v.get("threshold_full")),
            "score_p99_full": _num(v.get("score_p99_full")),
            "bench_roc_auc": _num(v.get("bench.canonical.roc_auc"), 3) or NO_BENCH,
            "bench_precision_at_50": _num(v.get("bench.canonical.precision_at_50"), 2) or NO_BENCH,
            "bench_summary_roc_auc": _num(v.get("bench.summary.roc_auc"), 3) or NO_BENCH,
            "bench_normal_flag_rate": _pct(v.get("bench.canonical.normal_flag_rate")) or NO_BENCH,
            "status": v.get("promotion.status") or "",
        }
        for v in snap.versions
    ]
    history = [
        {
            "decided_at": _short_time(e.get("decided_at")),
            "version": str(e.get("version", "")),
            "status": str(e.get("status", "")) + (" (forced)" if e.get("forced") else ""),
            "decided_by": e.get("decided_by", ""),
            "previous_champion": e.get("previous_champion") or "",
            "reason": e.get("reason", ""),
        }
        for e in reversed(snap.history)
    ]
    status: list[Any] = [html.H3(f"Model {snap.model_name}")]
    if snap.champion is not None:
        since = snap.champion_promoted or snap.champion_created
        status.append(
            html.Div(
                [
                    html.Span(f"Champion v{snap.champion}", className="pill ok", id="model-champion"),
                    html.Span(
                        f" promoted {fmt_duration((now - since).total_seconds())} ago" if since else "",
                        className="muted",
                    ),
                ]
            )
        )
    elif snap.fetched_at is not None:
        status.append(html.Div("No champion yet: train a model (`btc-anomaly train`).", className="muted"))
    if snap.error:
        status.append(html.Div(snap.error, className="banner warn", id="model-error"))
    if snap.fetched_at is not None:
        status.append(html.Div(f"registry read at {snap.fetched_at:%H:%M:%S} UTC", className="muted"))
    return ModelView(versions, history, figures.model_metrics(snap.versions), status)


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


__all__ = [
    "DashboardState",
    "Overview",
    "TableView",
    "detail_for_point",
    "filters_from_inputs",
    "now_utc",
    "render_detail",
    "render_model",
    "render_overview",
    "render_table",
]
