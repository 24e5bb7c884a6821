"""Plotly figures of the dashboard, as plain dicts.

Dicts skip plotly's per-property validation (``go.Figure`` costs tens of milliseconds per figure), and
Dash serialises them as they are. Every figure sets ``uirevision`` so a live refresh keeps the user's
zoom and hidden traces; it changes only with the filters that change what the axes mean.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from btc_anomaly.dashboard.data import Histogram, Scatter, Series

NORMAL = "#4c78a8"
ANOMALY = "#e45756"
BAND = "rgba(245, 133, 24, 0.18)"
EWMA = "#f58518"
MUTED = "#8c8c8c"
FONT = {"family": "Inter, system-ui, -apple-system, Segoe UI, sans-serif", "size": 12, "color": "#2b2b2b"}

Figure = dict[str, Any]
# Log-axis ticks of BTC amounts, in the units people say them in.
BTC_TICKS = [1e-8, 1e-6, 1e-4, 1e-2, 1.0, 100.0, 1e4]
BTC_LABELS = ["1 sat", "100 sat", "10k sat", "0.01", "1", "100", "10k"]


def _base(title: str, uirevision: str, **layout: Any) -> Figure:
    return {
        "data": [],
        "layout": {
            "title": {"text": title, "x": 0.01, "xanchor": "left", "font": {"size": 14}},
            "font": FONT,
            "margin": {"l": 60, "r": 20, "t": 40, "b": 45},
            "paper_bgcolor": "white",
            "plot_bgcolor": "white",
            "uirevision": uirevision,
            "legend": {"orientation": "h", "x": 1, "xanchor": "right", "y": 1.02, "yanchor": "bottom"},
            "hovermode": "closest",
            **layout,
        },
    }


def _axis(title: str = "", **kw: Any) -> dict[str, Any]:
    return {
        "title": {"text": title},
        "gridcolor": "#ececec",
        "zeroline": False,
        "showline": True,
        "linecolor": "#d0d0d0",
        **kw,
    }


def empty(title: str, message: str) -> Figure:
    """A figure that says why it is empty instead of showing blank axes."""
    fig = _base(title, "empty")
    fig["layout"]["xaxis"] = {"visible": False}
    fig["layout"]["yaxis"] = {"visible": False}
    fig["layout"]["annotations"] = [
        {
            "text": message,
            "xref": "paper",
            "yref": "paper",
            "x": 0.5,
            "y": 0.5,
            "showarrow": False,
            "font": {"size": 15, "color": MUTED},
        }
    ]
    return fig


def _times(us: np.ndarray) -> list[str]:
    return np.datetime_as_string(us.astype("datetime64[us]"), unit="s").tolist()


def _nan_to_none(a: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in a]


def timeseries(series: Series, uirevision: str) -> Figure:
    """Three stacked panels on one time axis: tx per minute, anomaly rate with its EWMA band, volume."""
    bucket = _bucket_label(series.bucket_s)
    fig = _base(f"Activity per {bucket} (UTC)", uirevision, height=520)
    x = _times(series.starts_us)
    rate = series.anomaly_rate * 100
    upper, lower, ewma = series.upper * 100, series.lower * 100, series.ewma * 100
    outside = np.flatnonzero(~np.isnan(rate) & ~np.isnan(upper) & (rate > upper))
    fig["data"] = [
        {
            "type": "scatter",
            "mode": "lines",
            "name": "tx / min",
            "x": x,
            "y": np.round(series.tx_per_min, 3).tolist(),
            "line": {"color": NORMAL, "width": 1.5},
            "yaxis": "y",
            "hovertemplate": "%{x}<br>%{y:,.1f} tx/min<extra></extra>",
        },
        {
            "type": "scatter",
            "mode": "lines",
            "name": "EWMA band",
            "x": x,
            "y": _nan_to_none(np.round(lower, 4)),
            "line": {"width": 0},
            "yaxis": "y2",
            "showlegend": False,
            "hoverinfo": "skip",
        },
        {
            "type": "scatter",
            "mode": "lines",
            "name": "expected ± band",
            "x": x,
            "y": _nan_to_none(np.round(upper, 4)),
            "line": {"width": 0},
            "fill": "tonexty",
            "fillcolor": BAND,
            "yaxis": "y2",
            "hoverinfo": "skip",
        },
        {
            "type": "scatter",
            "mode": "lines",
            "name": "EWMA",
            "x": x,
            "y": _nan_to_none(np.round(ewma, 4)),
            "line": {"color": EWMA, "width": 1, "dash": "dot"},
            "yaxis": "y2",
            "hovertemplate": "expected %{y:.2f}%<extra></extra>",
        },
        {
            "type": "scatter",
            "mode": "lines+markers" if len(x) <= 200 else "lines",
            "name": "anomaly rate",
            "x": x,
            "y": _nan_to_none(np.round(rate, 4)),
            "line": {"color": ANOMALY, "width": 1.2},
            "marker": {"size": 4},
            "connectgaps": False,
            "yaxis": "y2",
            "hovertemplate": "%{x}<br>%{y:.2f}% anomalous<extra></extra>",
        },
        {
            "type": "scatter",
            "mode": "markers",
            "name": "above band",
            "x": [x[i] for i in outside],
            "y": [float(rate[i]) for i in outside],
            "marker": {
                "color": ANOMALY,
                "size": 8,
                "symbol": "triangle-up",
                "line": {"width": 1, "color": "white"},
            },
            "yaxis": "y2",
            "hovertemplate": "%{x}<br>%{y:.2f}%: above the EWMA band<extra></extra>",
        },
        {
            "type": "bar",
            "name": "volume (BTC)",
            "x": x,
            "y": np.round(series.volume_btc, 8).tolist(),
            "marker": {"color": "#72b7b2"},
            "yaxis": "y3",
            "hovertemplate": "%{x}<br>%{y:,.4f} BTC<extra></extra>",
        },
    ]
    fig["layout"].update(
        {
            "xaxis": _axis("", anchor="y3", type="date"),
            "yaxis": _axis("tx / min", domain=[0.70, 1.0], rangemode="tozero"),
            "yaxis2": _axis("anomalous %", domain=[0.37, 0.64], rangemode="tozero"),
            "yaxis3": _axis("BTC", domain=[0.0, 0.30], rangemode="tozero"),
            "bargap": 0.05,
            "hovermode": "x unified",
        }
    )
    return fig


def _bucket_label(seconds: int) -> str:
    for size, name in ((365 * 86400, "year"), (30 * 86400, "30 days"), (7 * 86400, "week"), (86400, "day")):
        if seconds >= size and seconds % size == 0:
            n = seconds // size
            return name if n == 1 else f"{n} {name}s"
    if seconds >= 3600:
        return "hour" if seconds == 3600 else f"{seconds // 3600} hours"
    return "minute" if seconds == 60 else f"{seconds // 60} minutes"


def score_histogram(
    hist: Histogram, threshold: float | None, model_threshold: float | None, uirevision: str
) -> Figure:
    """Stacked counts (normal / anomalous) on a log scale, the threshold in force as a line."""
    fig = _base("Anomaly score distribution", uirevision, barmode="stack", bargap=0.02)
    centers = ((hist.edges[:-1] + hist.edges[1:]) / 2).round(5).tolist()
    width = float(hist.edges[1] - hist.edges[0])
    fig["data"] = [
        {
            "type": "bar",
            "name": "normal",
            "x": centers,
            "y": hist.normal.tolist(),
            "width": width,
            "marker": {"color": NORMAL},
            "hovertemplate": "score %{x:.3f}: %{y:,} normal<extra></extra>",
        },
        {
            "type": "bar",
            "name": "anomalous",
            "x": centers,
            "y": hist.anomalous.tolist(),
            "width": width,
            "marker": {"color": ANOMALY},
            "hovertemplate": "score %{x:.3f}: %{y:,} anomalous<extra></extra>",
        },
    ]
    shapes: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    cut = threshold if threshold is not None else model_threshold
    if cut is not None:
        label = f"threshold {cut:.3f}" + (" (model)" if threshold is None else "")
        shapes.append(_vline(cut, ANOMALY, "solid"))
        annotations.append(_vlabel(cut, label, ANOMALY))
    if threshold is not None and model_threshold is not None and abs(threshold - model_threshold) > 1e-9:
        shapes.append(_vline(model_threshold, MUTED, "dash"))
        annotations.append(_vlabel(model_threshold, f"model {model_threshold:.3f}", MUTED, y=0.88))
    fig["layout"].update(
        {
            "xaxis": _axis("anomaly score (higher = more anomalous)"),
            "yaxis": _axis("transactions", type="log", dtick=1),
            "shapes": shapes,
            "annotations": annotations,
        }
    )
    return fig


def _vline(x: float, color: str, dash: str) -> dict[str, Any]:
    return {
        "type": "line",
        "x0": x,
        "x1": x,
        "xref": "x",
        "y0": 0,
        "y1": 1,
        "yref": "paper",
        "line": {"color": color, "width": 2, "dash": dash},
    }


def _vlabel(x: float, text: str, color: str, y: float = 0.98) -> dict[str, Any]:
    return {
        "x": x,
        "xref": "x",
        "y": y,
        "yref": "paper",
        "text": text,
        "showarrow": False,
        "xanchor": "left",
        "xshift": 4,
        "font": {"color": color, "size": 11},
    }


def scatter(sample: Scatter, ts_us: np.ndarray, total: int, uirevision: str) -> Figure:
    """Value against fee rate on log axes; anomalies drawn last (on top) and larger.

    ``customdata`` is each point's (first_seen in µs, score): enough for the server to find the row when
    the point is clicked, at a third of the bytes of sending 5,000 hashes on every refresh.
    """
    shown = len(sample.idx)
    left_out = total - sample.plottable
    detail = f"{shown:,} of {sample.plottable:,} points shown"
    if sample.anomalies_total:
        detail += f" · anomalies {sample.anomalies_shown:,} of {sample.anomalies_total:,}"
    if left_out:
        detail += f" · {left_out:,} without a fee or value left out"
    fig = _base(f"Value vs fee rate<br><sup>{detail}</sup>", uirevision)
    fig["layout"]["margin"]["t"] = 58
    traces = []
    for flag, name, color, size, opacity in (
        (False, "normal", NORMAL, 4, 0.45),
        (True, "anomalous", ANOMALY, 7, 0.9),
    ):
        m = np.flatnonzero(sample.anomaly == flag)
        custom = np.column_stack([ts_us[m].astype(np.float64), np.round(sample.score[m], 6)])
        traces.append(
            {
                "type": "scatter",
                "mode": "markers",
                "name": name,
                "x": np.round(sample.value_btc[m], 8).tolist(),
                "y": np.round(sample.fee_rate[m], 3).tolist(),
                "customdata": [[int(a), b] for a, b in custom.tolist()],
                "marker": {"color": color, "size": size, "opacity": opacity, "line": {"width": 0}},
                "hovertemplate": "%{x:,.8f} BTC · %{y:,.1f} sat/vB<br>score %{customdata[1]:.4f}"
                "<br>click for details<extra>" + name + "</extra>",
            }
        )
    fig["data"] = traces
    fig["layout"].update(
        {
            "xaxis": _axis("output value (BTC, log)", type="log", tickvals=BTC_TICKS, ticktext=BTC_LABELS),
            "yaxis": _axis("fee rate (sat/vB, log)", type="log", dtick=1),
        }
    )
    return fig


def model_metrics(versions: list[dict[str, Any]]) -> Figure:
    """Training anomaly rate and threshold of each registered version (oldest left)."""
    rows = sorted(versions, key=lambda v: int(v["version"]))
    if not rows:
        return empty("Training metrics by version", "No registered versions yet")
    fig = _base("Training metrics by version", "model")
    x = [f"v{v['version']}" for v in rows]

    def values(key: str, scale: float = 1.0) -> list[float | None]:
        out: list[float | None] = []
        for v in rows:
            raw = v.get(key)
            try:
                out.append(float(raw) * scale if raw is not None else None)
            except (TypeError, ValueError):
                out.append(None)
        return out

    fig["data"] = [
        {
            "type": "bar",
            "name": "training anomaly rate %",
            "x": x,
            "y": values("anomaly_rate", 100.0),
            "marker": {"color": ANOMALY},
            "yaxis": "y",
        },
        {
            "type": "scatter",
            "mode": "lines+markers",
            "name": "threshold (full forest)",
            "x": x,
            "y": values("threshold_full"),
            "line": {"color": NORMAL},
            "yaxis": "y2",
        },
    ]
    fig["layout"].update(
        {
            "xaxis": _axis("version", type="category"),
            "yaxis": _axis("anomaly rate %", rangemode="tozero"),
            "yaxis2": _axis("threshold", overlaying="y", side="right", showgrid=False, rangemode="tozero"),
            "bargap": 0.6,
        }
    )
    fig["layout"]["margin"]["r"] = 70
    return fig
