"""EWMA anomalies of the 1-minute window aggregates (``tx_stats_1m``) → ``window_anomalies`` rows.

For each metric, windows are taken in time order and each is compared with the exponentially weighted
mean and standard deviation of the windows *before* it (so a burst cannot hide itself)::

    alpha = 2 / (span + 1)
    z_t = (x_t - m_{t-1}) / s_{t-1},     s = max(sqrt(v), 5 % of |m|, 1)
    m_t = m_{t-1} + alpha * (y_t - m_{t-1})
    v_t = (1 - alpha) * (v_{t-1} + alpha * (y_t - m_{t-1})^2)

where ``y_t`` is ``x_t`` clipped to ``m_{t-1} ± threshold * s_{t-1}``: a flagged window moves the
baseline only as far as the threshold, so one spike does not inflate the deviation and mask the next.
A window is flagged when ``|z| > threshold`` after ``min_windows`` windows of history. The floor on
``s`` keeps a perfectly steady metric (e.g. zero fan-in transactions per minute) from turning the first
change of one unit into an infinite z.

Volume and fee rate are heavy-tailed, so they are compared on ``log1p``; counts on their own scale.
``value`` is the window's own value, ``expected`` the EW mean on the original scale, ``z`` the score on
the compared scale. Missing minutes (no row: nothing arrived) count as windows with zero transactions
for ``tx_count`` and are skipped for the other metrics.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pandas as pd

from btc_anomaly.processing.tables import window_anomalies_schema


@dataclass(frozen=True, slots=True)
class Metric:
    name: str  # the window_anomalies.metric value
    column: str  # the tx_stats_1m column
    log: bool
    label: str


METRICS: tuple[Metric, ...] = (
    Metric("tx_count", "tx_count", False, "transactions per minute"),
    Metric("volume", "total_value", True, "value moved (sat)"),
    Metric("median_fee_rate", "fee_rate_p50", True, "median fee rate (sat/vB)"),
    Metric("fan_in_count", "fan_in_count", False, "transactions with >= 10 inputs"),
    Metric("fan_out_count", "fan_out_count", False, "transactions with >= 10 outputs"),
)
STATS_COLUMNS = ["window_start", "window_end", *dict.fromkeys(m.column for m in METRICS)]
REL_FLOOR = 0.05
ABS_FLOOR = 1.0


def ewma_z(values: np.ndarray, span: int, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z, expected, std) per value, each against the EW statistics of the values before it (module doc).

    NaN values are skipped (z NaN, state unchanged). The first value has no history: z NaN.
    """
    alpha = 2.0 / (span + 1.0)
    n = len(values)
    z = np.full(n, np.nan)
    expected = np.full(n, np.nan)
    std = np.full(n, np.nan)
    m = np.nan
    v = 0.0
    for i, x in enumerate(values.tolist()):
        if x != x:  # NaN: no observation in this window
            continue
        if m != m:
            m = x
            continue
        s = max(np.sqrt(v), REL_FLOOR * abs(m), ABS_FLOOR)
        z[i] = (x - m) / s
        expected[i] = m
        std[i] = s
        y = min(max(x, m - threshold * s), m + threshold * s)
        d = y - m
        m += alpha * d
        v = (1.0 - alpha) * (v + alpha * d * d)
    return z, expected, std


def _regular(stats: pd.DataFrame) -> pd.DataFrame:
    """One row per minute from the first to the last window (missing minutes: no transactions)."""
    stats = stats.sort_values("window_start").drop_duplicates("window_start", keep="last")
    if stats.empty:
        return stats
    start = pd.to_datetime(stats["window_start"], utc=True)
    full = pd.date_range(start.iloc[0], start.iloc[-1], freq="1min")
    out = stats.assign(window_start=start).set_index("window_start").reindex(full)
    out.index.name = "window_start"
    out = out.reset_index()
    out["window_end"] = out["window_start"] + pd.Timedelta(minutes=1)
    out["tx_count"] = out["tx_count"].fillna(0)
    return out


def detect_windows(
    stats: pd.DataFrame,
    *,
    span: int = 30,
    threshold: float = 3.0,
    min_windows: int = 10,
    final_before: dt.datetime | pd.Timestamp | None = None,
    detected_at: pd.Timestamp | None = None,
) -> pd.DataFrame:
    """Flagged (window, metric) rows of ``tx_stats_1m`` rows, with ``window_anomalies_schema()`` columns.

    ``final_before``: only windows starting before it are reported (the newest window is still filling).
    """
    detected_at = detected_at if detected_at is not None else pd.Timestamp.now(tz="UTC")
    frame = _regular(stats[[c for c in STATS_COLUMNS if c in stats.columns]])
    empty = window_anomalies_schema().empty_table().to_pandas()
    if len(frame) <= min_windows:
        return empty
    eligible = np.arange(len(frame)) >= min_windows
    if final_before is not None:
        eligible &= (frame["window_start"] < pd.Timestamp(final_before)).to_numpy()
    parts = []
    for metric in METRICS:
        raw = pd.to_numeric(frame[metric.column], errors="coerce").to_numpy(dtype=np.float64)
        compared = np.log1p(np.maximum(raw, 0.0)) if metric.log else raw
        z, expected, std = ewma_z(compared, span, threshold)
        flagged = eligible & (np.abs(np.nan_to_num(z)) > threshold)
        if not flagged.any():
            continue
        exp = expected[flagged]
        parts.append(
            pd.DataFrame(
                {
                    "window_start": frame["window_start"].to_numpy()[flagged],
                    "window_end": frame["window_end"].to_numpy()[flagged],
                    "metric": metric.name,
                    "value": raw[flagged],
                    "expected": np.expm1(exp) if metric.log else exp,
                    "std": std[flagged],
                    "z": z[flagged],
                    "threshold": threshold,
                    "detected_at": detected_at,
                }
            )
        )
    if not parts:
        return empty
    out = pd.concat(parts, ignore_index=True).sort_values(["window_start", "metric"], ignore_index=True)
    for c in ("window_start", "window_end", "detected_at"):
        out[c] = pd.to_datetime(out[c], utc=True)
    return out


def describe(row: dict[str, object]) -> str:
    """One line for an alert: which metric, how far from normal."""
    label = {m.name: m.label for m in METRICS}.get(str(row["metric"]), str(row["metric"]))
    start = pd.Timestamp(row["window_start"]).strftime("%Y-%m-%d %H:%M")
    return (
        f"window {start} UTC: {label} = {float(row['value']):,.4g}, expected {float(row['expected']):,.4g} "
        f"(z = {float(row['z']):+.1f}, threshold ±{float(row['threshold']):g})"
    )
