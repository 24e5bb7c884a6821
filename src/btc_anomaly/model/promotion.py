"""The promotion gate: a challenger becomes ``champion`` only if every check passes.

Checks (limits from Settings, ``gate_*``):

``min_train_rows``        the version was trained on at least ``gate_min_train_rows`` transactions.
``anomaly_rate``          both forests flag a share of their training window within
                          ``[contamination / gate_rate_tolerance, contamination * gate_rate_tolerance]``;
                          a forest fit on too few or degenerate rows lands outside (ties, tiny n).
``reference_stability``   on the bundled reference set (500 real transactions, ``reference.py``) every score
                          is finite and in (0, 1] and at most ``gate_reference_max_flag_rate`` are flagged:
                          a model that calls ordinary traffic anomalous would flood the alerts.
``champion_agreement``    when a champion exists: Spearman rank correlation of the two models' scores on the
                          reference set ≥ ``gate_min_rank_corr``; a retrain may move scores but should
                          not reorder what is normal and what is not.
``canaries``              at least ``gate_canary_min_flagged`` of the bundled canaries (real, extreme
                          transactions) are flagged.
``benchmark``             on the labelled benchmark (``evaluate.py``), the challenger's canonical ROC-AUC,
                          precision at 50 and 8-field (summary) ROC-AUC are each at most
                          ``gate_benchmark_tolerance`` below the champion's (evaluated the same way, now), and
                          its canonical ROC-AUC is at least ``gate_benchmark_min_roc_auc``. A benchmark that
                          cannot be evaluated refuses the challenger with the error as the reason.

Every decision, promotion or refusal, is written to the model version: tags ``promotion.status``,
``promotion.reason``, ``promotion.decided_by``, ``promotion.decided_at``, ``promotion.checks`` (JSON), one
``promotion.event.<timestamp>`` tag per decision (JSON, so repeated decisions are all kept) and a line in
the description. A replaced champion gets ``promotion.superseded_by``/``_at``. ``promotion_history()``
reads it all back in time order.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from btc_anomaly.config import Settings
from btc_anomaly.features import compute_features
from btc_anomaly.model.bundle import KINDS, ModelBundle
from btc_anomaly.model.reference import canary_transactions, reference_transactions
from btc_anomaly.model.registry import (
    CHALLENGER,
    CHAMPION,
    client,
    load_alias,
    load_version,
    version_by_alias,
    whoami,
)

EVENT_PREFIX = "promotion.event."
log = logging.getLogger(__name__)


@dataclass
class Check:
    name: str
    passed: bool
    value: float | None
    limit: str
    detail: str


@dataclass
class GateDecision:
    model_name: str
    version: str
    promoted: bool
    checks: list[Check]
    decided_by: str
    decided_at: str
    previous_champion: str | None = None
    forced: bool = False
    note: str = ""
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @property
    def reason(self) -> str:
        if self.note:
            return self.note
        if self.promoted and self.forced and self.failed:
            return "forced despite: " + "; ".join(f"{c.name}: {c.detail}" for c in self.failed)
        if self.promoted:
            return f"all {len(self.checks)} checks passed"
        return "; ".join(f"{c.name}: {c.detail}" for c in self.failed)

    @property
    def summary(self) -> str:
        verb = "promoted" if self.promoted else "refused"
        return f"{verb} {self.model_name} v{self.version}: {self.reason}"

    def to_event(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "status": "promoted" if self.promoted else "refused",
            "decided_at": self.decided_at,
            "decided_by": self.decided_by,
            "reason": self.reason,
            "previous_champion": self.previous_champion,
            "forced": self.forced,
            "checks": [asdict(c) for c in self.checks],
            "metrics": self.metrics,
        }


# --- checks -----------------------------------------------------------------------------------------

# Benchmark metrics compared with the champion's (``EvalReport.metric`` keys) and how the detail names them.
BENCHMARK_METRICS: dict[str, str] = {
    "canonical.roc_auc": "canonical ROC-AUC",
    "canonical.precision_at_50": "canonical precision at 50",
    "summary.roc_auc": "8-field ROC-AUC",
}
BENCHMARK_FLOOR_METRIC = "canonical.roc_auc"


def _reference_scores(bundle: ModelBundle) -> tuple[np.ndarray, np.ndarray]:
    scored = bundle.score_features(compute_features(reference_transactions()))
    return scored["anomaly_score"].to_numpy(), scored["is_anomaly"].to_numpy()


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    rho = spearmanr(a, b).statistic
    return float(rho) if not math.isnan(rho) else 0.0


def rows_check(rows: int, minimum: int) -> Check:
    """``min_train_rows``: the version was trained on at least ``minimum`` transactions."""
    return Check(
        "min_train_rows",
        rows >= minimum,
        rows,
        f">= {minimum}",
        f"trained on {rows:,} rows (minimum {minimum:,})",
    )


def anomaly_rate_check(rates: dict[str, float], contamination: float, tolerance: float) -> Check:
    """``anomaly_rate``: each forest's flag share of its training window (``KINDS`` → rate) within
    ``[contamination / tolerance, contamination * tolerance]``; the value is the rate farthest from the
    contamination, on either side."""
    lo, hi = contamination / tolerance, contamination * tolerance
    bad = {k: r for k, r in rates.items() if not (lo <= r <= hi)}  # NaN is outside too
    shown = ", ".join(f"{k} {r:.4f}" for k, r in rates.items())
    return Check(
        "anomaly_rate",
        not bad,
        max(rates.values(), key=lambda r: abs(r - contamination)),
        f"[{lo:.4f}, {hi:.4f}]",
        shown + (f" outside [{lo:.4f}, {hi:.4f}]" if bad else f" within [{lo:.4f}, {hi:.4f}]"),
    )


def reference_check(scores: np.ndarray, flags: np.ndarray, max_flag_rate: float) -> Check:
    """``reference_stability``: every reference score finite and in (0, 1], at most ``max_flag_rate`` of
    the reference transactions flagged."""
    flag_rate = float(flags.mean())
    in_range = bool(np.isfinite(scores).all() and (scores > 0).all() and (scores <= 1).all())
    return Check(
        "reference_stability",
        in_range and flag_rate <= max_flag_rate,
        flag_rate,
        f"<= {max_flag_rate}",
        f"{flag_rate:.1%} of {len(scores)} reference transactions flagged (max {max_flag_rate:.1%})"
        + ("" if in_range else "; scores out of (0, 1]"),
    )


def agreement_check(rho: float | None, min_rank_corr: float) -> Check:
    """``champion_agreement``: Spearman ``rho`` of the two models' reference scores (None: no champion)."""
    if rho is None:
        return Check("champion_agreement", True, None, "n/a", "no champion yet")
    return Check(
        "champion_agreement",
        rho >= min_rank_corr,
        rho,
        f">= {min_rank_corr}",
        f"Spearman {rho:.3f} with the champion on the reference set (min {min_rank_corr})",
    )


