"""The dashboard's queries: pure functions from a ``lake.Snapshot`` and the filters to plain numbers.

Everything here is NumPy on the snapshot's sorted columns: a time window is a slice found by binary
search, a minimum value a boolean mask, and the aggregates are ``bincount``/``histogram``/partial sorts,
so one refresh over a million rows stays in the tens of milliseconds. Nothing here touches Delta, Dash
or plotly, which keeps it unit-testable against pandas on the same rows.

Labels. ``threshold=None`` means "as scored": a row is an anomaly when ``anomaly_score > threshold`` of
the row (each forest has its own threshold). A number relabels every row with one cut on the stored
``anomaly_score``; nothing is re-scored.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from btc_anomaly.dashboard.lake import Snapshot, to_us
from btc_anomaly.detectors.risk import SEVERITIES, SEVERITY_BANDS, severity_of

Window = Literal["15m", "1h", "24h", "all", "custom"]
WINDOWS: dict[str, dt.timedelta | None] = {
    "15m": dt.timedelta(minutes=15),
    "1h": dt.timedelta(hours=1),
    "24h": dt.timedelta(hours=24),
    "all": None,
    "custom": None,
}
# Bucket widths of the time series, finest first; the first one giving at most max_bins buckets wins.
BUCKETS_S = (60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400, 30 * 86400, 365 * 86400)
SAT_PER_BTC = 100_000_000
US_PER_S = 1_000_000


@dataclass(frozen=True)
class Filters:
    window: str = "1h"
    start: dt.datetime | None = None  # custom range, inclusive
    end: dt.datetime | None = None  # custom range, exclusive
    threshold: float | None = None  # None = each row's model threshold
    min_value_btc: float = 0.0


def parse_time(text: str | None) -> dt.datetime | None:
    """A custom-range bound typed by a person: ISO 8601 date or date-time, UTC unless it says otherwise."""
    if text is None or not str(text).strip():
        return None
    ts = pd.Timestamp(str(text).strip())
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return ts.to_pydatetime()


def window_bounds(filters: Filters, now: dt.datetime) -> tuple[int | None, int | None]:
    """``[start, end)`` in microseconds for the filters; None = open. Preset windows end at ``now``."""
    span = WINDOWS.get(filters.window)
    if span is not None:
        end = to_us(now)
        return end - int(span.total_seconds() * US_PER_S), end
    if filters.window == "custom":
        start = to_us(filters.start) if filters.start else None
        end = to_us(filters.end) if filters.end else None
        return start, end
    return None, None


@dataclass
class Selection:
    """The rows of the snapshot that pass the filters (views when no value filter applies)."""

    snapshot: Snapshot
    positions: np.ndarray | slice  # sorted positions in the snapshot
    ts: np.ndarray
    score: np.ndarray
    value: np.ndarray
    fee_rate: np.ndarray
    key: np.ndarray
    risk: np.ndarray  # 0-100, NaN for rows scored before the detectors
    anomaly: np.ndarray
    start_us: int | None
    end_us: int | None
    threshold: float | None

    @property
    def n(self) -> int:
        return len(self.ts)

    def snapshot_positions(self, idx: np.ndarray) -> np.ndarray:
        """Snapshot positions of selection rows ``idx``."""
        if isinstance(self.positions, slice):
            return idx + (self.positions.start or 0)
        return self.positions[idx]


def select(snapshot: Snapshot, filters: Filters, now: dt.datetime) -> Selection:
    start, end = window_bounds(filters, now)
    window = snapshot.window(start, end)
    positions: np.ndarray | slice = window
    ts, score, thr = snapshot.ts[window], snapshot.score[window], snapshot.threshold[window]
    value, fee_rate, key = snapshot.value[window], snapshot.fee_rate[window], snapshot.key[window]
    risk = snapshot.risk[window]
    if filters.min_value_btc and filters.min_value_btc > 0:
        mask = value >= filters.min_value_btc * SAT_PER_BTC
        positions = np.flatnonzero(mask) + window.start
        ts, score, thr, value, fee_rate, key, risk = (
            a[mask] for a in (ts, score, thr, value, fee_rate, key, risk)
        )
    cut = thr if filters.threshold is None else filters.threshold
    return Selection(
        snapshot=snapshot,
        positions=positions,
        ts=ts,
        score=score,
        value=value,
        fee_rate=fee_rate,
        key=key,
        risk=risk,
        anomaly=score > cut,
        start_us=start,
        end_us=end,
        threshold=filters.threshold,
    )


# --- KPIs --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kpis:
    tx: int
    anomalies: int
    anomaly_rate: float | None  # share of tx, None without tx
    tx_per_min_window: float | None  # over the window (or the data's span for open windows)
    tx_per_min_recent: float  # over the trailing rate window before now
    freshness_s: float | None  # seconds since the newest scored_at; None = no data
    stale: bool
    table_rows: int
    cached_rows: int
    truncated: bool


def kpis(sel: Selection, now: dt.datetime, *, rate_window_s: float, stale_after_s: float) -> Kpis:
    snap = sel.snapshot
    n = sel.n
    anomalies = int(np.count_nonzero(sel.anomaly))
    start, end = sel.start_us, sel.end_us
    if n and (start is None or end is None):
        start = int(sel.ts[0]) if start is None else start
        end = int(sel.ts[-1]) + 1 if end is None else end
    minutes = (end - start) / (60 * US_PER_S) if n and start is not None and end is not None else 0.0
    now_us = to_us(now)
    recent = snap.window(now_us - int(rate_window_s * US_PER_S), now_us)
    freshness = None if snap.last_scored_us is None else max(0.0, (now_us - snap.last_scored_us) / US_PER_S)
    return Kpis(
        tx=n,
        anomalies=anomalies,
        anomaly_rate=anomalies / n if n else None,
        tx_per_min_window=n / minutes if minutes > 0 else None,
        tx_per_min_recent=(recent.stop - recent.start) / (rate_window_s / 60.0),
        freshness_s=freshness,
        stale=freshness is None or freshness > stale_after_s,
        table_rows=snap.table_rows,
        cached_rows=snap.rows,
        truncated=snap.truncated,
    )


# --- time series ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    bucket_s: int
    starts_us: np.ndarray  # bucket starts
    tx: np.ndarray  # rows per bucket
    tx_per_min: np.ndarray
    anomalies: np.ndarray
    anomaly_rate: np.ndarray  # NaN for empty buckets
    ewma: np.ndarray  # expected rate from the previous buckets
    upper: np.ndarray
    lower: np.ndarray
    volume_btc: np.ndarray

    @property
    def empty(self) -> bool:
        return len(self.starts_us) == 0


def bucket_width(start_us: int, end_us: int, max_bins: int) -> int:
    span_s = max(1, (end_us - start_us) / US_PER_S)
    for width in BUCKETS_S:
        if span_s / width <= max_bins:
            return width
    return int(np.ceil(span_s / max_bins / 86400) * 86400)


def timeseries(sel: Selection, *, max_bins: int, ewma_span: int, ewma_k: float) -> Series:
    """Per-bucket counts, anomaly rate with an EWMA band, and volume over the selection's window.

    Buckets are aligned to multiples of their width (stable across refreshes). Open windows span the
    selected rows. The last bucket of a window ending now is partial: its tx/min is divided by the
    part that has elapsed.
    """
    start, end = sel.start_us, sel.end_us
    if sel.n == 0 and (start is None or end is None):
        e = np.empty(0)
        return Series(60, np.empty(0, np.int64), e, e, e, e, e, e, e, e)
    start = int(sel.ts[0]) if start is None else start
    end = int(sel.ts[-1]) + 1 if end is None else end
    width = bucket_width(start, end, max_bins)
    w_us = width * US_PER_S
    origin = (start // w_us) * w_us
    nb = int((end - 1 - origin) // w_us) + 1
    idx = ((sel.ts - origin) // w_us).astype(np.int64)
    tx = np.bincount(idx, minlength=nb)[:nb].astype(np.float64)
    anomalies = np.bincount(idx[sel.anomaly], minlength=nb)[:nb].astype(np.float64)
    volume = np.bincount(idx, weights=sel.value, minlength=nb)[:nb] / SAT_PER_BTC
    starts = origin + np.arange(nb, dtype=np.int64) * w_us
    covered = np.clip(np.minimum(starts + w_us, end) - np.maximum(starts, start), 1, w_us) / US_PER_S
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = np.where(tx > 0, anomalies / tx, np.nan)
    ewma, upper, lower = ewma_band(rate, span=ewma_span, k=ewma_k)
    return Series(
        bucket_s=width,
        starts_us=starts,
        tx=tx,
        tx_per_min=tx / (covered / 60.0),
        anomalies=anomalies,
        anomaly_rate=rate,
        ewma=ewma,
        upper=upper,
        lower=lower,
        volume_btc=volume,
    )


def ewma_band(rate: np.ndarray, *, span: int, k: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EWMA mean and ``mean ± k·std`` of the rate, each bucket judged by the buckets before it (a spike
    must not widen its own band). Empty buckets (NaN) are skipped, not counted as zero."""
    s = pd.Series(rate)
    ew = s.ewm(span=max(span, 2), ignore_na=True, min_periods=1)
    mean = ew.mean().shift(1).to_numpy()
    std = ew.std().shift(1).fillna(0.0).to_numpy()
    return mean, mean + k * std, np.clip(mean - k * std, 0.0, None)


