"""The compiled forest equals sklearn's IsolationForest; the bundle, explanations and score_frame work
without MLflow."""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pytest
from sklearn.ensemble import IsolationForest

from btc_anomaly.config import PROJECT_ROOT, Settings
from btc_anomaly.features import FEATURES_FULL, FEATURES_STRUCTURAL, compute_features
from btc_anomaly.ingestion.decode import decode_transaction
from btc_anomaly.model.bundle import ModelBundle
from btc_anomaly.model.explain import reason
from btc_anomaly.model.scorer import CompiledForest, average_path_length, numba_available
from btc_anomaly.model.scoring import SCORED_COLUMNS, ChampionModel, score_frame, scored_arrow_schema
from btc_anomaly.model.train import fit_transactions, parse_duration

SAMPLE = PROJECT_ROOT / "data" / "sample" / "transactions.jsonl.gz"
HEX = Path(__file__).resolve().parents[1] / "fixtures" / "example_tx_15e10745.hex"
BACKENDS = [
    "numpy",
    pytest.param("numba", marks=pytest.mark.skipif(not numba_available(), reason="no numba")),
]


@lru_cache(maxsize=1)
def _sample() -> pd.DataFrame:
    return pd.DataFrame([orjson.loads(line) for line in gzip.decompress(SAMPLE.read_bytes()).splitlines()])


@lru_cache(maxsize=1)
def _features() -> pd.DataFrame:
    return compute_features(_sample())


@lru_cache(maxsize=2)
def _sklearn(kind: str) -> tuple[IsolationForest, pd.DataFrame]:
    F = _features()
    X = F[FEATURES_FULL].dropna() if kind == "full" else F[FEATURES_STRUCTURAL]
    return IsolationForest(n_estimators=100, max_samples=256, contamination=0.01, random_state=7).fit(X), X


@lru_cache(maxsize=1)
def _bundle() -> ModelBundle:
    return fit_transactions(_sample(), Settings())[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["full", "structural"])
def test_parity_with_sklearn_on_all_sample_transactions(kind: str, backend: str) -> None:
    model, X = _sklearn(kind)
    forest = CompiledForest.from_sklearn(model, list(X.columns))
    forest.backend = backend  # type: ignore[assignment]
    want = model.score_samples(X)
    got = forest.score_samples(X)
    assert np.abs(got - want).max() <= 1e-9
    assert np.array_equal(forest.predict(X), model.predict(X))
    # The published mapping: anomaly_score = -score_samples, threshold = -offset_.
    assert np.array_equal(forest.anomaly_score(X), -got)
    assert forest.threshold == -model.offset_
    assert 0 < (forest.anomaly_score(X) > forest.threshold).sum() < len(X)