def canary_check(hashes: list[str], flags: np.ndarray, min_flagged: float) -> Check:
    """``canaries``: at least ``min_flagged`` of the canaries (``hashes``, in order with ``flags``) flagged."""
    share = float(flags.mean()) if len(flags) else 0.0
    missed = [h[:12] for h, f in zip(hashes, flags, strict=True) if not f]
    return Check(
        "canaries",
        share >= min_flagged,
        share,
        f">= {min_flagged}",
        f"{int(flags.sum())}/{len(flags)} canaries flagged"
        + (f" (missed {', '.join(missed)})" if missed else ""),
    )


def evaluate(
    settings: Settings,
    bundle: ModelBundle,
    tags: dict[str, str],
    champion: ModelBundle | None,
) -> tuple[list[Check], dict[str, float]]:
    """Run every check on a challenger bundle; also return the numbers measured on the way.

    Training numbers come from the version's ``train.*`` tags, else from the bundle's own ``info``."""
    info_metrics = bundle.info.get("metrics", {})
    rows = int(float(tags.get("train.rows", info_metrics.get("rows", 0))))
    contamination = float(tags.get("train.contamination", settings.iforest_contamination))
    rates = {
        k: float(tags.get(f"train.anomaly_rate_{k}", info_metrics.get(f"anomaly_rate_{k}", math.nan)))
        for k in KINDS
    }
    ref_scores, ref_flags = _reference_scores(bundle)
    reference = reference_check(ref_scores, ref_flags, settings.gate_reference_max_flag_rate)
    metrics: dict[str, Any] = {  # the checks' values are floats here
        "reference_flag_rate": reference.value,
        "reference_score_median": float(np.median(ref_scores)),
    }
    rho = None
    if champion is not None:
        rho = metrics["champion_rank_corr"] = _spearman(ref_scores, _reference_scores(champion)[0])
    canaries = canary_transactions()
    canary_flags = bundle.score_features(compute_features(canaries))["is_anomaly"].to_numpy()
    canary = canary_check(list(canaries["hash"]), canary_flags, settings.gate_canary_min_flagged)
    metrics["canary_flagged_share"] = canary.value
    checks = [
        rows_check(rows, settings.gate_min_train_rows),
        anomaly_rate_check(rates, contamination, settings.gate_rate_tolerance),
        reference,
        agreement_check(rho, settings.gate_min_rank_corr),
        canary,
        _benchmark(settings, bundle, champion, metrics),
    ]
    return checks, metrics


