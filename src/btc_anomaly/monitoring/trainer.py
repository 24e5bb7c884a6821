"""Trainer metrics (``btc_trainer_*``): what the last run did and what the champion is.

``btc-anomaly train --every 30m`` calls :func:`serve` once and wraps each run with :func:`scheduled`;
:func:`record_run` reads a finished ``TrainResult``. The champion gauges are re-read from the registry
after every run (success or failure), so a promotion made by hand with ``btc-anomaly promote`` shows up
at the next tick. Nothing here may fail a training run: registry errors only leave gauges unchanged.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Any

from btc_anomaly.config import Settings
from btc_anomaly.monitoring import metrics as m
from btc_anomaly.monitoring.exposition import serve_metrics

log = logging.getLogger(__name__)

KINDS = ("full", "structural")


def serve(settings: Settings) -> Any:
    """Serve ``btc_trainer_*`` on ``Settings.trainer_metrics_port`` (nothing when it is 0)."""
    server = serve_metrics(settings.trainer_metrics_port, "btc_trainer_")
    if server is not None:
        log.info("trainer metrics on :%d/metrics", settings.trainer_metrics_port)
    return server


def outcome(decision: Any) -> str:
    """One of ``metrics.TRAINER_OUTCOMES`` for a ``promotion.GateDecision`` (None: gate not run)."""
    if decision is None:
        return "skipped"
    if decision.promoted and not decision.checks:
        return "unchanged"  # the gate short-circuits when the version already is the champion
    if decision.promoted:
        return "forced" if decision.forced else "promoted"
    return "refused"


def record_run(result: Any) -> None:
    """Export a successful ``model.train.TrainResult``."""
    metrics = result.metrics
    m.TRAINER_ROWS.labels(model_kind="structural").set(metrics.get("rows", 0))
    m.TRAINER_ROWS.labels(model_kind="full").set(metrics.get("rows_full", 0))
    m.TRAINER_ANOMALY_RATE.labels(model_kind="all").set(metrics.get("anomaly_rate", float("nan")))
    for kind in KINDS:
        m.TRAINER_ANOMALY_RATE.labels(model_kind=kind).set(metrics.get(f"anomaly_rate_{kind}", float("nan")))
    if result.version is not None:
        m.TRAINER_MODEL_VERSION.set(float(result.version))
    m.TRAINER_LAST_DURATION.set(result.timings.get("total_seconds", float("nan")))
    decision = result.decision
    m.TRAINER_PROMOTIONS.labels(outcome=outcome(decision)).inc()
    if decision is not None and decision.checks:
        for check in decision.checks:
            m.TRAINER_GATE_CHECK.labels(check=check.name).set(1 if check.passed else 0)


def refresh_champion(settings: Settings) -> None:
    """Champion gauges from the registry; logs and keeps the old values when it cannot be read."""
    from btc_anomaly.model.registry import CHAMPION, version_by_alias

    try:
        mv = version_by_alias(settings, CHAMPION)
    except Exception as exc:  # registry down: the next run tries again
        log.warning("could not read the champion for metrics: %s", exc)
        return
    if mv is None:
        m.TRAINER_CHAMPION_VERSION.set(0)
        return
    tags = dict(mv.tags or {})
    m.TRAINER_CHAMPION_VERSION.set(float(mv.version))
    if mv.creation_timestamp:
        m.TRAINER_CHAMPION_CREATED.set(mv.creation_timestamp / 1000.0)
    promoted_at = tags.get("promotion.decided_at") if tags.get("promotion.status") == "promoted" else None
    m.TRAINER_CHAMPION_PROMOTED.set(_unix(promoted_at))
    for kind in KINDS:
        rate = tags.get(f"train.anomaly_rate_{kind}")
        if rate is not None:
            try:
                m.TRAINER_CHAMPION_ANOMALY_RATE.labels(model_kind=kind).set(float(rate))
            except ValueError:
                log.warning("champion v%s has a non-numeric tag train.anomaly_rate_%s", mv.version, kind)


def _unix(iso: str | None) -> float:
    if not iso:
        return 0.0
    try:
        return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def scheduled(settings: Settings, run: Callable[[], Any]) -> Callable[[], None]:
    """Wrap one scheduled run: count its result, then refresh the champion gauges.

    ``run`` returns the ``TrainResult`` (recorded) or raises (counted, then re-raised so the
    scheduler logs it as before).
    """

    def wrapped() -> None:
        try:
            result = run()
        except Exception:
            m.TRAINER_RUNS.labels(result="failure").inc()
            m.TRAINER_CONSECUTIVE_FAILURES.inc()
            raise
        else:
            if result is not None:
                record_run(result)
            m.TRAINER_RUNS.labels(result="success").inc()
            m.TRAINER_CONSECUTIVE_FAILURES.set(0)
            m.TRAINER_LAST_SUCCESS.set(time.time())
        finally:
            refresh_champion(settings)

    return wrapped
