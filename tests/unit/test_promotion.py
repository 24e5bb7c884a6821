"""The promotion gate's pure logic: numbers and decisions in, checks and records out.

Everything that touches the registry (the checks on real challengers, the order of registry writes, a
half-done promotion finished by a re-run) runs against the real MLflow server in
tests/integration/test_gate_checks.py and tests/integration/test_model_lifecycle.py.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

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


def test_a_champion_without_a_number_is_skipped_for_that_metric_only() -> None:
    """The champion lacks the first metric (NaN) and the second altogether: both are skipped, and the
    comparison goes on to the last one, which regressed."""
    champion = {"canonical.roc_auc": math.nan, "summary.roc_auc": 0.94}
    mine = {"canonical.roc_auc": 0.95, "canonical.precision_at_50": 0.5, "summary.roc_auc": 0.90}
    check = _bench(mine, champion)
    assert check.passed is False
    assert check.detail == "8-field ROC-AUC 0.9000 is 0.0400 below the champion's 0.9400 (tolerance 0.02)"
    fine = _bench(dict(mine, **{"summary.roc_auc": 0.93}), champion)
    assert fine.passed and fine.detail.startswith(
        "canonical ROC-AUC 0.9500 (champion nan), canonical precision at 50 0.5000 (champion nan), "
    )


def test_every_benchmark_problem_is_named_in_order() -> None:
    low = {"canonical.roc_auc": 0.85, "canonical.precision_at_50": 0.9, "summary.roc_auc": 0.94}
    assert _bench(low, CHAMP).detail == (
        "canonical ROC-AUC 0.8500 below the floor 0.9; "
        "canonical ROC-AUC 0.8500 is 0.1100 below the champion's 0.9600 (tolerance 0.02)"
    )


# --- the checks as pure functions: numbers chosen by hand, at and just past every limit -------------------------
# ``evaluate`` measures a real bundle and hands its numbers to these builders (test_promotion_logic.py runs it
# on the bundle fitted on the sample); here the numbers include ones no real forest produces (scores outside
# (0, 1], NaN training rates). Limits are binary fractions, so a value at the limit is exactly at it.

STEP = 2**-20  # one step past a limit, far above float rounding at these magnitudes

# --- min_train_rows -------------------------------------------------------------------------------------------


def test_rows_at_the_minimum_pass_and_one_fewer_fails() -> None:
    assert promotion.rows_check(1000, 1000) == Check(
        "min_train_rows", True, 1000, ">= 1000", "trained on 1,000 rows (minimum 1,000)"
    )
    assert promotion.rows_check(999, 1000) == Check(
        "min_train_rows", False, 999, ">= 1000", "trained on 999 rows (minimum 1,000)"
    )


# --- anomaly_rate -----------------------------------------------------------------------------------------------


def test_rates_at_both_ends_of_the_band_pass() -> None:
    # contamination 0.25, tolerance 2: the band is [0.125, 0.5]; the farther rate is 0.5 (0.25 away).
    check = promotion.anomaly_rate_check({"full": 0.125, "structural": 0.5}, 0.25, 2.0)
    assert check == Check(
        "anomaly_rate",
        True,
        0.5,
        "[0.1250, 0.5000]",
        "full 0.1250, structural 0.5000 within [0.1250, 0.5000]",
    )


@pytest.mark.parametrize(
    ("rates", "value"),
    [
        ({"full": 0.125 - STEP, "structural": 0.25}, 0.125 - STEP),
        ({"full": 0.25, "structural": 0.5 + STEP}, 0.5 + STEP),
    ],
)
def test_a_rate_one_step_outside_the_band_fails(rates: dict[str, float], value: float) -> None:
    check = promotion.anomaly_rate_check(rates, 0.25, 2.0)
    shown = ", ".join(f"{k} {r:.4f}" for k, r in rates.items())
    assert check == Check(
        "anomaly_rate", False, value, "[0.1250, 0.5000]", f"{shown} outside [0.1250, 0.5000]"
    )


def test_the_value_is_the_rate_farthest_from_the_contamination_on_either_side() -> None:
    """One rate below the contamination, one above: the value is the one farther away, here the lower one
    (0.2 is 0.05 from 0.25, 0.27 only 0.02) although it is the smaller and the nearer to 0."""
    below = promotion.anomaly_rate_check({"full": 0.2, "structural": 0.27}, 0.25, 2.0)
    assert (below.passed, below.value) == (True, 0.2)
    above = promotion.anomaly_rate_check({"full": 0.24, "structural": 0.3}, 0.25, 2.0)
    assert (above.passed, above.value) == (True, 0.3)


def test_a_missing_rate_fails_the_check() -> None:
    """A version that recorded no rate for a forest (NaN) is outside any band."""
    check = promotion.anomaly_rate_check({"full": math.nan, "structural": 0.25}, 0.25, 2.0)
    assert check.passed is False
    assert check.detail == "full nan, structural 0.2500 outside [0.1250, 0.5000]"


# --- reference_stability ----------------------------------------------------------------------------------------

SCORES = np.array([0.25, 0.5, 0.75, 1.0])  # 1.0 is the top of (0, 1]: allowed
ONE_FLAGGED = np.array([False, False, True, False])


def test_reference_flag_rate_at_the_limit_passes_and_above_it_fails() -> None:
    assert promotion.reference_check(SCORES, ONE_FLAGGED, 0.25) == Check(
        "reference_stability", True, 0.25, "<= 0.25", "25.0% of 4 reference transactions flagged (max 25.0%)"
    )
    refused = promotion.reference_check(SCORES, ONE_FLAGGED, 0.25 - STEP)
    assert (refused.passed, refused.value) == (False, 0.25)
    assert refused.detail == "25.0% of 4 reference transactions flagged (max 25.0%)"


@pytest.mark.parametrize("bad", [0.0, -0.25, 1.0 + STEP, 1.5, math.nan, math.inf, -math.inf])
def test_a_reference_score_outside_0_1_fails_whatever_the_flag_rate(bad: float) -> None:
    """A forest cannot produce these (its scores are in (0, 1]), a broken bundle or scorer can: the check
    names the cause even though the flag rate is within its limit."""
    scores = SCORES.copy()
    scores[1] = bad
    check = promotion.reference_check(scores, ONE_FLAGGED, 1.0)
    assert check == Check(
        "reference_stability",
        False,
        0.25,
        "<= 1.0",
        "25.0% of 4 reference transactions flagged (max 100.0%); scores out of (0, 1]",
    )


def test_the_smallest_positive_score_is_in_range() -> None:
    scores = np.array([np.nextafter(0.0, 1.0), 1.0])
    assert promotion.reference_check(scores, np.array([False, False]), 0.0).passed


# --- champion_agreement -----------------------------------------------------------------------------------------


def test_agreement_at_the_minimum_passes_below_it_fails_and_no_champion_passes() -> None:
    assert promotion.agreement_check(0.75, 0.75) == Check(
        "champion_agreement",
        True,
        0.75,
        ">= 0.75",
        "Spearman 0.750 with the champion on the reference set (min 0.75)",
    )
    below = promotion.agreement_check(0.75 - STEP, 0.75)
    assert (below.passed, below.value) == (False, 0.75 - STEP)
    assert promotion.agreement_check(None, 0.75) == Check(
        "champion_agreement", True, None, "n/a", "no champion yet"
    )


# --- canaries ---------------------------------------------------------------------------------------------------

HASHES = [c * 64 for c in "abcd"]


def test_canaries_at_the_minimum_pass_and_name_the_missed_ones() -> None:
    flags = np.array([True, False, True, False])
    assert promotion.canary_check(HASHES, flags, 0.5) == Check(
        "canaries", True, 0.5, ">= 0.5", "2/4 canaries flagged (missed bbbbbbbbbbbb, dddddddddddd)"
    )
    refused = promotion.canary_check(HASHES, flags, 0.5 + STEP)
    assert (refused.passed, refused.value) == (False, 0.5)


def test_canary_hashes_and_flags_of_different_lengths_are_refused() -> None:
    """Hashes and flags are paired one to one: a flag missing (or extra) is an error, never a silently
    shorter list of missed canaries."""
    with pytest.raises(ValueError, match="zip"):
        promotion.canary_check(HASHES, np.array([True, True, False]), 0.5)


def test_every_canary_flagged_names_none_and_no_canaries_is_a_zero_share() -> None:
    assert promotion.canary_check(HASHES, np.ones(4, dtype=bool), 1.0) == Check(
        "canaries", True, 1.0, ">= 1.0", "4/4 canaries flagged"
    )
    empty = promotion.canary_check([], np.zeros(0, dtype=bool), 0.0)
    assert empty == Check("canaries", True, 0.0, ">= 0.0", "0/0 canaries flagged")


# --- the event tag at the 5000-character limit ------------------------------------------------------------------


def _event(reason: str, n_checks: int = 2) -> dict[str, Any]:
    checks = [
        {"name": f"c{i}", "passed": False, "value": float(i), "limit": ">= 1", "detail": "d" * 40}
        for i in range(n_checks)
    ]
    return {"version": "7", "status": "refused", "reason": reason, "checks": checks, "metrics": {}}


# A hang guard, not a time limit: the cut takes milliseconds, a cut that stops shrinking never ends.
@pytest.mark.timeout(60)
def test_a_shortened_plain_reason_fills_the_tag_exactly() -> None:
    """The reason keeps as much as fits: with one-character-per-character text the event is exactly 5000
    characters (one more reason character would not fit), the marker included."""
    text = promotion._compact(_event("r" * 6000))
    assert len(text) == 5000
    event = json.loads(text)
    assert event["reason"].endswith("…") and set(event["reason"][:-1]) == {"r"}
    assert event["checks"] == [{"name": f"c{i}", "passed": False, "value": float(i)} for i in range(2)]


@pytest.mark.timeout(60)
def test_escaped_characters_are_cut_until_the_event_fits() -> None:
    """A quote takes two characters in JSON, so a pass can cut more than needed: the event still fits, stays
    JSON and keeps most of the room."""
    reason = ('"' + "r" * 9) * 600
    text = promotion._compact(_event(reason))
    event = json.loads(text)
    assert 4800 <= len(text) <= 5000  # the cut tail held about one quote in ten: ~10 % too much
    assert event["reason"].endswith("…") and reason.startswith(event["reason"][:-1])


@pytest.mark.timeout(60)
def test_an_event_too_large_without_its_reason_gives_up_the_reason_and_stays_json() -> None:
    """So many checks that even the slim event passes the limit: the reason is emptied to its marker and the
    cut stops there; the JSON stays whole (the registry then refuses the tag, loudly)."""
    event = _event("a short reason", n_checks=200)
    text = promotion._compact(event)
    slim = json.loads(text)
    assert len(text) > 5000 and slim["reason"] == "…"
    assert slim["checks"] == [{"name": f"c{i}", "passed": False, "value": float(i)} for i in range(200)]
