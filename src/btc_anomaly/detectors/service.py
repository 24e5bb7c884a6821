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

The three stages fail independently: a stage that raises is counted (``btc_detect_poll_failures_total``),
logged with its traceback the first time (then one line a minute while it keeps failing with the same
error) and retried at the next poll, while the other stages go on. ``btc_detect_last_success_timestamp_seconds``
moves only when every stage succeeded; the BtcDetectStalled alert and ``btc-anomaly detect --healthcheck``
(the compose healthcheck, monitoring/detect_health.py) read it.
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
from btc_anomaly.monitoring import metrics as m
from btc_anomaly.processing import tables
from btc_anomaly.processing.delta_reader import Filter, read_table
from btc_anomaly.processing.maintenance import vacuum_delta_rs

log = logging.getLogger(__name__)

SCORED = "scored_transactions"
# Bursts are looked for in this much history before the newest transaction (several windows, so a burst
# that straddles two polls is seen whole).
BURST_LOOKBACK_WINDOWS = 10
FINAL_LAG_WINDOWS = 2  # the newest 1-minute windows not judged yet
STAGES = m.DETECT_STAGES  # windows, bursts, risky: the order of a poll
REPEAT_LOG_S = 60.0  # a stage that keeps failing with the same error is logged again at most this often
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
    alert_kinds: list[str] = field(default_factory=list)  # window | burst | transaction, one per alert
    rows_read: dict[str, int] = field(default_factory=dict)  # by table
    failures: dict[str, BaseException] = field(default_factory=dict)  # by stage
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    def alert(self, kind: str, text: str) -> None:
        self.alerts.append(text)
        self.alert_kinds.append(kind)


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


def _columns(path: Path) -> set[str]:
    """Column names of a Delta table from its log (empty when there is no table)."""
    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(str(path)):
        return set()
    return set(pa.schema(DeltaTable(str(path)).schema().to_arrow()).names)


