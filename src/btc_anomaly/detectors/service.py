"""``btc-anomaly detect``: the JVM-free detector service over the lake.

Every ``detect_poll_s`` seconds it reads the Delta tables with deltalake and

1. recomputes the EWMA window detector over ``detect_lookback`` of ``tx_stats_1m`` (cheap: one row per
   minute) and upserts flagged (window, metric) rows into ``window_anomalies``;
2. clusters the recent high fan-in/fan-out transactions of ``transactions`` into coordinated bursts and
   upserts them into ``coordinated_bursts`` (a burst that grew is updated in place);
3. reads the ``scored_transactions`` rows scored since its cursor at or above ``detect_alert_severity``.

Restart-safe: rows are keyed ((window_start, metric), burst_id) and only keys that are not in the table
yet are inserted, so a restart or a re-read window writes nothing twice; alerts go out only for keys
inserted by this poll, and for scored rows past the cursor, which is kept in
``<lake>/_detect/state.json`` after each poll (a crash between the write and the cursor update can
repeat the alerts of one poll, never lose them).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from btc_anomaly.config import Settings
from btc_anomaly.detectors import alerts
from btc_anomaly.detectors.bursts import READ_COLUMNS as BURST_COLUMNS
from btc_anomaly.detectors.bursts import detect_bursts
from btc_anomaly.detectors.risk import SEVERITIES, severity_rank
from btc_anomaly.detectors.windows import STATS_COLUMNS, detect_windows
from btc_anomaly.model.train import parse_duration
from btc_anomaly.processing import tables
from btc_anomaly.processing.delta_reader import read_table

log = logging.getLogger(__name__)

SCORED = "scored_transactions"
# Bursts are looked for in this much history before the newest transaction (several windows, so a burst
# that straddles two polls is seen whole).
BURST_LOOKBACK_WINDOWS = 10
FINAL_LAG_WINDOWS = 2  # the newest 1-minute windows not judged yet
SCORED_ALERT_COLUMNS = [
    "hash",
    "scored_at",
    "anomaly_score",
    "risk_score",
    "severity",
    "rule_hits",
    "watchlist_hits",
    "mahalanobis",
    "reasons",
    "model_version",
]


@dataclass
class PollResult:
    windows_flagged: int = 0
    windows_new: int = 0
    bursts_found: int = 0
    bursts_new: int = 0
    bursts_updated: int = 0
    risky_transactions: int = 0
    alerts: list[str] = field(default_factory=list)


def _ts(value: Any) -> pd.Timestamp:
    t = pd.Timestamp(value)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


def newest(path: Path, column: str) -> pd.Timestamp | None:
    """Largest value of a timestamp column from the Delta log's file statistics (no data read)."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        actions = pa.table(DeltaTable(str(path)).get_add_actions(flatten=True))
    except TableNotFoundError:
        return None
    name = f"max.{column}"
    if name not in actions.column_names or actions.num_rows == 0:
        return None
    values = [v for v in actions.column(name).to_pylist() if v is not None]
    return _ts(max(values)) if values else None


