"""Benchmarks: each ``bench_*.py`` module has ``main() -> list[dict]`` returning the rows of its table.

Run all with ``python -m bench.run_all`` (or ``make bench``), one with ``python -m bench.bench_<name>``.
Numbers worth keeping go to bench/RESULTS.md by hand.
"""
