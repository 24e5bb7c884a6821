"""The promotion gate's logic, with exact expectations: the checks of ``evaluate`` on a real bundle (fitted on
the bundled sample) at their limits, the benchmark check's arithmetic, and how a decision is written to and
read back from a real MLflow registry (MLflow's own SQLAlchemy store on SQLite, no server, no fake).

Expected values are computed here by hand or straight from the model's own scores, never by the gate.
"""

from __future__ import annotations

import copy
import gzip
import json
import logging
import math
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from btc_anomaly.config import Settings
from btc_anomaly.features import compute_features
from btc_anomaly.model import evaluate as benchmark
from btc_anomaly.model import promotion
from btc_anomaly.model.promotion import Check, GateDecision
from btc_anomaly.model.reference import canary_transactions, reference_transactions
from helpers.detectors import fitted_bundle

NAME = "btc-tx-iforest"


# --- the benchmark check: floor and tolerance at their exact limits -----------------------------------------

# Binary fractions, so "champion - tolerance" is exact and the boundary is the boundary.
CHAMPION = {"canonical.roc_auc": 0.9375, "canonical.precision_at_50": 0.875, "summary.roc_auc": 0.9375}
LIMIT = "each >= champion - 0.0625; canonical ROC-AUC >= 0.875"


def _bench(mine: dict[str, float] | None, theirs: dict[str, float] | None, **kw: Any) -> Check:
    return promotion.benchmark_check(mine, theirs, tolerance=0.0625, min_roc_auc=0.875, **kw)


def test_benchmark_at_exactly_the_tolerance_and_the_floor_passes() -> None:
    mine = {"canonical.roc_auc": 0.875, "canonical.precision_at_50": 0.8125, "summary.roc_auc": 0.875}
    check = _bench(mine, CHAMPION)
    assert check == Check(
        "benchmark",
        True,
        0.875,
        LIMIT,
        "canonical ROC-AUC 0.8750 (champion 0.9375), canonical precision at 50 0.8125 (champion 0.8750), "
        "8-field ROC-AUC 0.8750 (champion 0.9375): within 0.0625 of the champion, floor 0.875",
    )


@pytest.mark.parametrize(
    ("key", "label"),
    [
        ("canonical.roc_auc", "canonical ROC-AUC"),
        ("canonical.precision_at_50", "canonical precision at 50"),
        ("summary.roc_auc", "8-field ROC-AUC"),
    ],
)
def test_benchmark_one_step_past_the_tolerance_is_refused(key: str, label: str) -> None:
    mine = dict(CHAMPION)
    mine[key] = CHAMPION[key] - 0.0625 - 2**-20
    check = promotion.benchmark_check(
        mine, CHAMPION, tolerance=0.0625, min_roc_auc=0.5
    )  # floor out of the way
    gap = CHAMPION[key] - mine[key]
    assert check.passed is False
    assert check.value == mine["canonical.roc_auc"]
    assert check.limit == "each >= champion - 0.0625; canonical ROC-AUC >= 0.5"
    assert check.detail == (
        f"{label} {mine[key]:.4f} is {gap:.4f} below the champion's {CHAMPION[key]:.4f} (tolerance 0.0625)"
    )


def test_benchmark_floor_without_champion_at_and_below_the_limit() -> None:
    at_floor = {"canonical.roc_auc": 0.875, "canonical.precision_at_50": 0.5, "summary.roc_auc": 0.5}
    assert _bench(at_floor, None) == Check(
        "benchmark",
        True,
        0.875,
        LIMIT,
        "canonical ROC-AUC 0.8750, canonical precision at 50 0.5000, 8-field ROC-AUC 0.5000: "
        "no champion yet; canonical ROC-AUC >= 0.875",
    )
    below = dict(at_floor, **{"canonical.roc_auc": 0.875 - 2**-20})
    refused = _bench(below, None)
    assert (refused.passed, refused.detail) == (False, "canonical ROC-AUC 0.8750 below the floor 0.875")
    missing = _bench({"summary.roc_auc": 0.99}, None)  # no canonical number at all: NaN fails the floor
    assert missing.passed is False and missing.detail == "canonical ROC-AUC nan below the floor 0.875"
    assert math.isnan(missing.value)


def test_benchmark_champion_that_cannot_be_compared() -> None:
    check = _bench(CHAMPION, None, champion_error="ValueError: old features")
    assert check.passed and check.detail.endswith(
        ": champion not comparable (ValueError: old features); canonical ROC-AUC >= 0.875"
    )
    skipped = _bench(
        dict(CHAMPION, **{"summary.roc_auc": 0.1}), dict(CHAMPION, **{"summary.roc_auc": math.nan})
    )
    assert skipped.passed and "8-field ROC-AUC 0.1000 (champion nan)" in skipped.detail
    failed = _bench(None, None)
    assert failed == Check("benchmark", False, None, LIMIT, "benchmark evaluation failed: no result")


