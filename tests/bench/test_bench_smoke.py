"""Every benchmark still runs: ``python -m bench.<name>`` at a tiny size must exit 0 and print its table.

Benchmarks are run by hand between the runs that write their figures (``make bench``), so nothing else
notices when one rots (``bench_dashboard`` once answered 500 for months). The list of benchmarks is
discovered from ``bench/bench_*.py`` the way ``bench.run_all`` finds them; ``TINY_ARGS`` says how to
run each one small, and a benchmark without an entry fails here, so a new one is covered from day one.

No timing is asserted: the figures at these sizes mean nothing. Benchmarks that need a broker or an
MLflow server get the test session's (``{kafka}``, ``{mlflow}`` in their arguments) instead of starting
their own, and are in the integration tier.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from btc_anomaly.config import PROJECT_ROOT

BENCH = PROJECT_ROOT / "bench"
# Tiny sizes per benchmark. `{kafka}` / `{mlflow}`: the session's broker / MLflow server.
TINY_ARGS: dict[str, list[str]] = {
    "bench_api": ["--smoke", "--mlflow-uri", "{mlflow}"],
    "bench_api_big_tx": ["--quick"],
    "bench_dashboard": ["--rows", "5000", "--repeats", "1", "--files", "2"],
    "bench_detectors": ["--repeats", "1", "--rows", "2000"],
    "bench_lake": ["--rows", "2000", "--requests", "2", "--naive-requests", "1"],
    "bench_producer": ["--messages", "2000", "--repeats", "1", "--bootstrap", "{kafka}"],
    "bench_quality": ["--protocol", "holdout", "--sample-rows", "800"],
    "bench_scoring": ["--repeats", "1", "--rows", "2000"],
    # The latency part waits for the stats query's first write (about a minute): backfill only.
    "bench_stream": [
        *("--only", "backfill", "--messages", "300", "--max-offsets", "300"),
        *("--no-warmup", "--bootstrap", "{kafka}"),
    ],
    "bench_training": ["--rows", "2000"],
}
# Benchmarks that start servers of their own (MLflow, the API): integration tier like the ones above.
OWN_SERVERS = {"bench_api_big_tx"}
TIMEOUT_S = 1100  # wall clock on a shared 2-core machine; the CPU time each one took is printed
TABLE_HEADER = re.compile(r"^\|.+\|\s*$", re.M)
TABLE_RULE = re.compile(r"^\|(?:\s*:?-+:?\s*\|)+\s*$", re.M)


def discovered() -> list[str]:
    """The benchmarks `make bench` runs (``bench.run_all.discover``: every ``bench/bench_*.py``)."""
    return sorted(p.stem for p in BENCH.glob("bench_*.py"))


def _needs_services(name: str) -> bool:
    return name in OWN_SERVERS or any("{" in a for a in TINY_ARGS.get(name, []))


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # finished children: the benchmark and its servers
    return usage.ru_utime + usage.ru_stime


def test_every_benchmark_has_tiny_arguments() -> None:
    missing = sorted(set(discovered()) - set(TINY_ARGS))
    assert not missing, f"add a tiny-size entry to TINY_ARGS in {__file__} for: {missing}"


def printed_table(stdout: str) -> bool:
    return bool(TABLE_HEADER.search(stdout) and TABLE_RULE.search(stdout))


@pytest.mark.timeout(TIMEOUT_S + 100)
@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=[pytest.mark.integration] if _needs_services(n) else []) for n in discovered()],
)
def test_benchmark_runs_at_a_tiny_size(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if name not in TINY_ARGS:
        pytest.fail(f"{name} has no TINY_ARGS entry (see test_every_benchmark_has_tiny_arguments)")
    args = TINY_ARGS[name]
    urls: dict[str, str] = {}
    if any("{kafka}" in a for a in args):
        urls["kafka"] = request.getfixturevalue("kafka_broker").bootstrap
    if any("{mlflow}" in a for a in args):
        urls["mlflow"] = request.getfixturevalue("mlflow_server").url
    # A developer's overrides (lake, ports, registry) must not leak into the benchmark's own setup.
    env = {k: v for k, v in os.environ.items() if not k.startswith("BTC_ANOMALY_")}
    env["TMPDIR"] = str(tmp_path)
    cpu_before = _children_cpu_s()
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", *(a.format(**urls) for a in args)],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    print(f"bench.{name}: {_children_cpu_s() - cpu_before:.1f} s CPU")
    tail = f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"bench.{name} exited {proc.returncode}\n{tail}"
    assert printed_table(proc.stdout), f"bench.{name} printed no table\n{tail}"


def test_printed_table_recognises_the_run_all_format() -> None:
    # The assertion above is only as good as this check: a markdown table yes, a traceback no.
    sys.path.insert(0, str(PROJECT_ROOT))
    try:
        from bench.run_all import format_table
    finally:
        sys.path.remove(str(PROJECT_ROOT))
    assert printed_table(format_table([{"case": "a", "ms": 1.5}]))
    assert not printed_table("Traceback (most recent call last):\n  IndexError: tuple index out of range\n")
    assert not printed_table("(no rows)")
