"""The combined risk score: monotone in every signal (property-based), bounded, reproducible; Mahalanobis
stored with the bundle (old bundles load without it); score_frame / scored_arrow_schema carry it all."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from btc_anomaly.detectors import risk
from btc_anomaly.detectors.rules import RULES
from btc_anomaly.features import compute_features
from btc_anomaly.model.bundle import ModelBundle
from btc_anomaly.model.scoring import SCORED_COLUMNS, ChampionModel, score_frame, scored_arrow_schema
from helpers.detectors import fitted_bundle, record, sample_frame, settings

unit = st.floats(0.0, 1.0, allow_nan=False)
thresholds = st.floats(0.45, 0.9, allow_nan=False)
distances = st.floats(0.0, 200.0, allow_nan=False)
rule_sets = st.lists(st.booleans(), min_size=len(RULES), max_size=len(RULES))
categories = st.sampled_from([*sorted(risk.CATEGORY_WEIGHTS), "something_new"])
watch = st.lists(st.tuples(st.sampled_from(["a1", "a2", "a3", "a4"]), categories), max_size=4)


def _score(s: float, t: float, d: float, hits: list[bool], listed: list[tuple[str, str]]) -> float:
    pf = risk.forest_part(np.array([s]), np.array([t]))
    pm = risk.mahalanobis_part(np.array([d]), 12.0, 32.0)
    weights = [risk.watchlist_weights([{"address": a, "category": c} for a, c in listed])]
    return float(risk.combine(pf, pm, np.array([hits]), weights)[0])


@hsettings(max_examples=300, deadline=None)
@given(
    unit, unit, thresholds, distances, distances, rule_sets, st.integers(0, len(RULES) - 1), watch, categories
)
def test_risk_is_monotone_in_every_signal(
    s1: float,
    s2: float,
    t: float,
    d1: float,
    d2: float,
    hits: list[bool],
    extra_rule: int,
    listed,
    category: str,
) -> None:
    base = _score(min(s1, s2), t, min(d1, d2), hits, listed)
    assert 0.0 <= base < 100.0
    assert _score(max(s1, s2), t, min(d1, d2), hits, listed) >= base  # higher forest score
    assert _score(min(s1, s2), t, max(d1, d2), hits, listed) >= base  # larger distance
    more_rules = list(hits)
    more_rules[extra_rule] = True
    assert _score(min(s1, s2), t, min(d1, d2), more_rules, listed) >= base  # one more rule
    assert _score(min(s1, s2), t, min(d1, d2), hits, [*listed, ("a9", category)]) >= base  # one more address
    # Reproducible: a pure function of its inputs.
    assert _score(min(s1, s2), t, min(d1, d2), hits, listed) == base


def test_severity_bands_and_anchors() -> None:
    assert list(risk.severity_of(np.array([0, 24.99, 25, 49.99, 50, 74.99, 75, 99]))) == [
        "low", "low", "medium", "medium", "high", "high", "severe", "severe"
    ]  # fmt: skip
    # The forest at its threshold is medium; the forest alone never reaches severe.
    assert (
        risk.severity_of(risk.combine(np.array([risk.forest_part(0.6, 0.6)]), np.zeros(1), np.zeros((1, 0))))[
            0
        ]
        == "medium"
    )
    assert _score(1.0, 0.55, 0.0, [False] * len(RULES), []) < 75
    # One sanctioned address is severe on its own.
    assert _score(0.4, 0.6, 0.0, [False] * len(RULES), [("a1", "sanctions")]) >= 75


def test_bundle_stores_mahalanobis_and_old_bundles_still_load(tmp_path: Path) -> None:
    bundle = fitted_bundle()
    assert bundle.mahalanobis is not None and set(bundle.mahalanobis) == {"full", "structural"}
    m = bundle.mahalanobis["full"]
    assert 0 < m.q50 < m.q99 < m.q999
    path = bundle.save(tmp_path / "new")
    loaded = ModelBundle.load(path)
    F = compute_features(sample_frame())
    X = F[m.feature_names].dropna().to_numpy()
    np.testing.assert_array_equal(loaded.mahalanobis["full"].distance(X), m.distance(X))

    old = bundle.save(tmp_path / "old")
    doc = json.loads((old / "bundle.json").read_text())
    del doc["mahalanobis"]  # what every bundle trained before this issue looks like
    (old / "bundle.json").write_text(json.dumps(doc))
    legacy = ModelBundle.load(old)
    assert legacy.mahalanobis is None
    model = ChampionModel(bundle=legacy, name="m", version="1", run_id=None)
    out = score_frame(sample_frame().head(200), model, settings=settings())
    assert out["mahalanobis"].isna().all()
    assert not any("mahalanobis" in s for s in out["signals"])
    assert out["risk_score"].notna().all()


def test_score_frame_carries_the_risk_columns() -> None:
    model = ChampionModel(bundle=fitted_bundle(), name="m", version="3", run_id=None)
    df = sample_frame()
    out = score_frame(df, model, settings=settings())
    assert list(out.columns) == SCORED_COLUMNS
    pa.Table.from_pandas(out, schema=scored_arrow_schema(), preserve_index=False)  # what the stream writes
    assert out["risk_score"].between(0, 100).all()
    assert set(out["severity"]) <= set(risk.SEVERITIES)
    counts = out["severity"].value_counts()
    assert counts["low"] > 0.9 * len(out) and counts.get("severe", 0) < 0.01 * len(out)
    ofac = out.set_index("hash").loc[record("dbf58d5997f7")["hash"]]
    assert ofac["severity"] == "severe"
    assert "watchlist:ofac_sdn" in ofac["signals"]
    assert ofac["watchlist_hits"][0]["address"] == "3HqA7i3ttECLvgqvq69HNxxUP5BL7Z5YgA"
    fee = out.set_index("hash").loc[record("cb17089d2451")["hash"]]
    assert "excessive_fee_share" in fee["rule_hits"] and "rule:excessive_fee_share" in fee["signals"]
    # Reproducible: the same transactions and model give the same risk, in any batch order.
    again = score_frame(df.iloc[::-1], model, settings=settings()).set_index("hash")
    pd.testing.assert_series_equal(
        again.loc[out["hash"], "risk_score"].reset_index(drop=True), out["risk_score"], check_names=False
    )


def test_detectors_off_is_forest_only() -> None:
    model = ChampionModel(bundle=fitted_bundle(), name="m", version="3", run_id=None)
    df = sample_frame().head(500)
    on = score_frame(df, model, settings=settings())
    off = score_frame(df, model, settings=settings(), detectors=False)
    assert list(off.columns) == SCORED_COLUMNS
    assert (off["rule_hits"].map(len) == 0).all() and off["mahalanobis"].isna().all()
    assert (off["risk_score"] <= on["risk_score"] + 1e-9).all()  # more signals never lower the score
    np.testing.assert_array_equal(off["anomaly_score"], on["anomaly_score"])


def test_a_transaction_scores_the_same_alone_and_in_any_batch() -> None:
    model = ChampionModel(bundle=fitted_bundle(), name="m", version="3", run_id=None)
    df = sample_frame()
    batch = score_frame(df.iloc[:300], model, settings=settings()).set_index("hash")
    for i in (0, 7, 123, 299):
        alone = score_frame(df.iloc[[i]], model, settings=settings()).iloc[0]
        row = batch.loc[alone["hash"]]
        assert alone["risk_score"] == row["risk_score"]
        assert alone["mahalanobis"] == row["mahalanobis"]  # bit-identical, not approximately
        assert alone["signals"] == row["signals"]