# --- decisions as text: the event, the description line, the size limits -----------------------------------


def _decision(**kw: Any) -> GateDecision:
    base: dict[str, Any] = {
        "model_name": NAME,
        "version": "7",
        "promoted": False,
        "checks": [
            Check("min_train_rows", True, 5000, ">= 1000", "trained on 5,000 rows (minimum 1,000)"),
            Check("canaries", False, 0.6, ">= 0.8", "3/5 canaries flagged"),
        ],
        "decided_by": "ops@host",
        "decided_at": "2026-01-02T03:04:05.678+00:00",
        "previous_champion": "6",
        "metrics": {"canary_flagged_share": 0.6},
    }
    return GateDecision(**{**base, **kw})


def test_event_and_description_line_of_a_refusal() -> None:
    d = _decision()
    assert d.to_event() == {
        "version": "7",
        "status": "refused",
        "decided_at": "2026-01-02T03:04:05.678+00:00",
        "decided_by": "ops@host",
        "reason": "canaries: 3/5 canaries flagged",
        "previous_champion": "6",
        "forced": False,
        "checks": [
            {
                "name": "min_train_rows",
                "passed": True,
                "value": 5000,
                "limit": ">= 1000",
                "detail": "trained on 5,000 rows (minimum 1,000)",
            },
            {
                "name": "canaries",
                "passed": False,
                "value": 0.6,
                "limit": ">= 0.8",
                "detail": "3/5 canaries flagged",
            },
        ],
        "metrics": {"canary_flagged_share": 0.6},
    }
    assert promotion._description_line(d, "refused") == (
        "[2026-01-02T03:04:05.678+00:00] REFUSED by ops@host: canaries: 3/5 canaries flagged"
    )
    forced = _decision(promoted=True, forced=True)
    assert forced.to_event()["status"] == "promoted" and forced.to_event()["forced"] is True
    assert promotion._description_line(forced, "promoted") == (
        "[2026-01-02T03:04:05.678+00:00] PROMOTED (forced) by ops@host: forced despite: canaries: 3/5 canaries flagged"
    )


def test_append_keeps_the_first_line_and_drops_the_oldest_decisions() -> None:
    assert promotion._append(None, "a") == "a"
    assert promotion._append("", "a") == "a"
    assert promotion._append("trained\nd1", "d2") == "trained\nd1\nd2"
    # 10 + 1 + 4 + 1 + 4 = exactly the limit: nothing dropped.
    assert promotion._append("0123456789\nold1", "new1", limit=20) == "0123456789\nold1\nnew1"
    # One character over: the oldest decision line goes, the training line stays.
    assert promotion._append("0123456789\nold1\nold2", "new11", limit=20) == "0123456789\nnew11"
    # Two lines that still do not fit are cut at the limit.
    assert promotion._append("0123456789", "abcdefghijklmnop", limit=20) == "0123456789\nabcdefghi"
    assert len(promotion._append("x" * 6000, "y")) == 5000


def test_compact_keeps_small_events_and_slims_large_ones_to_5000() -> None:
    small = _decision().to_event()
    assert promotion._compact(small) == json.dumps(small, separators=(",", ":"))
    big = _decision(checks=[Check(f"c{i}", False, float(i), ">= 1", "d" * 400) for i in range(20)]).to_event()
    big["reason"] = "short"
    slim = json.loads(promotion._compact(big))
    assert slim["checks"] == [{"name": f"c{i}", "passed": False, "value": float(i)} for i in range(20)]
    assert {k: v for k, v in slim.items() if k != "checks"} == {k: v for k, v in big.items() if k != "checks"}
    huge = dict(big, reason="r" * 6000)
    text = promotion._compact(huge)
    # Still JSON (the history must parse it), within the limit, the reason shortened and marked.
    event = json.loads(text)
    assert len(text) <= 5000 and event["reason"].endswith("…") and set(event["reason"][:-1]) == {"r"}
    assert len(text) > 4900 and event["checks"] == slim["checks"]
    # A value JSON cannot encode is written as its text (default=str), large or small.
    assert json.loads(promotion._compact({"x": Path("/a")})) == {"x": "/a"}


def test_spearman_of_a_ranking_its_reverse_and_a_constant() -> None:
    a = np.array([0.1, 0.4, 0.2, 0.9, 0.5])
    assert promotion._spearman(a, a * 2 + 1) == pytest.approx(1.0)
    assert promotion._spearman(a, -a) == pytest.approx(-1.0)
    # Ranks 1,3,2,5,4 against 1..5: 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 4 / 120 = 0.8.
    assert promotion._spearman(a, np.arange(5.0)) == pytest.approx(0.8)
    assert promotion._spearman(a, np.ones(5)) == 0.0  # undefined (NaN) counts as no agreement