# --- score distribution -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Histogram:
    edges: np.ndarray
    normal: np.ndarray
    anomalous: np.ndarray


def score_histogram(sel: Selection, bins: int = 60) -> Histogram:
    if sel.n == 0:
        return Histogram(np.linspace(0, 1, bins + 1), np.zeros(bins), np.zeros(bins))
    lo, hi = float(sel.score.min()), float(sel.score.max())
    if hi - lo < 1e-9:
        lo, hi = lo - 0.005, hi + 0.005
    edges = np.linspace(lo, hi, bins + 1)
    # Equal-width bins: a bin index per row and bincount, several times faster than np.histogram.
    idx = np.minimum(((sel.score - lo) * (bins / (hi - lo))).astype(np.int64), bins - 1)
    total = np.bincount(idx, minlength=bins)[:bins]
    anomalous = np.bincount(idx[sel.anomaly], minlength=bins)[:bins]
    return Histogram(edges, (total - anomalous).astype(np.int64), anomalous.astype(np.int64))


# --- scatter down-sampling ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scatter:
    idx: np.ndarray  # selection rows shown, anomalies first
    anomaly: np.ndarray
    value_btc: np.ndarray
    fee_rate: np.ndarray
    score: np.ndarray
    plottable: int  # rows with value > 0 and a positive fee rate (log axes)
    anomalies_total: int  # plottable anomalies
    anomalies_shown: int