def benchmark_check(
    challenger: dict[str, float] | None,
    champion: dict[str, float] | None,
    *,
    tolerance: float,
    min_roc_auc: float,
    error: str | None = None,
    champion_error: str | None = None,
) -> Check:
    """The ``benchmark`` check from measured numbers (``BENCHMARK_METRICS`` keys → values).

    ``challenger`` None (with ``error``): the benchmark could not be evaluated, refuse. ``champion`` None:
    no champion (or, with ``champion_error``, one that cannot be evaluated): only the floor applies.
    """
    limit = (
        f"each >= champion - {tolerance:g}; {BENCHMARK_METRICS[BENCHMARK_FLOOR_METRIC]} >= {min_roc_auc:g}"
    )
    if challenger is None:
        return Check("benchmark", False, None, limit, f"benchmark evaluation failed: {error or 'no result'}")
    value = challenger.get(BENCHMARK_FLOOR_METRIC, math.nan)
    problems: list[str] = []
    if not value >= min_roc_auc:  # NaN fails too
        problems.append(
            f"{BENCHMARK_METRICS[BENCHMARK_FLOOR_METRIC]} {value:.4f} below the floor {min_roc_auc:g}"
        )
    compared: list[str] = []
    for key, label in BENCHMARK_METRICS.items():
        mine = challenger.get(key, math.nan)
        if champion is None:
            compared.append(f"{label} {mine:.4f}")
            continue
        theirs = champion.get(key, math.nan)
        compared.append(f"{label} {mine:.4f} (champion {theirs:.4f})")
        if not math.isfinite(theirs):
            continue  # the champion lacks this path: nothing to compare against
        if not mine >= theirs - tolerance:
            problems.append(
                f"{label} {mine:.4f} is {theirs - mine:.4f} below the champion's {theirs:.4f} "
                f"(tolerance {tolerance:g})"
            )
    if problems:
        return Check("benchmark", False, value, limit, "; ".join(problems))
    if champion is None:
        against = (
            f"champion not comparable ({champion_error}); " if champion_error else "no champion yet; "
        ) + f"{BENCHMARK_METRICS[BENCHMARK_FLOOR_METRIC]} >= {min_roc_auc:g}"
    else:
        against = f"within {tolerance:g} of the champion, floor {min_roc_auc:g}"
    return Check("benchmark", True, value, limit, ", ".join(compared) + f": {against}")


def _benchmark_numbers(settings: Settings, bundle: ModelBundle) -> dict[str, float]:
    from btc_anomaly.model.evaluate import bundle_scorer
    from btc_anomaly.model.evaluate import evaluate as run_benchmark

    report = run_benchmark(bundle_scorer(bundle, settings), paths=("canonical", "summary"))
    return {key: report.metric(key) for key in BENCHMARK_METRICS}


def _benchmark(
    settings: Settings, bundle: ModelBundle, champion: ModelBundle | None, metrics: dict[str, float]
) -> Check:
    try:
        mine = _benchmark_numbers(settings, bundle)
    except Exception as exc:
        log.warning("benchmark evaluation of the challenger failed: %s", exc)
        return benchmark_check(
            None,
            None,
            tolerance=settings.gate_benchmark_tolerance,
            min_roc_auc=settings.gate_benchmark_min_roc_auc,
            error=f"{type(exc).__name__}: {exc}",
        )
    theirs: dict[str, float] | None = None
    champion_error = None
    if champion is not None:
        try:
            theirs = _benchmark_numbers(settings, champion)
        except Exception as exc:
            log.warning("benchmark evaluation of the champion failed: %s", exc)
            champion_error = f"{type(exc).__name__}: {exc}"
    for prefix, numbers in (("benchmark.", mine), ("benchmark.champion.", theirs or {})):
        metrics.update({prefix + k: v for k, v in numbers.items() if math.isfinite(v)})
    return benchmark_check(
        mine,
        theirs,
        tolerance=settings.gate_benchmark_tolerance,
        min_roc_auc=settings.gate_benchmark_min_roc_auc,
        champion_error=champion_error,
    )


