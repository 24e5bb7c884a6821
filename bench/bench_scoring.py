"""Scoring latency: sklearn ``score_samples`` vs MLflow pyfunc vs our compiled scorer, same forest, same run.

The bundle is fit on the bundled sample (``fit_transactions``); its full detector's IsolationForest
(Settings defaults: 100 trees, 256 samples) is the forest compared, on the clipped forest features it
was trained on. The 100k batch is the sample's feature rows tiled to 100,000. Every case is timed in
the same process, interleaved, and reported as the median of its repeats; ``vs sklearn`` is sklearn's
time divided by the case's (higher = faster than sklearn).

* ``sklearn score_samples``: the fitted estimator (float32 validation + Cython tree walks).
* ``MLflow pyfunc (sklearn flavor)``: the same estimator saved with ``mlflow.sklearn`` (skops) and
  loaded with ``mlflow.pyfunc.load_model``; its predict returns labels (it scores internally).
* ``MLflow pyfunc (our bundle)``: our registered pyfunc (``pyfunc.py``) on a feature frame.
* ``compiled, numba`` / ``compiled, numpy``: ``CompiledForest.anomaly_score`` on a float32 matrix.
* ``detector (tails + forest)``: ``ModelBundle.score_matrix``: the tail model, the compiled forest (auto
  backend) and the calibration, on the ``FEATURES_FULL`` matrix — the model's whole score.
* ``score_frame``: canonical transactions in → features, both forests, reasons for the anomalies out
  (what the stream and the API run), on the sample's raw transactions (1 tx; 100k = sample tiled).

    python -m bench.bench_scoring [--repeats R] [--rows N]
"""

from __future__ import annotations

import argparse
import gzip
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd

from btc_anomaly.config import PROJECT_ROOT, Settings
from btc_anomaly.features import FEATURES_FULL, compute_features
from btc_anomaly.model.bundle import ModelBundle
from btc_anomaly.model.scorer import numba_available
from btc_anomaly.model.scoring import ChampionModel, score_frame
from btc_anomaly.model.train import fit_transactions

SAMPLE = PROJECT_ROOT / "data" / "sample" / "transactions.jsonl.gz"
BATCH = 100_000


def _median_seconds(fn: Callable[[], Any], repeats: int, inner: int = 1) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def _pyfuncs(bundle: ModelBundle, example: pd.DataFrame, tmp: Path) -> tuple[Any, Any]:
    import mlflow.pyfunc
    import mlflow.sklearn
    from mlflow.models import infer_signature

    from btc_anomaly.model.bundle import SKOPS_TRUSTED
    from btc_anomaly.model.pyfunc import ARTIFACT_KEY, MODEL_CODE

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlflow.sklearn.save_model(
            bundle.sklearn_models["full"], str(tmp / "sk"), skops_trusted_types=SKOPS_TRUSTED
        )
        bundle_dir = bundle.save(tmp / "bundle")
        mlflow.pyfunc.save_model(
            str(tmp / "ours"),
            python_model=str(MODEL_CODE),
            artifacts={ARTIFACT_KEY: str(bundle_dir)},
            signature=infer_signature(example, bundle.score_features(example)),
        )
        return mlflow.pyfunc.load_model(str(tmp / "sk")), mlflow.pyfunc.load_model(str(tmp / "ours"))


