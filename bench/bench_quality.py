"""Detection quality on the labelled benchmark: the production detector next to simpler ones.

Trains every candidate of ``btc_anomaly.model.candidates`` (ours, sklearn IsolationForest on the same
features and on the original 8 raw fields, PyOD ECOD / COPOD / HBOS / IForest) on the bundled sample and
scores ``resources/benchmark.jsonl.gz`` under two protocols (holdout; time: trained before block 692,261,
evaluated on it). The same as ``btc-anomaly evaluate --compare``; the markdown table pastes into
bench/RESULTS.md.

    python -m bench.bench_quality [--seed N] [--benchmark PATH] [--protocol P] [--sample-rows N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from btc_anomaly.model.candidates import PROTOCOLS, Comparison, compare, load_sample
from btc_anomaly.model.evaluate import load_benchmark


def run(
    seed: int = 0,
    benchmark: Path | None = None,
    protocols: tuple[str, ...] = PROTOCOLS,
    sample_rows: int | None = None,
) -> Comparison:
    """``sample_rows``: train on a seeded random subset of the sample (the smoke test's tiny size)."""
    sample = load_sample()
    if sample_rows is not None:
        sample = sample.sample(min(sample_rows, len(sample)), random_state=seed).reset_index(drop=True)
    return compare(seed=seed, benchmark=load_benchmark(benchmark), protocols=protocols, sample=sample)


def main(seed: int = 0) -> list[dict[str, Any]]:
    """Rows for ``bench.run_all``."""
    return run(seed).records()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--benchmark", type=Path, default=None, help="default: the bundled benchmark")
    parser.add_argument(
        "--protocol", choices=PROTOCOLS, action="append", help="only these protocols (default: all)"
    )
    parser.add_argument("--sample-rows", type=int, default=None, help="train on N sample rows (default: all)")
    args = parser.parse_args()
    started = time.perf_counter()
    result = run(args.seed, args.benchmark, tuple(args.protocol or PROTOCOLS), args.sample_rows)
    print(result.table())
    print(f"seed {args.seed}; {len(result.rows)} rows in {time.perf_counter() - started:.1f} s")
