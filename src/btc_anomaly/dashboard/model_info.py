"""What the dashboard shows about the models: champion, versions, promotion history (MLflow registry).

The registry is polled by one background thread every ``Settings.dashboard_mlflow_refresh_s``; pages
only read the last ``ModelSnapshot``, so a slow or dead MLflow server never blocks a callback. The
MLflow client retries a dead server for a long time; while a poll has been in flight for longer than
``dashboard_mlflow_timeout_s`` the snapshot says so (``error``) and keeps the last good data.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from btc_anomaly.config import Settings

log = logging.getLogger(__name__)

VERSION_TAGS = (
    "train.rows",
    "train.rows_full",
    "train.window_start",
    "train.window_end",
    "train.anomaly_rate_full",
    "train.anomaly_rate_structural",
    "promotion.status",
    "promotion.reason",
    "promotion.decided_at",
)
# Benchmark headline numbers (model/evaluate.py): version tags since they exist, else the run's metrics.
BENCH_KEYS = (
    "bench.canonical.roc_auc",
    "bench.canonical.precision_at_50",
    "bench.summary.roc_auc",
    "bench.canonical.normal_flag_rate",
)
RUN_METRICS = (
    "anomaly_rate",
    "threshold_full",
    "threshold_structural",
    "score_p99_full",
    "total_seconds",
    *BENCH_KEYS,
)


@dataclass(frozen=True)
class ModelSnapshot:
    model_name: str
    champion: str | None = None  # version behind the champion alias
    champion_created: dt.datetime | None = None
    champion_promoted: dt.datetime | None = None
    versions: list[dict[str, Any]] = field(default_factory=list)  # newest first
    history: list[dict[str, Any]] = field(default_factory=list)  # promotion events, oldest first
    fetched_at: dt.datetime | None = None  # last successful poll
    error: str | None = None  # why the newest data is missing or old

    @property
    def ok(self) -> bool:
        return self.fetched_at is not None and self.error is None


def _ts(ms: int | None) -> dt.datetime | None:
    return None if not ms else dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


def _parse_iso(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _bench(tags: dict[str, str], metrics: dict[str, float]) -> dict[str, float | None]:
    """The benchmark headline of one version (``BENCH_KEYS``): its tag, else its run metric, else None."""
    out: dict[str, float | None] = {}
    for key in BENCH_KEYS:
        value: Any = tags.get(key, metrics.get(key))
        try:
            out[key] = float(value) if value is not None else None
        except (TypeError, ValueError):
            out[key] = None
    return out


def fetch(settings: Settings, run_metrics_cache: dict[str, dict[str, float]] | None = None) -> ModelSnapshot:
    """One synchronous poll of the registry (raises when MLflow is unreachable)."""
    from mlflow.exceptions import MlflowException

    from btc_anomaly.model.promotion import promotion_history
    from btc_anomaly.model.registry import CHAMPION, client, version_by_alias

    cache = run_metrics_cache if run_metrics_cache is not None else {}
    c = client(settings)
    try:
        versions = list(c.search_model_versions(f"name='{settings.model_name}'"))
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            versions = []
        else:
            raise
    versions.sort(key=lambda mv: int(mv.version), reverse=True)
    # Version search results do not carry aliases; the registered model has them all.
    aliases: dict[str, list[str]] = {}
    if versions:
        for alias, version in (c.get_registered_model(settings.model_name).aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
    champion = version_by_alias(settings, CHAMPION, c) if versions else None
    history = promotion_history(settings) if versions else []
    rows: list[dict[str, Any]] = []
    for mv in versions[: settings.dashboard_max_versions]:
        tags = dict(mv.tags or {})
        metrics = cache.get(mv.run_id or "")
        if metrics is None and mv.run_id:
            try:
                metrics = {k: v for k, v in c.get_run(mv.run_id).data.metrics.items() if k in RUN_METRICS}
            except MlflowException:
                metrics = {}
            # Metrics are logged once at the end of training: a complete set never changes again.
            if all(k in metrics for k in ("anomaly_rate", "threshold_full")):
                cache[mv.run_id] = metrics
        rows.append(
            {
                "version": str(mv.version),
                "aliases": sorted(aliases.get(str(mv.version), [])),
                "created": _ts(mv.creation_timestamp),
                "run_id": mv.run_id,
                **{k: tags.get(k) for k in VERSION_TAGS},
                **(metrics or {}),
                **_bench(tags, metrics or {}),
            }
        )
    promoted = None
    if champion is not None:
        events = [
            e
            for e in history
            if e.get("status") == "promoted" and str(e.get("version")) == str(champion.version)
        ]
        promoted = _parse_iso(events[-1].get("decided_at")) if events else None
    return ModelSnapshot(
        model_name=settings.model_name,
        champion=str(champion.version) if champion is not None else None,
        champion_created=_ts(champion.creation_timestamp) if champion is not None else None,
        champion_promoted=promoted,
        versions=rows,
        history=history,
        fetched_at=dt.datetime.now(dt.UTC),
    )


class ModelInfo:
    """The latest ``ModelSnapshot``, refreshed in the background; ``get()`` never waits on MLflow."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._snapshot = ModelSnapshot(model_name=settings.model_name, error="not polled yet")
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._in_flight_since: float | None = None
        self._metrics_cache: dict[str, dict[str, float]] = {}

    def get(self) -> ModelSnapshot:
        self._start()
        with self._lock:
            snap = self._snapshot
            since = self._in_flight_since
        if since is not None and time.monotonic() - since > self.settings.dashboard_mlflow_timeout_s:
            waited = time.monotonic() - since
            return replace(
                snap, error=f"MLflow at {self.settings.mlflow_tracking_uri} not answering ({waited:.0f} s)"
            )
        return snap

    def poll_now(self) -> ModelSnapshot:
        """Poll synchronously in the caller's thread (tests, the first page of a fresh process)."""
        self._poll()
        return self.get()

    def refresh_soon(self) -> None:
        self._start()
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _start(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="dashboard-mlflow", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poll()
            self._wake.wait(self.settings.dashboard_mlflow_refresh_s)
            self._wake.clear()

    def _poll(self) -> None:
        from btc_anomaly.monitoring.metrics import DASHBOARD_MLFLOW_UP

        with self._lock:
            self._in_flight_since = time.monotonic()
        try:
            snap = fetch(self.settings, self._metrics_cache)
            DASHBOARD_MLFLOW_UP.set(1)
        except ImportError:
            snap = replace(self._snapshot, error="mlflow is not installed (pip install 'btc-anomaly[model]')")
            DASHBOARD_MLFLOW_UP.set(0)
        except Exception as exc:  # any transport or server error: keep the last good data
            log.warning("MLflow poll failed: %s", exc)
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            snap = replace(
                self._snapshot,
                error=f"MLflow at {self.settings.mlflow_tracking_uri} unreachable: {first_line[:200]}",
            )
            DASHBOARD_MLFLOW_UP.set(0)
        with self._lock:
            self._snapshot = snap
            self._in_flight_since = None