# --- evaluate(): every check on a real bundle, at its limits ---------------------------------------------


@lru_cache(maxsize=1)
def _small_benchmark() -> Path:
    """Every positive of the real benchmark's canonical split and its first 300 negatives: the same scoring
    path in a fraction of the time (the gate reads the file ``benchmark_path()`` names)."""
    out = Path(tempfile.mkdtemp(prefix="gate-bench-")) / "benchmark.jsonl.gz"
    lines = gzip.decompress(benchmark.benchmark_path().read_bytes()).splitlines()
    keep, negatives = [], 0
    for line in lines:
        rec = json.loads(line)
        if rec["split"] != "canonical":
            continue
        if rec["label"] == 0:
            negatives += 1
            if negatives > 300:
                continue
        keep.append(line)
    out.write_bytes(gzip.compress(b"\n".join(keep)))
    return out


@pytest.fixture
def small_benchmark(monkeypatch: pytest.MonkeyPatch) -> Path:
    path = _small_benchmark()
    monkeypatch.setattr(benchmark, "benchmark_path", lambda: path)
    return path


@lru_cache(maxsize=1)
def _observed() -> dict[str, Any]:
    """What the bundle itself says about the reference set and the canaries (not through the gate)."""
    bundle = fitted_bundle()
    ref = bundle.score_features(compute_features(reference_transactions()))
    can = bundle.score_features(compute_features(canary_transactions()))
    return {
        "ref_scores": ref["anomaly_score"].to_numpy(),
        "ref_flag_rate": float(ref["is_anomaly"].mean()),
        "canary_flags": can["is_anomaly"].to_numpy(),
        "canary_hashes": list(canary_transactions()["hash"]),
    }


def test_evaluate_passes_every_check_at_its_exact_limit(small_benchmark: Path) -> None:
    seen = _observed()
    flag_rate, n_ref = seen["ref_flag_rate"], len(seen["ref_scores"])
    canary_share = float(seen["canary_flags"].mean())
    settings = Settings(
        gate_min_train_rows=1000,
        gate_rate_tolerance=2.0,
        gate_reference_max_flag_rate=flag_rate,
        gate_min_rank_corr=1.0,
        gate_canary_min_flagged=canary_share,
        gate_benchmark_min_roc_auc=0.5,
    )
    # The version's own contamination (0.02), not the configured one (0.01), sets the band: [0.01, 0.04].
    assert settings.iforest_contamination == 0.01
    tags = {
        "train.rows": "1000.0",
        "train.contamination": "0.02",
        "train.anomaly_rate_full": "0.01",
        "train.anomaly_rate_structural": "0.04",
    }
    bundle = fitted_bundle()
    checks, metrics = promotion.evaluate(settings, bundle, tags, bundle)
    by = {c.name: c for c in checks}
    assert [c.name for c in checks] == [
        "min_train_rows",
        "anomaly_rate",
        "reference_stability",
        "champion_agreement",
        "canaries",
        "benchmark",
    ]
    assert all(c.passed for c in checks), [c for c in checks if not c.passed]
    assert by["min_train_rows"] == Check(
        "min_train_rows", True, 1000, ">= 1000", "trained on 1,000 rows (minimum 1,000)"
    )
    assert by["anomaly_rate"] == Check(
        "anomaly_rate",
        True,
        0.04,
        "[0.0100, 0.0400]",
        "full 0.0100, structural 0.0400 within [0.0100, 0.0400]",
    )
    assert by["reference_stability"] == Check(
        "reference_stability",
        True,
        flag_rate,
        f"<= {flag_rate}",
        f"{flag_rate:.1%} of {n_ref} reference transactions flagged (max {flag_rate:.1%})",
    )
    agreement = by["champion_agreement"]
    assert (agreement.value, agreement.limit) == (1.0, ">= 1.0")
    assert agreement.detail == "Spearman 1.000 with the champion on the reference set (min 1.0)"
    n_flagged = int(seen["canary_flags"].sum())
    missed = [h[:12] for h, f in zip(seen["canary_hashes"], seen["canary_flags"], strict=True) if not f]
    assert by["canaries"] == Check(
        "canaries",
        True,
        canary_share,
        f">= {canary_share}",
        f"{n_flagged}/{len(missed) + n_flagged} canaries flagged"
        + (f" (missed {', '.join(missed)})" if missed else ""),
    )
    assert by["benchmark"].detail.endswith(": within 0.02 of the champion, floor 0.5")
    assert metrics["reference_flag_rate"] == flag_rate
    assert metrics["reference_score_median"] == float(np.median(seen["ref_scores"]))
    assert metrics["champion_rank_corr"] == 1.0
    assert metrics["canary_flagged_share"] == canary_share
    assert metrics["benchmark.canonical.roc_auc"] == metrics["benchmark.champion.canonical.roc_auc"]
    assert set(metrics) >= {f"benchmark.{k}" for k in promotion.BENCHMARK_METRICS}