def main(repeats: int = 7, batch: int = BATCH) -> list[dict[str, Any]]:
    """``batch``: size of the big batch (the table's "100k" columns; smaller for the smoke test)."""
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    records = [orjson.loads(line) for line in gzip.decompress(SAMPLE.read_bytes()).splitlines()]
    txs = pd.DataFrame(records)
    features = compute_features(txs)
    bundle, _ = fit_transactions(txs, Settings())
    sk = bundle.sklearn_models["full"]
    det = bundle.detectors["full"]
    forest = det.forest
    matrix = features[FEATURES_FULL].dropna().to_numpy(np.float64)
    clipped = det.parts(matrix, bundle.market_reference).forest_input
    full = pd.DataFrame(clipped, columns=det.forest_feature_names)
    reps = -(-batch // len(full))
    big = pd.concat([full] * reps, ignore_index=True).iloc[:batch]
    one = full.iloc[[len(full) // 2]]
    X_big, X_one = big.to_numpy(np.float32), one.to_numpy(np.float32)
    M_big = np.concatenate([matrix] * reps)[:batch]
    M_one = matrix[[len(matrix) // 2]]
    example = features[FEATURES_FULL].dropna().iloc[:5].reset_index(drop=True)
    tx_one = txs.iloc[[len(txs) // 2]]
    tx_big = pd.concat([txs] * (-(-batch // len(txs))), ignore_index=True).iloc[:batch]
    model = ChampionModel(bundle=bundle, name="bench", version="0", run_id=None)
    settings = Settings()

    cases: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
        "sklearn score_samples": (lambda: sk.score_samples(one), lambda: sk.score_samples(big)),
    }
    with tempfile.TemporaryDirectory(prefix="bench-scoring-") as tmp:
        sk_pyfunc, our_pyfunc = _pyfuncs(bundle, example, Path(tmp))
        cases["MLflow pyfunc (sklearn flavor)"] = (
            lambda: sk_pyfunc.predict(one),
            lambda: sk_pyfunc.predict(big),
        )
        frame_one = pd.DataFrame(M_one, columns=FEATURES_FULL)
        frame_big = pd.DataFrame(M_big, columns=FEATURES_FULL)
        cases["MLflow pyfunc (our bundle)"] = (
            lambda: our_pyfunc.predict(frame_one),
            lambda: our_pyfunc.predict(frame_big),
        )
        backends = (["numba"] if numba_available() else []) + ["numpy"]
        for backend in backends:

            def run(X: np.ndarray, backend: str = backend) -> np.ndarray:
                forest.backend = backend  # type: ignore[assignment]
                return forest.anomaly_score(X)

            cases[f"compiled, {backend}"] = (lambda run=run: run(X_one), lambda run=run: run(X_big))

        def detector(M: np.ndarray) -> Any:
            forest.backend = "auto"  # the compiled cases above switch the same forest's backend
            return bundle.score_matrix(M)

        cases["detector (tails + forest)"] = (lambda: detector(M_one), lambda: detector(M_big))
        cases["score_frame (features+score+reasons)"] = (
            lambda: score_frame(tx_one, model, explain="all", settings=settings),
            lambda: score_frame(tx_big, model, settings=settings),
        )

        # Parity on the 100k batch before timing anything.
        forest.backend = "auto"
        diff = float(np.abs(forest.score_samples(X_big) - sk.score_samples(big)).max())
        if diff > 1e-9:
            raise AssertionError(f"compiled forest differs from sklearn by {diff}")

        for one_fn, big_fn in cases.values():  # warm-up: numba cache load, pyfunc first-call paths
            one_fn()
            big_fn()
        results: dict[str, list[float]] = {name: [] for name in cases}
        big_results: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(repeats):  # interleaved, so machine noise hits every case alike
            for name, (one_fn, big_fn) in cases.items():
                results[name].append(_median_seconds(one_fn, 1, inner=50))
                big_results[name].append(_median_seconds(big_fn, 1))
        forest.backend = "auto"

    base_one = statistics.median(results["sklearn score_samples"])
    base_big = statistics.median(big_results["sklearn score_samples"])
    rows = []
    for name in cases:
        t1, tb = statistics.median(results[name]), statistics.median(big_results[name])
        rows.append(
            {
                "case": name,
                "1 tx (ms)": round(t1 * 1e3, 4),
                "1 tx vs sklearn": round(base_one / t1, 1),
                "100k tx (ms)": round(tb * 1e3, 1),
                "100k vs sklearn": round(base_big / tb, 2),
            }
        )
    rows.append({"case": f"parity: max |compiled - sklearn| on 100k = {diff:.1e}"})
    return rows


if __name__ == "__main__":
    from bench.run_all import format_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rows", type=int, default=BATCH, help="big batch size (smoke test: small)")
    args = parser.parse_args()
    print(format_table(main(args.repeats, args.rows)))