# --- decisions --------------------------------------------------------------------------------------


def promote(
    settings: Settings,
    version: str | int | None = None,
    *,
    decided_by: str | None = None,
    force: bool = False,
) -> GateDecision:
    """Gate ``version`` (default: the ``challenger`` alias) and move ``champion`` to it if it passes."""
    c = client(settings)
    if version is None:
        mv = version_by_alias(settings, CHALLENGER, c)
        if mv is None:
            raise LookupError(f"{settings.model_name} has no '{CHALLENGER}' version to gate")
        version = mv.version
    version = str(version)
    decided_by = decided_by or whoami()
    now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
    champ_mv = version_by_alias(settings, CHAMPION, c)
    previous = str(champ_mv.version) if champ_mv is not None else None
    if previous == version:
        # A run that moved the alias but died before marking the old champion finishes that here.
        _mark_superseded(c, settings, version)
        return GateDecision(
            settings.model_name, version, True, [], decided_by, now, previous, note="already the champion"
        )
    pending = _pending_promotion(c, settings, version, previous)
    if pending is not None:
        # Recorded as promoted by an earlier run whose alias move failed, and the champion has not
        # changed since: finish that decision instead of gating (and recording) the version again.
        _ensure_description(c, settings, pending)
        _move_alias(c, settings, pending)
        return pending

    challenger = load_version(settings, version)
    champion = load_alias(settings, CHAMPION) if previous is not None else None
    checks, metrics = evaluate(
        settings, challenger.bundle, challenger.tags, champion.bundle if champion else None
    )
    passed = all(ch.passed for ch in checks)
    decision = GateDecision(
        model_name=settings.model_name,
        version=version,
        promoted=passed or force,
        checks=checks,
        decided_by=decided_by,
        decided_at=now,
        previous_champion=previous,
        forced=force and not passed,
        metrics=metrics,
    )
    # The record goes first: if writing it fails the alias has not moved (nothing happened), while an alias
    # moved without its record would be a champion the registry's history cannot explain.
    _record(c, settings, decision)
    if decision.promoted:
        _move_alias(c, settings, decision)
    return decision


def _move_alias(c: Any, settings: Settings, d: GateDecision) -> None:
    try:
        c.set_registered_model_alias(settings.model_name, CHAMPION, d.version)
    except Exception as exc:
        raise RuntimeError(
            f"recorded the promotion of {settings.model_name} v{d.version} but could not move the "
            f"'{CHAMPION}' alias ({exc}); run `btc-anomaly promote {d.version}` again to finish it"
        ) from exc
    if d.previous_champion:
        _mark_superseded(c, settings, d.version)


def _mark_superseded(c: Any, settings: Settings, version: str) -> None:
    """Tag the champion ``version`` replaced (its ``promotion.previous_champion``), once."""
    name = settings.model_name
    mv = c.get_model_version(name, version)
    tags = dict(mv.tags or {})
    old_version = tags.get("promotion.previous_champion")
    if not old_version or old_version == version:
        return
    old = c.get_model_version(name, old_version)
    if (old.tags or {}).get("promotion.superseded_by") == version:
        return
    decided_at = tags.get("promotion.decided_at", "")
    c.set_model_version_tag(name, old_version, "promotion.superseded_at", decided_at)
    note = f"[{decided_at}] SUPERSEDED as champion by v{version}"
    c.update_model_version(name, old_version, description=_append(old.description, note))
    # Last: the marker that makes a re-run skip this.
    c.set_model_version_tag(name, old_version, "promotion.superseded_by", version)


def _pending_promotion(c: Any, settings: Settings, version: str, champion: str | None) -> GateDecision | None:
    """The version's last recorded decision, if it is a promotion the alias never followed."""
    tags = dict(c.get_model_version(settings.model_name, version).tags or {})
    if tags.get("promotion.status") != "promoted":
        return None
    events = [v for k, v in tags.items() if k.startswith(EVENT_PREFIX)]
    try:
        last = max((json.loads(v) for v in events), key=lambda e: e.get("decided_at", ""))
    except (ValueError, json.JSONDecodeError):
        return None
    if last.get("status") != "promoted" or last.get("previous_champion") != champion:
        return None  # the champion moved since: that decision is stale, gate again
    checks = [
        Check(
            name=ch.get("name", "?"),
            passed=bool(ch.get("passed")),
            value=ch.get("value"),
            limit=ch.get("limit", ""),
            detail=ch.get("detail", ""),
        )
        for ch in last.get("checks", [])
    ]
    return GateDecision(
        model_name=settings.model_name,
        version=version,
        promoted=True,
        checks=checks,
        decided_by=last.get("decided_by", ""),
        decided_at=last.get("decided_at", ""),
        previous_champion=champion,
        forced=bool(last.get("forced")),
        metrics=last.get("metrics", {}),
    )