def test_evaluate_refuses_one_step_past_every_limit(small_benchmark: Path) -> None:
    seen = _observed()
    flag_rate, n_ref = seen["ref_flag_rate"], len(seen["ref_scores"])
    assert flag_rate > 0, "the sample bundle flags part of the reference set"
    canary_share = float(seen["canary_flags"].mean())
    settings = Settings(
        iforest_contamination=0.01,
        gate_min_train_rows=1000,
        gate_rate_tolerance=2.0,
        gate_reference_max_flag_rate=flag_rate - 1e-9,
        gate_canary_min_flagged=canary_share + 1e-9,
        gate_benchmark_min_roc_auc=1.0,
    )
    # No contamination tag: the configured one applies. Rows only in the bundle's info are read from there.
    tags = {"train.anomaly_rate_full": "0.0049", "train.anomaly_rate_structural": "0.0201"}
    checks, metrics = promotion.evaluate(settings, fitted_bundle(), tags, None)
    by = {c.name: c for c in checks}
    rows = int(fitted_bundle().info.get("metrics", {}).get("rows", 0))
    assert rows < 1000 or by["min_train_rows"].passed
    assert by["anomaly_rate"] == Check(
        "anomaly_rate",
        False,
        0.0201,
        "[0.0050, 0.0200]",
        "full 0.0049, structural 0.0201 outside [0.0050, 0.0200]",
    )
    ref = by["reference_stability"]
    assert (ref.passed, ref.value) == (False, flag_rate)
    assert ref.detail == (
        f"{flag_rate:.1%} of {n_ref} reference transactions flagged (max {flag_rate - 1e-9:.1%})"
    )
    assert by["champion_agreement"] == Check("champion_agreement", True, None, "n/a", "no champion yet")
    assert "champion_rank_corr" not in metrics
    assert by["canaries"].passed is False and by["canaries"].value == canary_share
    bench = by["benchmark"]
    assert bench.passed is False and bench.detail.startswith("canonical ROC-AUC ")
    assert bench.detail.endswith(" below the floor 1")
    assert bench.value == metrics["benchmark.canonical.roc_auc"] < 1.0
    assert not any(k.startswith("benchmark.champion.") for k in metrics)


def test_evaluate_reads_rows_and_rates_from_the_bundle_when_untagged(small_benchmark: Path) -> None:
    settings = Settings(gate_min_train_rows=0, gate_benchmark_min_roc_auc=0.0)
    bundle = fitted_bundle()
    info_metrics = bundle.info.get("metrics", {})
    checks, _ = promotion.evaluate(settings, bundle, {}, None)
    by = {c.name: c for c in checks}
    rows = int(float(info_metrics.get("rows", 0)))
    assert by["min_train_rows"] == Check(
        "min_train_rows", True, rows, ">= 0", f"trained on {rows:,} rows (minimum 0)"
    )
    rates = [float(info_metrics.get(f"anomaly_rate_{k}", math.nan)) for k in ("full", "structural")]
    shown = f"full {rates[0]:.4f}, structural {rates[1]:.4f}"
    assert by["anomaly_rate"].detail.startswith(shown)
    c = settings.iforest_contamination
    assert by["anomaly_rate"].passed == all(c / 2 <= r <= c * 2 for r in rates)
    # A bundle that recorded its training numbers is judged on them: 1,234 rows and an off rate.
    recorded = copy.copy(bundle)
    recorded.info = {
        **bundle.info,
        "metrics": {"rows": 1234.0, "anomaly_rate_full": c, "anomaly_rate_structural": c * 3},
    }
    by = {ch.name: ch for ch in promotion.evaluate(settings, recorded, {}, None)[0]}
    assert (by["min_train_rows"].value, by["min_train_rows"].detail) == (
        1234,
        "trained on 1,234 rows (minimum 0)",
    )
    assert not by["anomaly_rate"].passed and by["anomaly_rate"].value == pytest.approx(c * 3)


def test_a_benchmark_that_cannot_be_read_refuses_with_the_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "benchmark.jsonl.gz"
    monkeypatch.setattr(benchmark, "benchmark_path", lambda: missing)
    metrics: dict[str, float] = {}
    with caplog.at_level(logging.WARNING, logger=promotion.__name__):
        check = promotion._benchmark(Settings(), fitted_bundle(), None, metrics)
    assert check.passed is False and check.value is None
    assert check.detail.startswith("benchmark evaluation failed: FileNotFoundError: ")
    assert str(missing) in check.detail
    assert metrics == {}
    # The operator's log names whose evaluation failed and why.
    error = check.detail.removeprefix("benchmark evaluation failed: FileNotFoundError: ")
    assert [r.getMessage() for r in caplog.records if r.name == promotion.__name__] == [
        f"benchmark evaluation of the challenger failed: {error}"
    ]


