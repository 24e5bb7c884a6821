"""The fee market a transaction is scored against, read the same way by the stream and the API.

The detector reads fee rates both absolutely and relative to the median fee rate of their time
(``features.relative_fee_rate``). At training each row's market is its own block's (or window's) median
(``features.market_fee_rates``); when scoring, it is the transaction-weighted median of the 1-minute
windows' median fee rates (``tx_stats_1m.fee_rate_p50``, written by the stream's aggregate query) over
``Settings.fee_market_window_s`` up to the newest window. Windows older than
``Settings.fee_market_max_age_s`` do not count; without any, ``FeeMarket()`` returns None and the
model's training-window reference (``ModelBundle.market_reference``) applies.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from btc_anomaly.config import Settings

log = logging.getLogger(__name__)

MIN_MARKET_TXS = 20  # fewer fee-paying transactions in the whole span: no market worth the name


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The value at which half the total weight lies on either side (NaN for no weight)."""
    ok = np.isfinite(values) & (weights > 0)
    values, weights = values[ok], weights[ok]
    if not len(values):
        return float("nan")
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, 0.5 * cum[-1])])


class FeeMarket:
    """``FeeMarket(settings)()`` → the current market median fee rate (sat/vB) or None; cached for
    ``fee_market_refresh_s`` seconds; a failed read keeps the last value and logs a warning.

    ``start()`` moves the reads to a daemon thread (the API: no Delta read on a request's path); without
    it the call that finds the cache stale reads the table (the stream: once a minute, per batch).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        from btc_anomaly.processing.tables import STATS_1M

        self.path = settings.lake_table(STATS_1M)
        self.window_s = settings.fee_market_window_s
        self.max_age_s = settings.fee_market_max_age_s
        self.refresh_s = settings.fee_market_refresh_s
        self._clock, self._wall = clock, wall
        self._lock = threading.Lock()
        self._value: float | None = None
        self._read_at: float | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def __call__(self) -> float | None:
        if self._thread is not None:
            return self._value
        with self._lock:
            if self._read_at is None or self._clock() - self._read_at >= self.refresh_s:
                self.refresh()
            return self._value

    def refresh(self) -> None:
        self._read_at = self._clock()
        try:
            self._value = self.read()
        except Exception as exc:  # a lake being written or compacted: keep the last market
            log.warning("cannot read the fee market from %s (%s); keeping %s", self.path, exc, self._value)

    def start(self) -> FeeMarket:
        """Refresh in a daemon thread from now on (idempotent)."""
        if self._thread is None:
            self.refresh()
            self._thread = threading.Thread(target=self._run, name="fee-market", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.refresh()

    def read(self) -> float | None:
        """The market from the table now (no cache)."""
        from btc_anomaly.processing.delta_reader import read_arrow

        since = self._wall() - dt.timedelta(seconds=self.max_age_s)
        table = read_arrow(
            self.path, ["window_start", "tx_count", "fee_rate_p50"], since=since, time_column="window_start"
        )
        if table.num_rows == 0:
            return None
        start = table.column("window_start").to_numpy(zero_copy_only=False).astype("datetime64[us]")
        newest = start.max()
        recent = start >= newest - np.timedelta64(int(self.window_s * 1e6), "us")
        counts = np.asarray(table.column("tx_count").to_numpy(zero_copy_only=False), dtype=np.float64)[recent]
        rates = np.asarray(table.column("fee_rate_p50").to_numpy(zero_copy_only=False), dtype=np.float64)[
            recent
        ]
        if np.nansum(counts[np.isfinite(rates)]) < MIN_MARKET_TXS:
            return None
        value = weighted_median(rates, counts)
        return value if np.isfinite(value) and value > 0 else None


_markets: dict[tuple[str, float, float, float], FeeMarket] = {}
_markets_lock = threading.Lock()


def fee_market(settings: Settings) -> FeeMarket:
    """One ``FeeMarket`` per lake and settings in this process (stream workers, API workers)."""
    key = (
        str(settings.lake_table("tx_stats_1m")),
        settings.fee_market_window_s,
        settings.fee_market_max_age_s,
        settings.fee_market_refresh_s,
    )
    with _markets_lock:
        market = _markets.get(key)
        if market is None:
            market = _markets[key] = FeeMarket(settings)
        return market