def scatter_sample(sel: Selection, *, max_points: int, max_anomalies: int) -> Scatter:
    """At most ``max_points`` rows for a log-log value/fee-rate scatter.

    Every plottable anomaly is kept up to ``max_anomalies`` (the highest scores when there are more);
    normals fill the remaining budget, chosen by the smallest hash-derived keys: deterministic, uniform,
    and a point shown now stays shown while new rows arrive unless the budget tightens.
    """
    plottable = (sel.value > 0) & (sel.fee_rate > 0)  # NaN fee rates compare False
    anom_idx = np.flatnonzero(plottable & sel.anomaly)
    norm_idx = np.flatnonzero(plottable & ~sel.anomaly)
    cap = min(max_anomalies, max_points)
    if len(anom_idx) > cap:
        top = np.argpartition(-sel.score[anom_idx], cap - 1)[:cap]
        anom_kept = np.sort(anom_idx[top])
    else:
        anom_kept = anom_idx
    budget = max_points - len(anom_kept)
    if len(norm_idx) > budget:
        if budget <= 0:
            norm_kept = norm_idx[:0]
        else:
            keys = sel.key[norm_idx]
            chosen = np.argpartition(keys, budget - 1)[:budget]
            norm_kept = np.sort(norm_idx[chosen])
    else:
        norm_kept = norm_idx
    idx = np.concatenate([anom_kept, norm_kept])
    return Scatter(
        idx=idx,
        anomaly=np.concatenate([np.ones(len(anom_kept), bool), np.zeros(len(norm_kept), bool)]),
        value_btc=sel.value[idx] / SAT_PER_BTC,
        fee_rate=sel.fee_rate[idx],
        score=sel.score[idx],
        plottable=int(np.count_nonzero(plottable)),
        anomalies_total=len(anom_idx),
        anomalies_shown=len(anom_kept),
    )


