"""The gate's checks as pure functions: measured numbers in, ``Check`` out, at and just past every limit.

``evaluate`` measures a real bundle and hands the numbers to these builders (test_promotion_logic.py runs it on
the bundle fitted on the sample); here the numbers are chosen by hand, including ones no real forest
produces (scores outside (0, 1], NaN training rates), so every branch of the judgment is reached in
milliseconds. Limits are binary fractions, so a value at the limit is exactly at it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from btc_anomaly.model import promotion
from btc_anomaly.model.promotion import Check

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
