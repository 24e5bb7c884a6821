"""Training cost on 1M transactions: features + both forests, as ``btc-anomaly train`` runs them.

The bundled sample (5,274 real transactions) is looped to ``rows`` rows with a fresh hash per copy,
as a pandas frame shaped like the Delta reader's output (nested inputs/outputs as Python objects).
Timed steps, each once (they are seconds long; run-to-run noise on this machine is a few percent):

* ``features``: ``compute_features`` on the pandas frame (Arrow conversion of the nested lists included).
* ``fit (ours)``: ``fit_bundle``: full + structural forests, the training set scored once by the compiled
  scorer to set ``offset_``, quantile stats for explanations, routed anomaly rate.
* baseline ``sklearn fit, contamination=0.01``: the plain estimator on the full-feature matrix, which
  scores the whole training set with sklearn to set ``offset_`` (one forest only).

    python -m bench.bench_training [--rows N]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import time
from typing import Any

import numpy as np
import orjson
import pandas as pd

from btc_anomaly.config import PROJECT_ROOT, Settings
from btc_anomaly.features import FEATURES_FULL, compute_features
from btc_anomaly.model.train import fit_bundle

SAMPLE = PROJECT_ROOT / "data" / "sample" / "transactions.jsonl.gz"
TARGET_SECONDS = 60.0


def looped_sample(rows: int) -> pd.DataFrame:
    """The sample repeated to ``rows`` rows; copy k > 0 gets hash sha256(k:hash) so every row is unique."""
    base = pd.DataFrame([orjson.loads(line) for line in gzip.decompress(SAMPLE.read_bytes()).splitlines()])
    reps = -(-rows // len(base))
    idx = np.tile(np.arange(len(base)), reps)[:rows]
    # Column-wise take: the nested lists are shared references, so 1M rows cost little memory.
    frame = base.iloc[idx].reset_index(drop=True)
    copy_no = np.repeat(np.arange(reps), len(base))[:rows]
    frame["hash"] = [
        h if k == 0 else hashlib.sha256(f"{k}:{h}".encode()).hexdigest()
        for k, h in zip(copy_no, frame["hash"], strict=True)
    ]
    return frame


def main(rows: int = 1_000_000) -> list[dict[str, Any]]:
    from sklearn.ensemble import IsolationForest
    from tqdm.auto import tqdm

    settings = Settings()
    with tqdm(total=4, desc="bench_training", disable=None) as bar:
        frame = looped_sample(rows)
        assert frame["hash"].is_unique
        bar.update()

        t0 = time.perf_counter()
        features = compute_features(frame)
        t_features = time.perf_counter() - t0
        bar.update()

        t0 = time.perf_counter()
        _, metrics = fit_bundle(features, settings)
        t_fit = time.perf_counter() - t0
        bar.update()

        X = features[FEATURES_FULL].dropna()
        t0 = time.perf_counter()
        IsolationForest(
            n_estimators=settings.iforest_n_estimators,
            max_samples=settings.iforest_max_samples,
            contamination=settings.iforest_contamination,
            random_state=settings.iforest_random_state,
        ).fit(X)
        t_sklearn = time.perf_counter() - t0
        bar.update()

    total = t_features + t_fit
    return [
        {"step": f"features ({rows:,} tx, pandas in)", "seconds": round(t_features, 2)},
        {
            "step": "fit (ours): full + structural forests, offset, stats",
            "seconds": round(t_fit, 2),
            "notes": f"full {metrics['fit_seconds_full']:.1f} s, structural {metrics['fit_seconds_structural']:.1f} s",
        },
        {
            "step": "features + fit",
            "seconds": round(total, 2),
            "notes": f"target <= {TARGET_SECONDS:.0f} s: {'met' if total <= TARGET_SECONDS else 'MISSED'}",
        },
        {
            "step": "baseline: sklearn fit, contamination=0.01 (full forest only)",
            "seconds": round(t_sklearn, 2),
            "notes": f"ours does both forests in {t_fit / t_sklearn:.2f}x its time",
        },
        {"step": f"anomaly rate {metrics['anomaly_rate']:.4f} on {int(metrics['rows']):,} rows"},
    ]


if __name__ == "__main__":
    from bench.run_all import format_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    print(format_table(main(args.rows)))
