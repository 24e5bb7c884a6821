"""Run every ``bench/bench_*.py`` module's ``main()`` and print its table.

``python -m bench.run_all [NAME ...]`` runs all benchmarks, or only those whose module name contains one
of the NAMEs (``python -m bench.run_all producer``).
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def speed_probe_ms() -> float:
    """A fixed pure-Python loop, best of 5, in ms: this VM's speed drifts by up to ~1.7x within a session,
    so a run's figures are read next to it (and next to the naive baseline of the same run)."""

    def loop() -> float:
        started, total = time.perf_counter(), 0
        for i in range(2_000_000):
            total += i
        return time.perf_counter() - started

    return min(loop() for _ in range(5)) * 1e3


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table (pastes straight into RESULTS.md); columns in first-seen order."""
    if not rows:
        return "(no rows)"
    columns: list[str] = []
    for row in rows:
        columns.extend(c for c in row if c not in columns)

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
        if isinstance(value, int):
            return f"{value:,}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines.extend("| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows)
    return "\n".join(lines)


def discover(filters: Sequence[str] = ()) -> list[str]:
    names = sorted(p.stem for p in Path(__file__).parent.glob("bench_*.py"))
    return [n for n in names if not filters or any(f in n for f in filters)]


def main(argv: Sequence[str] | None = None) -> int:
    filters = list(sys.argv[1:] if argv is None else argv)
    failed = 0
    for name in discover(filters):
        module = importlib.import_module(f"bench.{name}")
        print(f"\n## {name}\n", flush=True)
        started = time.perf_counter()
        try:
            rows = module.main()
        except Exception as exc:  # one broken benchmark should not hide the others' numbers
            failed += 1
            print(f"FAILED: {type(exc).__name__}: {exc}", flush=True)
            continue
        print(format_table(rows))
        print(f"\n({time.perf_counter() - started:.0f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