def _description_line(d: GateDecision, status: str) -> str:
    return f"[{d.decided_at}] {status.upper()}{' (forced)' if d.forced else ''} by {d.decided_by}: {d.reason}"


def _ensure_description(c: Any, settings: Settings, d: GateDecision) -> None:
    mv = c.get_model_version(settings.model_name, d.version)
    if f"[{d.decided_at}]" not in (mv.description or ""):
        line = _description_line(d, "promoted")
        c.update_model_version(settings.model_name, d.version, description=_append(mv.description, line))


def _record(c: Any, settings: Settings, d: GateDecision) -> None:
    """Write the decision to the version: status tags, the description line, then the event tag (last, so
    that an event in the history means the rest of the record is there too)."""
    name = settings.model_name
    event = d.to_event()
    status = event["status"]
    tags = {
        "promotion.status": status,
        "promotion.reason": d.reason[:4000],
        "promotion.decided_by": d.decided_by,
        "promotion.decided_at": d.decided_at,
        "promotion.checks": json.dumps(
            {ch.name: {"passed": ch.passed, "value": ch.value} for ch in d.checks}, separators=(",", ":")
        ),
    }
    if d.promoted and d.previous_champion:
        tags["promotion.previous_champion"] = d.previous_champion
    for k, v in tags.items():
        c.set_model_version_tag(name, d.version, k, v)
    mv = c.get_model_version(name, d.version)
    c.update_model_version(name, d.version, description=_append(mv.description, _description_line(d, status)))
    event_key = EVENT_PREFIX + d.decided_at.replace(":", "").replace("-", "").replace("+0000", "Z")
    c.set_model_version_tag(name, d.version, event_key, _compact(event))


def _append(description: str | None, line: str, limit: int = 5000) -> str:
    """Add a line to a version description within the registry's 5000-character column (Postgres
    enforces it): the first line (training summary) is kept, the oldest decision lines go first."""
    lines = [*(description or "").splitlines(), line]
    while len(lines) > 2 and len("\n".join(lines)) > limit:
        del lines[1]
    return "\n".join(lines)[:limit]


def _compact(event: dict[str, Any]) -> str:
    """The event as JSON within MLflow's 5000-character tag limit (details go first)."""
    text = json.dumps(event, separators=(",", ":"), default=str)
    if len(text) <= 5000:
        return text
    slim = dict(
        event,
        checks=[{"name": c["name"], "passed": c["passed"], "value": c["value"]} for c in event["checks"]],
    )
    text = json.dumps(slim, separators=(",", ":"), default=str)
    # Then the reason is shortened: cutting the JSON itself would leave an event promotion_history
    # cannot parse, and the decision would vanish from the history. Each pass cuts as many characters as
    # the text is over (a character may take more than one in JSON, so a pass can cut more than needed):
    # the second pass takes back the marker's own length, and a plain reason fills the 5000 exactly.
    reason = str(slim.get("reason", ""))
    while len(text) > 5000 and reason:
        reason = reason[: max(0, len(reason) - (len(text) - 5000))]
        slim["reason"] = reason + "…"
        text = json.dumps(slim, separators=(",", ":"), default=str)
    return text


def promotion_history(settings: Settings) -> list[dict[str, Any]]:
    """Every gate decision on every version of the model, oldest first.

    Each item is the recorded event (version, status, decided_at, decided_by, reason, previous_champion,
    forced, checks, metrics). The champion history is the ``status == "promoted"`` items.
    """
    c = client(settings)
    events: list[dict[str, Any]] = []
    for mv in c.search_model_versions(f"name='{settings.model_name}'"):
        for key, value in (mv.tags or {}).items():
            if key.startswith(EVENT_PREFIX):
                try:
                    events.append(json.loads(value))
                except json.JSONDecodeError:
                    continue
    return sorted(events, key=lambda e: (e.get("decided_at", ""), int(e.get("version", 0))))


def champion_history(settings: Settings) -> list[dict[str, Any]]:
    return [e for e in promotion_history(settings) if e.get("status") == "promoted"]