def upsert(
    path: Path, frame: pd.DataFrame, schema: pa.Schema, keys: list[str], compare: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Insert the rows of ``frame`` whose key is new and update those whose ``compare`` columns changed.

    Returns (inserted, updated). Nothing is written when nothing changed (no empty table versions).
    """
    from deltalake import DeltaTable, write_deltalake

    if frame.empty:
        return frame, frame
    source = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    if not DeltaTable.is_deltatable(str(path)):
        write_deltalake(str(path), source, mode="append")
        return frame, frame.iloc[0:0]
    existing = read_table(
        path, columns=keys + compare, filters=[(keys[-1], "in", sorted(set(frame[keys[-1]])))]
    )
    merged = frame.merge(existing, on=keys, how="left", suffixes=("", "__old"), indicator=True)
    new = (merged["_merge"] == "left_only").to_numpy()
    changed = np.zeros(len(merged), dtype=bool)
    for c in compare:
        changed |= (merged[c] != merged[f"{c}__old"]).to_numpy() & ~new
    write = new | changed
    if not write.any():
        return frame.iloc[0:0], frame.iloc[0:0]
    rows = merged.loc[write, schema.names]
    source = pa.Table.from_pandas(rows, schema=schema, preserve_index=False)
    predicate = " AND ".join(f"t.{k} = s.{k}" for k in keys)
    (
        DeltaTable(str(path))
        .merge(source, predicate, source_alias="s", target_alias="t")
        .when_matched_update_all()
        .when_not_matched_insert_all()
        .execute()
    )
    return merged.loc[new, schema.names], merged.loc[changed, schema.names]


def _same_units(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    # Delta reads give datetime64[us]; frames built in pandas may be [ns]: merge needs one dtype.
    frame = frame.copy()
    for k in keys:
        if isinstance(frame[k].dtype, pd.DatetimeTZDtype):
            frame[k] = frame[k].dt.tz_convert("UTC").astype("datetime64[us, UTC]")
    return frame


class DetectService:
    def __init__(self, settings: Settings, notifier: Any = None) -> None:
        self.settings = settings
        self.lake = settings.lake_dir
        self.state_path = self.lake / "_detect" / "state.json"
        if notifier is None:
            from btc_anomaly.monitoring.notifier import get_notifier

            notifier = get_notifier()
        self.notifier = notifier
        self._warned = False

    # --- state ---------------------------------------------------------------------------------------
    def _load_cursor(self) -> pd.Timestamp | None:
        try:
            return _ts(json.loads(self.state_path.read_text())["scored_at"])
        except (FileNotFoundError, KeyError, ValueError):
            return None

    def _save_cursor(self, cursor: pd.Timestamp) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"scored_at": cursor.isoformat()}))
        tmp.replace(self.state_path)

    # --- one poll ------------------------------------------------------------------------------------
    def poll(self, now: pd.Timestamp | None = None) -> PollResult:
        now = now if now is not None else pd.Timestamp.now(tz="UTC")
        result = PollResult()
        self._windows(now, result)
        self._bursts(now, result)
        self._risky(result)
        for text in result.alerts:
            self.notifier.notify_text(text, kind="alert")
        return result

    def _windows(self, now: pd.Timestamp, result: PollResult) -> None:
        s = self.settings
        path = self.lake / tables.STATS_1M
        end = newest(path, "window_start")
        if end is None:
            return
        since = end - parse_duration(s.detect_lookback)
        stats = read_table(path, columns=STATS_COLUMNS, since=since, time_column="window_start")
        flagged = detect_windows(
            stats,
            span=s.detect_ewma_span,
            threshold=s.detect_ewma_threshold,
            min_windows=s.detect_ewma_min_windows,
            # The newest windows are still filling (the stats query runs every stream_stats_trigger_s and
            # late rows update a window until the watermark): judging them now would flag every partial
            # minute as a drop in volume.
            final_before=end - pd.Timedelta(minutes=FINAL_LAG_WINDOWS - 1),
            detected_at=now,
        )
        result.windows_flagged = len(flagged)
        new, _ = upsert(
            self.lake / tables.WINDOW_ANOMALIES,
            flagged,
            tables.window_anomalies_schema(),
            ["window_start", "metric"],
            compare=[],
        )
        result.windows_new = len(new)
        for _, rows in new.groupby("window_start", sort=True):
            result.alerts.append(alerts.flagged_window(rows.to_dict("records")))

    def _bursts(self, now: pd.Timestamp, result: PollResult) -> None:
        s = self.settings
        path = self.lake / tables.TRANSACTIONS
        end = newest(path, "first_seen")
        if end is None:
            return
        since = end - pd.Timedelta(seconds=s.detect_burst_window_s * BURST_LOOKBACK_WINDOWS)
        txs = read_table(path, columns=BURST_COLUMNS, since=since)
        found = detect_bursts(
            txs, window_s=s.detect_burst_window_s, min_size=s.detect_burst_min_size, detected_at=now
        )
        result.bursts_found = len(found)
        new, updated = upsert(
            self.lake / tables.COORDINATED_BURSTS,
            found,
            tables.coordinated_bursts_schema(),
            ["burst_id"],
            compare=["size"],
        )
        result.bursts_new, result.bursts_updated = len(new), len(updated)
        for row in new.to_dict("records"):
            result.alerts.append(alerts.burst(row, s.dashboard_explorer_url))

    def _risky(self, result: PollResult) -> None:
        s = self.settings
        path = self.lake / SCORED
        cursor = self._load_cursor()
        if cursor is None:
            # First start: alert from now on, not for the whole history of the table.
            cursor = newest(path, "scored_at")
            if cursor is not None:
                self._save_cursor(cursor)
            return
        levels = list(SEVERITIES[severity_rank(s.detect_alert_severity) :])
        try:
            rows = read_table(
                path,
                columns=SCORED_ALERT_COLUMNS,
                filters=[("scored_at", ">", cursor.to_pydatetime()), ("severity", "in", levels)],
            )
        except Exception as exc:  # a table written before the risk columns existed
            if not self._warned:
                log.warning("cannot read risky transactions from %s (logged once): %s", path, exc)
                self._warned = True
            return
        top = newest(path, "scored_at")
        if not rows.empty:
            rows = rows.sort_values("scored_at").drop_duplicates("hash", keep="first")
            result.risky_transactions = len(rows)
            for row in rows.to_dict("records"):
                result.alerts.append(alerts.risky_transaction(row, s.dashboard_explorer_url))
            top = max(_ts(rows["scored_at"].max()), top or cursor)
        if top is not None and top > cursor:
            self._save_cursor(top)

    # --- loop ----------------------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        log.info("detect: polling %s every %.0f s", self.lake, self.settings.detect_poll_s)
        while not stop.is_set():
            started = time.monotonic()
            try:
                r = self.poll()
                if r.windows_new or r.bursts_new or r.bursts_updated or r.risky_transactions:
                    log.info(
                        "detect: %d new window anomalies, %d new / %d grown bursts, %d risky transactions",
                        r.windows_new,
                        r.bursts_new,
                        r.bursts_updated,
                        r.risky_transactions,
                    )
            except Exception:
                log.exception("detect: poll failed; retrying at the next one")
            stop.wait(max(0.0, self.settings.detect_poll_s - (time.monotonic() - started)))