# --- top anomalies table ------------------------------------------------------------------------------------

SORTABLE = {"time": "ts", "value": "value", "fee_rate": "fee_rate", "score": "score", "risk": "risk"}


@dataclass(frozen=True)
class Page:
    rows: list[dict[str, Any]]
    total: int
    page: int
    page_count: int


def anomalies_page(
    sel: Selection,
    *,
    sort_by: str = "score",
    descending: bool = True,
    page: int = 0,
    page_size: int = 15,
    min_severity: str | None = None,
) -> Page:
    """One page of the selection's anomalies, sorted server-side.

    ``min_severity`` (medium, high, severe) lists the rows whose risk score reaches that band instead,
    whether the forest flagged them or not (a watchlist hit can be severe with an ordinary score).

    Only the rows up to the end of the requested page are ordered (``argpartition``, then a sort of
    that head), so deep lists cost O(n) rather than a full sort. Ties break by time then hash order for
    a stable paging. Missing fee rates sort last either way.
    """
    keep = sel.anomaly
    if min_severity in SEVERITIES[1:]:
        keep = np.nan_to_num(sel.risk, nan=-1.0) >= SEVERITY_BANDS[SEVERITIES.index(min_severity) - 1]
    anom = np.flatnonzero(keep)
    total = len(anom)
    page_count = max(1, -(-total // page_size))
    page = min(max(page, 0), page_count - 1)
    if total == 0:
        return Page([], 0, page, page_count)
    column = getattr(sel, SORTABLE.get(sort_by, "score"))[anom].astype(np.float64)
    keys = -column if descending else column.copy()
    keys[np.isnan(keys)] = np.inf
    need = min(total, (page + 1) * page_size)
    head = np.argpartition(keys, need - 1)[:need] if need < total else np.arange(total)
    head = head[np.lexsort((sel.ts[anom][head], keys[head]))]
    chosen = anom[head[page * page_size : need]]
    positions = sel.snapshot_positions(chosen)
    hashes = sel.snapshot.hashes(positions)
    reasons = sel.snapshot.reasons(positions)
    rows = [
        {
            "hash": h,
            "first_seen_us": int(sel.ts[i]),
            "value_btc": float(sel.value[i]) / SAT_PER_BTC,
            "fee_rate": None if np.isnan(sel.fee_rate[i]) else float(sel.fee_rate[i]),
            "score": float(sel.score[i]),
            "risk": None if np.isnan(sel.risk[i]) else float(sel.risk[i]),
            "severity": None if np.isnan(sel.risk[i]) else str(severity_of(sel.risk[i : i + 1])[0]),
            "reasons": list(r),
        }
        for h, i, r in zip(hashes, chosen, reasons, strict=True)
    ]
    return Page(rows, total, page, page_count)