def upsert(
    path: Path, frame: pd.DataFrame, schema: pa.Schema, keys: list[str], compare: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Insert the rows of ``frame`` whose key is new and update those whose ``compare`` columns changed.

    Returns (inserted, updated). Nothing is written when nothing changed (no empty table versions).
    """
    from deltalake import DeltaTable, write_deltalake

    if frame.empty:
        return frame, frame
    frame = _same_units(frame, keys)
    source = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    if not DeltaTable.is_deltatable(str(path)):
        write_deltalake(str(path), source, mode="append")
        return frame, frame.iloc[0:0]
    # The stored rows of these keys only. The reader compares each filter in the table's own types, so
    # files the MERGE below wrote (string_view) read like the first append's (string).
    existing = _same_units(read_table(path, columns=keys + compare, filters=_key_filters(frame, keys)), keys)
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


def _key_filters(frame: pd.DataFrame, keys: list[str]) -> list[Filter]:
    """Reader filters selecting the stored rows that may share a key with ``frame``: the time range of a
    timestamp key, the set of values of any other key."""
    out: list[Filter] = []
    for k in keys:
        column = frame[k]
        if isinstance(column.dtype, pd.DatetimeTZDtype):
            out.append((k, ">=", column.min().to_pydatetime()))
            out.append((k, "<=", column.max().to_pydatetime()))
        else:
            out.append((k, "in", sorted(set(column.tolist()))))
    return out


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
        self._failing: dict[str, _Failing] = {}  # stage -> its current run of failures
        self._failed_polls = 0
        self._maintained = time.monotonic()  # detect's tables are compacted and vacuumed from here on

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
        """One pass of every stage; a stage that raises is in ``result.failures``, the others still run."""
        started = time.monotonic()
        now = now if now is not None else pd.Timestamp.now(tz="UTC")
        result = PollResult()
        steps = {"windows": self._windows, "bursts": self._bursts, "risky": self._risky}
        for stage in STAGES:
            try:
                steps[stage](now, result)
            except Exception as exc:
                result.failures[stage] = exc
                self._stage_failed(stage, exc)
            else:
                self._stage_ok(stage)
        for text in result.alerts:
            self.notifier.notify_text(text, kind="alert")
        result.duration_s = time.monotonic() - started
        self._export(result)
        return result

    def _stage_failed(self, stage: str, exc: BaseException) -> None:
        what = f"{type(exc).__name__}: {exc}"
        run = self._failing.get(stage)
        if run is None or run.what != what:
            self._failing[stage] = _Failing(what, 1, time.monotonic())
            log.error("detect: %s stage failed; retrying at the next poll", stage, exc_info=exc)
            return
        run.polls += 1
        if time.monotonic() - run.logged >= REPEAT_LOG_S:
            run.logged = time.monotonic()
            log.error("detect: %s stage still failing (%d polls in a row): %s", stage, run.polls, what)

    def _stage_ok(self, stage: str) -> None:
        run = self._failing.pop(stage, None)
        if run is not None:
            log.info("detect: %s stage recovered after %d failed polls", stage, run.polls)

    def _export(self, r: PollResult) -> None:
        m.DETECT_POLL_DURATION.observe(r.duration_s)
        for stage in r.failures:
            m.DETECT_POLL_FAILURES.labels(stage=stage).inc()
        if r.ok:
            self._failed_polls = 0
            m.DETECT_LAST_SUCCESS.set(time.time())
        else:
            self._failed_polls += 1
        m.DETECT_CONSECUTIVE_FAILURES.set(self._failed_polls)
        for table, n in r.rows_read.items():
            m.DETECT_ROWS_READ.labels(table=table).inc(n)
        m.DETECT_ROWS_WRITTEN.labels(table=tables.WINDOW_ANOMALIES, op="insert").inc(r.windows_new)
        m.DETECT_ROWS_WRITTEN.labels(table=tables.COORDINATED_BURSTS, op="insert").inc(r.bursts_new)
        m.DETECT_ROWS_WRITTEN.labels(table=tables.COORDINATED_BURSTS, op="update").inc(r.bursts_updated)
        for kind in r.alert_kinds:
            m.DETECT_ALERTS.labels(kind=kind).inc()

    def _windows(self, now: pd.Timestamp, result: PollResult) -> None:
        s = self.settings
        path = self.lake / tables.STATS_1M
        end = newest(path, "window_start")
        if end is None:
            return
        since = end - parse_duration(s.detect_lookback)
        stats = read_table(path, columns=STATS_COLUMNS, since=since, time_column="window_start")
        result.rows_read[tables.STATS_1M] = len(stats)
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
            result.alert("window", alerts.flagged_window(rows.to_dict("records")))

    def _bursts(self, now: pd.Timestamp, result: PollResult) -> None:
        s = self.settings
        path = self.lake / tables.TRANSACTIONS
        end = newest(path, "first_seen")
        if end is None:
            return
        since = end - pd.Timedelta(seconds=s.detect_burst_window_s * BURST_LOOKBACK_WINDOWS)
        txs = read_table(path, columns=BURST_COLUMNS, since=since)
        result.rows_read[tables.TRANSACTIONS] = len(txs)
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
            result.alert("burst", alerts.burst(row, s.dashboard_explorer_url))

    def _risky(self, now: pd.Timestamp, result: PollResult) -> None:
        s = self.settings
        path = self.lake / SCORED
        cursor = self._load_cursor()
        if cursor is None:
            # First start: alert from now on, not for the whole history of the table.
            cursor = newest(path, "scored_at")
            if cursor is not None:
                self._save_cursor(cursor)
            return
        columns = _columns(path)
        missing = [c for c in SCORED_ALERT_COLUMNS if c not in columns]
        if not columns:
            return
        if missing:  # a table written before the risk columns existed: nothing to alert on
            if not self._warned:
                log.warning(
                    "%s has no %s: no risky-transaction alerts (logged once)", path, ", ".join(missing)
                )
                self._warned = True
            return
        levels = list(SEVERITIES[severity_rank(s.detect_alert_severity) :])
        rows = read_table(
            path,
            columns=SCORED_ALERT_COLUMNS,
            filters=[("scored_at", ">", cursor.to_pydatetime()), ("severity", "in", levels)],
        )
        result.rows_read[SCORED] = len(rows)
        top = newest(path, "scored_at")
        if not rows.empty:
            rows = rows.sort_values("scored_at").drop_duplicates("hash", keep="first")
            result.risky_transactions = len(rows)
            for row in rows.to_dict("records"):
                result.alert("transaction", alerts.risky_transaction(row, s.dashboard_explorer_url))
            top = max(_ts(rows["scored_at"].max()), top or cursor)
        if top is not None and top > cursor:
            self._save_cursor(top)

    # --- loop ----------------------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        # The staleness clock starts with the loop: the alert and the healthcheck measure from here until
        # the first clean poll.
        m.DETECT_LAST_SUCCESS.set(time.time())
        log.info("detect: polling %s every %.0f s", self.lake, self.settings.detect_poll_s)
        while not stop.is_set():
            started = time.monotonic()
            try:
                r = self.poll()
            except Exception:  # not a stage (they are caught in poll): the bookkeeping itself
                self._failed_polls += 1
                m.DETECT_CONSECUTIVE_FAILURES.set(self._failed_polls)
                log.exception("detect: poll failed; retrying at the next one")
            else:
                if r.windows_new or r.bursts_new or r.bursts_updated or r.risky_transactions:
                    log.info(
                        "detect: %d new window anomalies, %d new / %d grown bursts, %d risky transactions",
                        r.windows_new,
                        r.bursts_new,
                        r.bursts_updated,
                        r.risky_transactions,
                    )
            self.maintain()
            stop.wait(max(0.0, self.settings.detect_poll_s - (time.monotonic() - started)))

    def maintain(self, force: bool = False) -> None:
        """Compact and VACUUM the tables detect writes (each upsert rewrites files) every
        ``lake_vacuum_every_s``; maintenance only: a failure is logged and retried at the next due time."""
        every = self.settings.lake_vacuum_every_s
        if not force and (every <= 0 or time.monotonic() - self._maintained < every):
            return
        self._maintained = time.monotonic()
        for name in tables.DETECT_TABLES:
            path = self.settings.lake_table(name)
            try:
                deleted = vacuum_delta_rs(str(path), self.settings.lake_vacuum_retention_h)
            except Exception:
                m.DETECT_MAINTENANCE_FAILURES.labels(table=name).inc()
                log.exception("detect: compaction + vacuum of %s failed; retried in %.0f s", name, every)
                continue
            if deleted is not None:
                log.info("detect: compacted and vacuumed %s (%d files deleted)", name, len(deleted))


@dataclass
class _Failing:
    what: str  # "ExceptionType: message" of the first failure of the run
    polls: int
    logged: float  # time.monotonic() of the last log line
