"""The promotion gate's pure logic: numbers and decisions in, checks and records out.

Everything that touches the registry (the checks on real challengers, the order of registry writes, a
half-done promotion finished by a re-run) runs against the real MLflow server in
tests/integration/test_gate_checks.py and tests/integration/test_model_lifecycle.py.
"""

from __future__ import annotations

import json
import math
from typing import Any

from btc_anomaly.model import promotion
from btc_anomaly.model.promotion import Check, GateDecision

# --- the decision's reason and record -------------------------------------------------------------------

PASS = Check("canaries", True, 1.0, ">= 0.8", "5/5 canaries flagged")
FAIL = Check("reference_stability", False, 0.2, "<= 0.05", "20.0% of 500 reference transactions flagged")
FAIL2 = Check("min_train_rows", False, 20, ">= 1000", "trained on 20 rows (minimum 1,000)")


def _decision(checks: list[Check], promoted: bool, **kw: Any) -> GateDecision:
    return GateDecision("m", "2", promoted, checks, "ci@test", "2026-01-01T00:00:00.000+00:00", **kw)


def test_reason_names_every_failed_check_and_only_those() -> None:
    refused = _decision([PASS, FAIL, FAIL2], False)
    assert refused.failed == [FAIL, FAIL2]
    assert refused.reason == (
        "reference_stability: 20.0% of 500 reference transactions flagged; "
        "min_train_rows: trained on 20 rows (minimum 1,000)"
    )
    assert refused.summary == f"refused m v2: {refused.reason}"
    assert _decision([PASS, PASS], True).reason == "all 2 checks passed"
    forced = _decision([PASS, FAIL], True, forced=True)
    assert forced.reason == "forced despite: reference_stability: 20.0% of 500 reference transactions flagged"
    assert _decision([], True, note="already the champion").reason == "already the champion"


def test_event_carries_the_decision_and_every_check() -> None:
    event = _decision([PASS, FAIL], False, previous_champion="1", metrics={"x": 1.5}).to_event()
    assert event["status"] == "refused" and event["previous_champion"] == "1"
    assert [c["name"] for c in event["checks"]] == ["canaries", "reference_stability"]
    assert event["checks"][1]["passed"] is False and event["metrics"] == {"x": 1.5}
    assert json.loads(promotion._compact(event)) == event


def test_compact_event_fits_the_tag_limit_and_stays_json() -> None:
    """A decision whose reason alone passes MLflow's 5000-character tag limit (a long benchmark error) is
    still a readable event: before the fix its JSON was cut mid-string and promotion_history skipped it."""
    small = _decision([PASS, FAIL], False).to_event()
    assert json.loads(promotion._compact(small)) == small  # fits: unchanged
    long = Check("benchmark", False, None, "x", "benchmark evaluation failed: " + "e" * 6000)
    event = _decision([PASS, long], False, previous_champion="1").to_event()
    text = promotion._compact(event)
    assert len(text) <= 5000
    slim = json.loads(text)
    assert {k: slim[k] for k in ("version", "status", "decided_at", "previous_champion")} == {
        "version": "2",
        "status": "refused",
        "decided_at": "2026-01-01T00:00:00.000+00:00",
        "previous_champion": "1",
    }
    assert [(c["name"], c["passed"]) for c in slim["checks"]] == [("canaries", True), ("benchmark", False)]
    assert "detail" not in slim["checks"][1]  # details go first
    assert event["reason"].startswith(slim["reason"].rstrip("…")) and slim["reason"].endswith("…")


def test_description_keeps_its_first_line_and_drops_the_oldest_decisions() -> None:
    text = "trained on 5,274 rows"
    for i in range(200):
        text = promotion._append(text, f"[{i:04d}] REFUSED by ci: " + "x" * 40)
    assert len(text) <= 5000
    lines = text.splitlines()
    assert lines[0] == "trained on 5,274 rows"
    assert lines[-1].startswith("[0199]")
    numbers = [int(line[1:5]) for line in lines[1:]]
    assert numbers == sorted(numbers) and numbers[0] > 0  # the oldest went first, the order kept


# --- the benchmark check (pure logic: numbers in, Check out) -------------------------------------------------

CHAMP = {"canonical.roc_auc": 0.960, "canonical.precision_at_50": 0.90, "summary.roc_auc": 0.940}


def _bench(challenger: dict[str, float] | None, champion: dict[str, float] | None, **kw: Any) -> Check:
    return promotion.benchmark_check(challenger, champion, tolerance=0.02, min_roc_auc=0.90, **kw)


def test_benchmark_within_tolerance_passes() -> None:
    mine = {"canonical.roc_auc": 0.945, "canonical.precision_at_50": 0.88, "summary.roc_auc": 0.935}
    check = _bench(mine, CHAMP)
    assert check.passed and check.name == "benchmark"
    assert check.value == 0.945
    assert "within 0.02 of the champion" in check.detail
    assert _bench(CHAMP, None).passed  # no champion: only the floor


def test_benchmark_regression_beyond_tolerance_is_refused_with_both_values() -> None:
    mine = dict(CHAMP, **{"canonical.precision_at_50": 0.86})
    check = _bench(mine, CHAMP)
    assert not check.passed
    assert "canonical precision at 50 0.8600" in check.detail
    assert "champion's 0.9000" in check.detail and "tolerance 0.02" in check.detail
    assert "ROC-AUC" not in check.detail  # only the metric that regressed is named

    worse = dict(CHAMP, **{"summary.roc_auc": 0.90, "canonical.roc_auc": 0.93})
    detail = _bench(worse, CHAMP).detail
    assert "8-field ROC-AUC 0.9000" in detail and "canonical ROC-AUC 0.9300" in detail


def test_benchmark_floor_applies_without_and_with_a_champion() -> None:
    low = {"canonical.roc_auc": 0.85, "canonical.precision_at_50": 0.9, "summary.roc_auc": 0.9}
    check = _bench(low, None)
    assert not check.passed and "below the floor 0.9" in check.detail
    weak_champion = {"canonical.roc_auc": 0.86, "canonical.precision_at_50": 0.9, "summary.roc_auc": 0.9}
    assert not _bench(low, weak_champion).passed  # as good as the champion, still under the floor
    assert not _bench(dict(low, **{"canonical.roc_auc": math.nan}), None).passed


def test_benchmark_errors() -> None:
    failed = _bench(None, None, error="FileNotFoundError: benchmark.jsonl.gz")
    assert not failed.passed and failed.value is None
    assert failed.detail == "benchmark evaluation failed: FileNotFoundError: benchmark.jsonl.gz"
    # A champion that cannot be evaluated does not block a challenger that clears the floor.
    ok = _bench(CHAMP, None, champion_error="ValueError: feature version 1")
    assert ok.passed and "champion not comparable (ValueError: feature version 1)" in ok.detail
    # A path the champion has no number for is not compared.
    assert _bench(
        dict(CHAMP, **{"summary.roc_auc": 0.5}), dict(CHAMP, **{"summary.roc_auc": math.nan})
    ).passed