def test_a_champion_that_cannot_be_benchmarked_leaves_only_the_floor(
    small_benchmark: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    bundle = fitted_bundle()
    calls: list[Any] = []
    real = promotion._benchmark_numbers

    def numbers(settings: Settings, b: Any) -> dict[str, float]:
        calls.append(b)
        if len(calls) == 2:  # the champion's evaluation, as an unreadable old bundle fails it
            raise ValueError("feature version 1")
        return real(settings, b)

    monkeypatch.setattr(promotion, "_benchmark_numbers", numbers)
    metrics: dict[str, float] = {}
    with caplog.at_level(logging.WARNING, logger=promotion.__name__):
        check = promotion._benchmark(Settings(gate_benchmark_min_roc_auc=0.5), bundle, bundle, metrics)
    assert [r.getMessage() for r in caplog.records if r.name == promotion.__name__] == [
        "benchmark evaluation of the champion failed: feature version 1"
    ]
    assert calls == [bundle, bundle]
    assert check.passed and "champion not comparable (ValueError: feature version 1)" in check.detail
    assert set(metrics) == {f"benchmark.{k}" for k in promotion.BENCHMARK_METRICS}
    assert check.value == metrics["benchmark.canonical.roc_auc"]


# --- the record in a real registry ------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _template_registry() -> Path:
    """A migrated MLflow SQLite store with one model and three versions (created once per process)."""
    from mlflow import MlflowClient

    db = Path(tempfile.mkdtemp(prefix="gate-registry-")) / "mlflow.db"
    c = MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    c.create_registered_model(NAME)
    for _ in range(3):
        c.create_model_version(NAME, source=str(db.parent / "artifacts"), description="trained on 5,000 rows")
    return db


@pytest.fixture
def registry(tmp_path: Path) -> tuple[Settings, Any]:
    from mlflow import MlflowClient

    db = tmp_path / "mlflow.db"
    shutil.copy(_template_registry(), db)
    uri = f"sqlite:///{db}"
    return Settings(mlflow_tracking_uri=uri, model_name=NAME), MlflowClient(
        tracking_uri=uri, registry_uri=uri
    )


def _tags(c: Any, version: str) -> dict[str, str]:
    return dict(c.get_model_version(NAME, version).tags)


def test_record_writes_status_reason_checks_description_and_event(registry: tuple[Settings, Any]) -> None:
    settings, c = registry
    d = _decision(version="2", previous_champion="1")
    promotion._record(c, settings, d)
    tags = _tags(c, "2")
    event_key = "promotion.event.20260102T030405.678Z"
    assert tags == {
        "promotion.status": "refused",
        "promotion.reason": "canaries: 3/5 canaries flagged",
        "promotion.decided_by": "ops@host",
        "promotion.decided_at": "2026-01-02T03:04:05.678+00:00",
        "promotion.checks": '{"min_train_rows":{"passed":true,"value":5000},"canaries":{"passed":false,"value":0.6}}',
        event_key: json.dumps(d.to_event(), separators=(",", ":")),
    }
    assert c.get_model_version(NAME, "2").description == (
        "trained on 5,000 rows\n[2026-01-02T03:04:05.678+00:00] REFUSED by ops@host: canaries: 3/5 canaries flagged"
    )
    assert promotion.promotion_history(settings) == [d.to_event()]
    assert promotion.champion_history(settings) == []


def test_promotion_moves_the_alias_and_marks_the_old_champion_once(registry: tuple[Settings, Any]) -> None:
    settings, c = registry
    c.set_registered_model_alias(NAME, "champion", "1")
    first = _decision(
        version="1", promoted=True, previous_champion=None, decided_at="2026-01-01T00:00:00.000+00:00"
    )
    promotion._record(c, settings, first)
    d = _decision(version="2", promoted=True, forced=True, decided_at="2026-01-02T00:00:00.000+00:00")
    d.previous_champion = "1"
    promotion._record(c, settings, d)
    assert _tags(c, "2")["promotion.previous_champion"] == "1"
    assert "promotion.previous_champion" not in _tags(c, "1")  # promoted with no champion before it
    promotion._move_alias(c, settings, d)
    assert str(c.get_model_version_by_alias(NAME, "champion").version) == "2"
    old = _tags(c, "1")
    assert old["promotion.superseded_by"] == "2"
    assert old["promotion.superseded_at"] == "2026-01-02T00:00:00.000+00:00"
    description = c.get_model_version(NAME, "1").description
    assert description.endswith("\n[2026-01-02T00:00:00.000+00:00] SUPERSEDED as champion by v2")
    promotion._mark_superseded(c, settings, "2")  # a re-run changes nothing
    assert c.get_model_version(NAME, "1").description == description
    promotion._mark_superseded(c, settings, "1")  # v1 replaced nobody
    assert "promotion.superseded_by" not in _tags(c, "2")
    history = promotion.champion_history(settings)
    assert [(e["version"], e["forced"]) for e in history] == [("1", False), ("2", True)]
    assert promotion.promotion_history(settings) == history


def test_pending_promotion_is_read_back_only_while_the_champion_is_unchanged(
    registry: tuple[Settings, Any],
) -> None:
    settings, c = registry
    assert promotion._pending_promotion(c, settings, "3", None) is None  # never decided
    refused = _decision(version="3", previous_champion="1", decided_at="2026-01-01T00:00:00.000+00:00")
    promotion._record(c, settings, refused)
    assert promotion._pending_promotion(c, settings, "3", "1") is None  # refused
    d = _decision(
        version="3", promoted=True, previous_champion="1", decided_at="2026-01-03T00:00:00.000+00:00"
    )
    promotion._record(c, settings, d)
    pending = promotion._pending_promotion(c, settings, "3", "1")
    assert pending == GateDecision(
        model_name=NAME,
        version="3",
        promoted=True,
        checks=d.checks,
        decided_by="ops@host",
        decided_at="2026-01-03T00:00:00.000+00:00",
        previous_champion="1",
        forced=False,
        metrics={"canary_flagged_share": 0.6},
    )
    assert promotion._pending_promotion(c, settings, "3", "2") is None  # the champion moved since
    # An event without a date sorts first; a check without its fields reads as unnamed and empty.
    c.set_model_version_tag(NAME, "3", "promotion.event.a", json.dumps({"status": "refused"}))
    lean = json.loads(_tags(c, "3")["promotion.event.20260103T000000.000Z"])
    lean["checks"] = [{"passed": True}]
    c.set_model_version_tag(NAME, "3", "promotion.event.20260103T000000.000Z", json.dumps(lean))
    read = promotion._pending_promotion(c, settings, "3", "1")
    assert read is not None and read.checks == [Check("?", True, None, "", "")]
    # A later refusal of the same version wins over the earlier promotion.
    c.set_model_version_tag(
        NAME, "3", "promotion.event.z", json.dumps({"decided_at": "2027", "status": "refused"})
    )
    assert promotion._pending_promotion(c, settings, "3", "1") is None
    # An unreadable event is not a pending promotion.
    c.set_model_version_tag(NAME, "3", "promotion.event.z", "{not json")
    assert promotion._pending_promotion(c, settings, "3", "1") is None
    assert [e["status"] for e in promotion.promotion_history(settings)] == ["refused", "refused", "promoted"]


def test_promote_finishes_a_pending_promotion_and_an_existing_champion(
    registry: tuple[Settings, Any],
) -> None:
    settings, c = registry
    c.set_registered_model_alias(NAME, "champion", "1")
    d = _decision(
        version="2", promoted=True, previous_champion="1", decided_at="2026-01-03T00:00:00.000+00:00"
    )
    promotion._record(c, settings, d)
    c.update_model_version(NAME, "2", description="trained on 5,000 rows")  # the description write was lost
    done = promotion.promote(settings, "2", decided_by="someone@else")
    assert done == promotion._pending_promotion(c, settings, "2", "1")
    assert done.decided_by == "ops@host" and done.promoted
    assert str(c.get_model_version_by_alias(NAME, "champion").version) == "2"
    assert c.get_model_version(NAME, "2").description == (
        "trained on 5,000 rows\n[2026-01-03T00:00:00.000+00:00] PROMOTED by ops@host: all 2 checks passed"
    )
    promotion._ensure_description(c, settings, d)  # already there: not written twice
    assert c.get_model_version(NAME, "2").description.count("[2026-01-03T00:00:00.000+00:00]") == 1
    assert _tags(c, "1")["promotion.superseded_by"] == "2"
    again = promotion.promote(settings, 2, decided_by="x@y")
    assert (again.promoted, again.checks, again.note, again.previous_champion) == (
        True,
        [],
        "already the champion",
        "2",
    )
    assert again.summary == f"promoted {NAME} v2: already the champion"
    assert again.decided_by == "x@y"  # every decision names who asked for it
    assert again.decided_at.endswith("+00:00")  # decisions are stamped in UTC
    with pytest.raises(LookupError, match=f"{NAME} has no 'challenger' version to gate"):
        promotion.promote(settings)


def test_promote_without_a_version_gates_the_challenger(registry: tuple[Settings, Any]) -> None:
    settings, c = registry
    c.set_registered_model_alias(NAME, "champion", "1")
    c.set_registered_model_alias(NAME, "challenger", "3")
    d = _decision(
        version="3", promoted=True, previous_champion="1", decided_at="2026-01-04T00:00:00.000+00:00"
    )
    promotion._record(c, settings, d)
    done = promotion.promote(settings)  # the challenger's recorded promotion, finished
    assert (done.version, done.promoted, done.decided_at) == ("3", True, "2026-01-04T00:00:00.000+00:00")
    assert str(c.get_model_version_by_alias(NAME, "champion").version) == "3"


def test_reference_scores_are_the_bundles_own(small_benchmark: Path) -> None:
    seen = _observed()
    scores, flags = promotion._reference_scores(fitted_bundle())
    assert np.array_equal(scores, seen["ref_scores"])
    assert flags.mean() == seen["ref_flag_rate"]
    assert len(scores) == len(pd.DataFrame(reference_transactions()))


def _register_sample_bundle(settings: Settings, c: Any, root: Path, tags: dict[str, str]) -> str:
    """A new version whose artifacts are the sample bundle's files (as ``log_bundle`` lays them out)."""
    from btc_anomaly.model.bundle import bundle_digest
    from btc_anomaly.model.registry import BUNDLE_PATH, DIGEST_TAG

    source = root / f"v{len(list(root.iterdir())) if root.exists() else 0}"
    fitted_bundle().save(source / BUNDLE_PATH)
    mv = c.create_model_version(
        NAME, source=str(source), tags={DIGEST_TAG: bundle_digest(source / BUNDLE_PATH), **tags}
    )
    return str(mv.version)


def test_the_gate_records_its_checks_against_the_champion(
    registry: tuple[Settings, Any], small_benchmark: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, c = registry
    settings = settings.model_copy(update={"gate_min_train_rows": 1000, "gate_benchmark_min_roc_auc": 0.5})
    good = {
        "train.rows": "5000",
        "train.contamination": str(settings.iforest_contamination),
        "train.anomaly_rate_full": str(settings.iforest_contamination),
        "train.anomaly_rate_structural": str(settings.iforest_contamination),
    }
    root = tmp_path / "artifacts"
    root.mkdir()
    first = _register_sample_bundle(settings, c, root, good)
    d1 = promotion.promote(settings, first, decided_by="ci@test")
    assert d1.promoted and not d1.forced and d1.previous_champion is None
    assert d1.model_name == NAME and d1.decided_by == "ci@test" and d1.decided_at.endswith("+00:00")
    assert [ch.name for ch in d1.checks][3] == "champion_agreement" and d1.checks[
        3
    ].detail == "no champion yet"
    assert d1.metrics["reference_flag_rate"] == _observed()["ref_flag_rate"]

    # From here on the benchmark file is gone: its check refuses at once (the benchmark is judged in
    # test_evaluate_*), so the two gates below compare with the champion without scoring the benchmark.
    monkeypatch.setattr(benchmark, "benchmark_path", lambda: tmp_path / "benchmark.jsonl.gz")
    both = "min_train_rows: trained on 999 rows (minimum 1,000); benchmark: benchmark evaluation failed: "
    few = _register_sample_bundle(settings, c, root, dict(good, **{"train.rows": "999"}))
    d2 = promotion.promote(settings, few, decided_by="ci@test")
    assert not d2.promoted and not d2.forced and d2.previous_champion == first
    assert d2.reason.startswith(both + "FileNotFoundError")
    assert d2.checks[3].value == pytest.approx(1.0)  # compared with the champion: the same forest
    assert d2.metrics["champion_rank_corr"] == pytest.approx(1.0)
    assert str(c.get_model_version_by_alias(NAME, "champion").version) == first

    d3 = promotion.promote(settings, few, decided_by="ci@test", force=True)
    assert d3.promoted and d3.forced
    assert d3.reason == "forced despite: " + d2.reason
    assert str(c.get_model_version_by_alias(NAME, "champion").version) == few
    assert _tags(c, first)["promotion.superseded_by"] == few
    assert [(e["version"], e["status"], e["forced"]) for e in promotion.promotion_history(settings)] == [
        (first, "promoted", False),
        (few, "refused", False),
        (few, "promoted", True),
    ]


# --- the event tag at the 5000-character limit --------------------------------------------------------------


def _slim(event: dict[str, Any]) -> dict[str, Any]:
    """The slimmed form the tag falls back to: each check keeps its name, outcome and value."""
    return dict(event, checks=[{k: ch[k] for k in ("name", "passed", "value")} for ch in event["checks"]])


def _dumps(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"), default=str)


def _padded(event: dict[str, Any], length: int, slim: bool = False) -> dict[str, Any]:
    """``event`` with its reason padded so that its JSON (or its slim form's) is ``length`` characters."""
    bare = dict(event, reason="")
    return dict(event, reason="r" * (length - len(_dumps(_slim(bare) if slim else bare))))


def test_an_event_of_exactly_5000_characters_is_kept_whole_and_one_more_is_slimmed() -> None:
    """The tag holds 5000 characters: an event that fits exactly keeps its check details; one character more
    and the details go, the reason untouched."""
    event = _decision().to_event()
    exact = _padded(event, 5000)
    assert promotion._compact(exact) == _dumps(exact) and len(_dumps(exact)) == 5000
    over = _padded(event, 5001)
    text = promotion._compact(over)
    assert len(text) <= 5000 and json.loads(text) == _slim(over)


def test_a_slimmed_event_that_fits_keeps_its_whole_reason() -> None:
    """The reason is only shortened when the slimmed event still passes the limit: at exactly 5000 it stays."""
    big = _decision(checks=[Check(f"c{i}", False, float(i), ">= 1", "d" * 400) for i in range(20)]).to_event()
    exact = _padded(big, 5000, slim=True)
    assert len(_dumps(exact)) > 5000
    assert json.loads(promotion._compact(exact)) == _slim(exact)
    over = _padded(big, 5001, slim=True)  # one character more: the reason is cut to fit
    assert len(promotion._compact(over)) <= 5000


def test_values_json_cannot_encode_are_text_in_slimmed_and_shortened_events() -> None:
    """A check value NumPy hands over (np.int64 is not a JSON number for ``json``) is written as its text on
    every path, so a large decision is still recorded; a shortened event is the same compact JSON form."""
    checks = [Check(f"c{i}", False, np.int64(i), ">= 1", "d" * 400) for i in range(20)]  # type: ignore[arg-type]
    for reason in ("short", "r" * 6000):
        event = dict(_decision(checks=checks).to_event(), reason=reason)
        text = promotion._compact(event)
        read = json.loads(text)
        assert len(text) <= 5000 and [ch["value"] for ch in read["checks"]] == [str(i) for i in range(20)]
        assert text == json.dumps(read, separators=(",", ":"))  # no spaces: the limit is spent on content


# --- reading decisions back -----------------------------------------------------------------------------------


def test_a_pending_promotion_reads_missing_event_fields_as_empty(registry: tuple[Settings, Any]) -> None:
    """A promotion event that names only its outcome and champion (written by hand or by an older release)
    reads back as a promotion with no checks, no author or date, no metrics, not forced; a forced one as
    forced."""
    settings, c = registry
    c.set_model_version_tag(NAME, "3", "promotion.status", "promoted")
    c.set_model_version_tag(
        NAME, "3", "promotion.event.x", json.dumps({"status": "promoted", "previous_champion": "1"})
    )
    assert promotion._pending_promotion(c, settings, "3", "1") == GateDecision(
        NAME, "3", True, [], decided_by="", decided_at="", previous_champion="1", forced=False, metrics={}
    )
    forced = {"status": "promoted", "previous_champion": "1", "forced": True, "decided_at": "2026"}
    c.set_model_version_tag(NAME, "3", "promotion.event.y", json.dumps(forced))
    read = promotion._pending_promotion(c, settings, "3", "1")
    assert read is not None and read.forced and read.decided_at == "2026"


def test_history_is_this_models_decisions_in_time_order(registry: tuple[Settings, Any]) -> None:
    """``promotion_history`` lists every readable decision of this model only, oldest first, and versions
    decided at the same instant by version number (10 after 9); an unreadable event skips itself only."""
    settings, c = registry
    late = _decision(version="1", decided_at="2026-01-05T00:00:00.000+00:00", note="n" * 4500)
    early = _decision(version="2", decided_at="2026-01-01T00:00:00.000+00:00")
    promotion._record(c, settings, late)
    promotion._record(c, settings, early)
    c.set_model_version_tag(NAME, "3", "promotion.event.0bad", "{not json")
    same = "2026-01-03T00:00:00.000+00:00"
    for v in ("10", "9"):
        c.set_model_version_tag(
            NAME, "3", f"promotion.event.{v}", json.dumps({"version": v, "decided_at": same})
        )
    c.create_registered_model("another-model")
    other = c.create_model_version("another-model", source="x")
    c.set_model_version_tag("another-model", other.version, "promotion.event.z", _dumps(early.to_event()))
    # The reason tag keeps the first 4000 characters; the event (compacted) and the description the rest.
    assert _tags(c, "1")["promotion.reason"] == "n" * 4000
    history = promotion.promotion_history(settings)
    assert [(e["version"], e["decided_at"][:10]) for e in history] == [
        ("2", "2026-01-01"),
        ("9", "2026-01-03"),
        ("10", "2026-01-03"),
        ("1", "2026-01-05"),
    ]


def test_an_alias_that_cannot_move_says_how_to_finish(registry: tuple[Settings, Any]) -> None:
    """The decision is recorded before the alias moves; when the move fails the error says so and names the
    command that finishes it."""
    settings, c = registry
    with pytest.raises(
        RuntimeError, match=r"could not move the 'champion' alias .*`btc-anomaly promote 99` again"
    ):
        promotion._move_alias(c, settings, _decision(version="99", promoted=True))