@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_with_nan_and_feature_subsampling(backend: str) -> None:
    """NaN follows missing_go_to_left; max_features < 1 maps tree features through estimators_features_."""
    _, X = _sklearn("structural")
    model = IsolationForest(n_estimators=40, max_features=0.5, random_state=3).fit(X)
    forest = CompiledForest.from_sklearn(model, list(X.columns))
    forest.backend = backend  # type: ignore[assignment]
    Xn = X.to_numpy().copy()
    Xn[::3, 5] = np.nan
    Xn[::7, 0] = np.nan
    assert (
        np.abs(forest.score_samples(Xn) - model.score_samples(pd.DataFrame(Xn, columns=X.columns))).max()
        <= 1e-9
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_row_and_empty(backend: str) -> None:
    model, X = _sklearn("full")
    forest = CompiledForest.from_sklearn(model, list(X.columns))
    forest.backend = backend  # type: ignore[assignment]
    assert abs(forest.score_samples(X.iloc[[42]])[0] - model.score_samples(X.iloc[[42]])[0]) <= 1e-9
    assert forest.score_samples(X.iloc[:0]).shape == (0,)


def test_save_load_roundtrip(tmp_path: Path) -> None:
    model, X = _sklearn("full")
    forest = CompiledForest.from_sklearn(model, list(X.columns))
    loaded = CompiledForest.load(forest.save(tmp_path / "f.npz"))
    assert loaded.feature_names == forest.feature_names
    assert np.array_equal(loaded.score_samples(X), forest.score_samples(X))
    assert loaded.offset == forest.offset


def test_detector_forest_is_the_stored_sklearn_forest_on_clipped_features() -> None:
    """The compiled forest of a detector scores its clipped input as the sklearn forest stored with it, and
    its offset_ is what sklearn's own fit with that contamination sets."""
    bundle = _bundle()
    det, sk = bundle.detectors["full"], bundle.sklearn_models["full"]
    X = _features()[FEATURES_FULL].dropna().to_numpy()
    Xf = det.parts(X, bundle.market_reference).forest_input
    assert np.abs(sk.score_samples(Xf) + det.forest.anomaly_score(Xf)).max() <= 1e-9
    reference = IsolationForest(n_estimators=100, max_samples=256, contamination=0.01, random_state=42).fit(
        Xf
    )
    assert sk.offset_ == reference.offset_


@pytest.mark.parametrize("backend", BACKENDS)
def test_path_savings_add_up_to_the_score(backend: str) -> None:
    model, X = _sklearn("full")
    forest = CompiledForest.from_sklearn(model, list(X.columns))
    forest.backend = backend  # type: ignore[assignment]
    rows = X.iloc[:25]
    savings = forest.path_savings(rows)
    c_psi = average_path_length(np.array([256.0]))[0]
    mean_depth = forest.path_sums(rows) / forest.n_trees
    np.testing.assert_allclose(savings.sum(axis=1), c_psi - mean_depth, atol=1e-9)
    forest.backend = "numpy"
    np.testing.assert_allclose(savings, forest.path_savings(rows), atol=1e-12)


def test_bundle_routes_rows_without_prevouts_to_the_structural_forest() -> None:
    bundle = _bundle()
    raw = decode_transaction(HEX.read_text())  # real tx, no prevout lookup: fee unknown
    ordinary = _sample()[~_sample()["is_coinbase"]].iloc[:3]
    frame = pd.DataFrame([*ordinary.to_dict("records"), raw.model_dump()])
    scored = bundle.score_features(compute_features(frame))
    assert list(scored["model_kind"]) == ["full", "full", "full", "structural"]
    assert scored["anomaly_score"].between(0, 1).all()
    assert scored.loc[3, "threshold"] == bundle.detectors["structural"].threshold == 0.99


def test_bundle_save_load(tmp_path: Path) -> None:
    bundle = _bundle()
    path = bundle.save(tmp_path / "bundle")
    loaded = ModelBundle.load(path)
    F = _features()
    pd.testing.assert_frame_equal(loaded.score_features(F), bundle.score_features(F))
    sk = ModelBundle.load_sklearn(path, "full")
    X = F[FEATURES_FULL].dropna().to_numpy()
    Xf = loaded.detectors["full"].parts(X, loaded.market_reference).forest_input
    assert np.abs(sk.score_samples(Xf) + bundle.forests["full"].anomaly_score(Xf)).max() <= 1e-9


def test_score_frame_output_and_reasons() -> None:
    bundle = _bundle()
    model = ChampionModel(bundle=bundle, name="btc-anomaly-iforest", version="7", run_id=None)
    out = score_frame(_sample(), model, settings=Settings())
    assert list(out.columns) == SCORED_COLUMNS
    pa.Table.from_pandas(out, schema=scored_arrow_schema(), preserve_index=False)  # Delta/Spark-compatible
    assert (out["model_version"] == "7").all()
    flagged = out[out["is_anomaly"]]
    assert 0.005 < len(flagged) / len(out) < 0.02
    assert flagged["reasons"].map(len).min() >= 1
    assert out.loc[~out["is_anomaly"], "reasons"].map(len).max() == 0
    # The 649-input consolidation is flagged for its size.
    row = out.set_index("hash").loc["eeddf45d97155e07a4bab4ca38f61f405c3b1063ff3328c786ac9d786efab1e7"]
    assert row["is_anomaly"]
    assert {"log_input_count", "log_vsize"} & set(row["top_features"])


def test_reason_text() -> None:
    stats = _bundle().stats["full"]
    fee_rate_99_9 = stats.q("log_fee_rate", 0.999)
    text = reason("log_fee_rate", (fee_rate_99_9 + stats.q("log_fee_rate", 1.0)) / 2, stats, market=10.0)
    assert text.startswith("fee rate ")
    assert "sat/vB is above the 99.9th percentile of the training window" in text
    assert (
        "189.5x the fee market's median (10 sat/vB)" in text
        or "x the fee market's median (10 sat/vB)" in text
    )
    beyond = reason("log_fee_rate", stats.q("log_fee_rate", 1.0) + 1, stats, past_range=True)
    assert "above every transaction of the training window" in beyond
    assert "below the minimum relay fee" in reason("log_fee_rate", 0.0, stats, market=10.0)
    # A share past its training maximum is not claimed to be beyond every transaction: only tail features
    # (which the detector always flags past their range) are.
    assert "every" not in reason("output_hhi", stats.q("output_hhi", 1.0) + 0.5, stats)
    assert "only" in reason("has_op_return", 1.0, stats)


def test_parse_duration() -> None:
    assert parse_duration("30m").total_seconds() == 1800
    assert parse_duration("7d").total_seconds() == 7 * 86400
    with pytest.raises(ValueError):
        parse_duration("soon")
