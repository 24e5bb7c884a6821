"""Detection quality on the labelled benchmark: the production detector next to simpler ones.

Trains every candidate of ``btc_anomaly.model.candidates`` (ours, sklearn IsolationForest on the same
features and on the original 8 raw fields, PyOD ECOD / COPOD / HBOS / IForest) on the bundled sample and
scores ``resources/benchmark.jsonl.gz`` under two protocols (holdout; time: trained before block 692,261,
evaluated on it). The same as ``btc-anomaly evaluate --compare``; the markdown table pastes into
bench/RESULTS.md.

    python -m bench.bench_quality [--seed N] [--benchmark PATH]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from btc_anomaly.model.candidates import Comparison, compare
from btc_anomaly.model.evaluate import load_benchmark


def run(seed: int = 0, benchmark: Path | None = None) -> Comparison:
    return compare(seed=seed, benchmark=load_benchmark(benchmark))


def main(seed: int = 0) -> list[dict[str, Any]]:
    """Rows for ``bench.run_all``."""
    return run(seed).records()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--benchmark", type=Path, default=None, help="default: the bundled benchmark")
    args = parser.parse_args()
    started = time.perf_counter()
    result = run(args.seed, args.benchmark)
    print(result.table())
    print(f"seed {args.seed}; {len(result.rows)} rows in {time.perf_counter() - started:.1f} s")
