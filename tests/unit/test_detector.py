"""Behaviour of the detector (tails + forest, one calibrated score) on the bundled real sample.

Properties, checked with hypothesis over real transactions of the sample:
* monotone tails: moving a transaction further into the tail of any heavy-tailed feature (beyond the
  forest's clip point) never lowers its score;
* past the training range on any tail feature, or a fee rate below the minimum relay fee, is flagged;
* reasons agree with the label: "above/below every transaction of the training window" only on flagged rows;
* the stream (``score_frame``) and the API (``inference.predict``) give the same score, label, reasons
  and risk through the one core.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from btc_anomaly.api import inference
from btc_anomaly.api.schemas import ITEM_ADAPTER
from btc_anomaly.config import Settings
from btc_anomaly.features import FEATURES_FULL, TAIL_FEATURES, compute_features
from btc_anomaly.model import core
from btc_anomaly.model.scoring import score_frame
from btc_anomaly.model.tails import EmpiricalTail
from helpers.api_server import sample_bundle, sample_records, served_sample_model

COL = {f: i for i, f in enumerate(FEATURES_FULL)}
UPPER = [f for f, d in TAIL_FEATURES.items() if d in ("upper", "both")]
LOWER = [f for f, d in TAIL_FEATURES.items() if d in ("lower", "both")]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@lru_cache(maxsize=1)
def _frame() -> pd.DataFrame:
    return pd.DataFrame([r for r in sample_records() if not r["is_coinbase"]]).reset_index(drop=True)


@lru_cache(maxsize=1)
def _matrix() -> np.ndarray:
    return compute_features(_frame())[FEATURES_FULL].to_numpy(dtype=np.float64)


def _score(matrix: np.ndarray, market: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    m = sample_bundle().score_matrix(matrix, market)
    return m.score, m.score > m.threshold


def test_empirical_tail_counts_and_extrapolates() -> None:
    tail = EmpiricalTail.fit(np.array([1.0, 2.0, 2.0, 3.0, 10.0]))
    assert tail.upper(np.array([10.0]))[0] == pytest.approx(-math.log10(1 / 5))
    assert tail.upper(np.array([2.0]))[0] == pytest.approx(-math.log10(4 / 5))
    assert tail.lower(np.array([1.0]))[0] == pytest.approx(-math.log10(1 / 5))
    beyond = tail.upper(np.array([10.0, 11.0, 20.0, 1000.0]))
    assert (np.diff(beyond) > 0).all()  # past the maximum the evidence keeps growing
    below = tail.lower(np.array([1.0, 0.0, -5.0]))
    assert (np.diff(below) > 0).all()


@SETTINGS
@given(
    row=st.integers(0, 4000),
    feature=st.sampled_from(UPPER),
    steps=st.lists(st.floats(0.0, 3.0), min_size=2, max_size=6),
)
def test_moving_further_into_an_upper_tail_never_lowers_the_score(row, feature, steps) -> None:
    X = _matrix()
    row %= len(X)
    det = sample_bundle().detectors["full"]
    j = det.forest_feature_names.index(feature) if feature in det.forest_feature_names else None
    start = X[row, COL[feature]]
    if j is not None:
        start = max(start, det.clip_high[j])
    values = start + np.cumsum(steps)
    rows = np.repeat(X[row : row + 1], len(values), axis=0)
    rows[:, COL[feature]] = values
    score, _ = _score(rows)
    assert (np.diff(score) >= 0).all(), (feature, values, score)


@SETTINGS
@given(row=st.integers(0, 4000), steps=st.lists(st.floats(0.0, 2.0), min_size=2, max_size=6))
def test_moving_further_into_the_low_fee_tail_never_lowers_the_score(row, steps) -> None:
    X = _matrix()
    row %= len(X)
    det = sample_bundle().detectors["full"]
    j = det.forest_feature_names.index("log_fee_rate")
    values = np.maximum(min(X[row, COL["log_fee_rate"]], det.clip_low[j]) - np.cumsum(steps), 0.0)
    rows = np.repeat(X[row : row + 1], len(values), axis=0)
    rows[:, COL["log_fee_rate"]] = values
    score, _ = _score(rows)
    assert (np.diff(score) >= 0).all(), (values, score)


@SETTINGS
@given(row=st.integers(0, 4000), feature=st.sampled_from(UPPER), beyond=st.floats(1e-3, 5.0))
def test_past_the_training_range_is_flagged(row, feature, beyond) -> None:
    X = _matrix()
    row %= len(X)
    bundle = sample_bundle()
    maximum = bundle.detectors["full"].tails.tails[feature].maximum
    x = X[row : row + 1].copy()
    x[0, COL[feature]] = maximum + beyond
    _, flagged = _score(x)
    assert flagged[0], (feature, maximum + beyond)


@SETTINGS
@given(row=st.integers(0, 4000), rate=st.floats(0.0, 0.999), market=st.sampled_from([None, 2.0, 60.0, 400.0]))
def test_zero_and_below_relay_fees_are_flagged(row, rate, market) -> None:
    X = _matrix()
    row %= len(X)
    x = X[row : row + 1].copy()
    x[0, COL["log_fee_rate"]] = math.log1p(rate)
    _, flagged = _score(x, market)
    assert flagged[0]


def test_a_dearer_fee_market_does_not_flag_its_ordinary_fees() -> None:
    """The same fee rates read against a market four times dearer than their own: a model trained in a
    cheap week does not flag the next expensive one wholesale (the flag rate stays near the contamination)."""
    frame = _frame()
    block = frame[frame["block_height"] == 692261].reset_index(drop=True)
    X = compute_features(block)[FEATURES_FULL].to_numpy(dtype=np.float64)
    rate = (block["fee"] / block["vsize"]).median()
    X_dear = X.copy()
    X_dear[:, COL["log_fee_rate"]] = np.log1p(np.expm1(X[:, COL["log_fee_rate"]]) * 4)
    _, own = _score(X, rate)
    _, dear = _score(X_dear, rate * 4)
    assert dear.mean() <= max(2 * own.mean(), 0.02)


@SETTINGS
@given(
    rows=st.lists(st.integers(0, 4000), min_size=1, max_size=8),
    feature=st.sampled_from(UPPER + LOWER),
    shift=st.floats(-3.0, 3.0),
)
def test_reasons_agree_with_the_label(rows, feature, shift) -> None:
    """Every row is explained; a reason that places a value beyond every training transaction only ever
    stands on a flagged row, and every flagged row has a reason."""
    frame = _frame()
    X = _matrix()
    rows = [r % len(X) for r in rows]
    bundle = sample_bundle()
    table = core.summary_table(
        frame.loc[rows, "size"].to_numpy(),
        frame.loc[rows, "weight"].to_numpy(),
        frame.loc[rows, "fee"].tolist(),
        frame.loc[rows, "input_count"].to_numpy(),
        frame.loc[rows, "output_count"].to_numpy(),
        frame.loc[rows, "input_value"].tolist(),
        frame.loc[rows, "output_value"].tolist(),
    )
    batch = core.score_batch(bundle, table, summary=np.ones(len(rows), dtype=bool))
    batch.matrix[:, COL[feature]] = np.maximum(batch.matrix[:, COL[feature]] + shift, 0.0)
    scores = bundle.score_matrix(batch.matrix)
    batch.scores = scores
    reasons = core.explain_batch(bundle, batch, np.arange(len(rows)), top_k=3)
    for r in range(len(rows)):
        texts = [i["reason"] for i in reasons.get(r, [])]
        flagged = bool(scores.score[r] > scores.threshold[r])
        if any("every transaction of the training window" in t for t in texts):
            assert flagged, texts
        if flagged:
            assert texts


def test_stream_and_api_agree_through_the_one_core() -> None:
    records = sample_records()[:800]
    served = served_sample_model()
    frame = pd.DataFrame(records)
    expected = score_frame(frame, served.model, explain="all", settings=Settings(), market=25.0)
    inference.set_market(lambda: 25.0)
    try:
        got = inference.predict(served, [ITEM_ADAPTER.validate_python(r) for r in records], explain="all")
    finally:
        inference.set_market(None)
    assert [p["anomaly_score"] for p in got] == expected["anomaly_score"].tolist()
    assert [p["is_anomaly"] for p in got] == expected["is_anomaly"].tolist()
    assert [[r["text"] for r in p["reasons"]] for p in got] == [list(r) for r in expected["reasons"]]
    assert [p["risk_score"] for p in got] == expected["risk_score"].tolist()
    assert [p["severity"] for p in got] == expected["severity"].tolist()
    assert [p["rule_hits"] for p in got] == [list(r) for r in expected["rule_hits"]]


def test_training_window_flag_rate_is_the_contamination() -> None:
    bundle = sample_bundle()
    _, flagged = _score(_matrix())
    assert 0.005 <= flagged.mean() <= 0.02
    assert set(bundle.thresholds.values()) == {0.99}
