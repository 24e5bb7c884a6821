"""Run every ``bench/bench_*.py`` module's ``main()`` and print its table.

``python -m bench.run_all [NAME ...]`` runs all benchmarks, or only those whose module name contains one
of the NAMEs (``python -m bench.run_all producer``).

A full run (no NAME) also writes ``bench/results.json``: every benchmark's rows with the machine's load
and speed beside them. The README's benchmark table and ``bench/RESULTS.md``'s headline table are
generated from that file (``bench/headline.py``, ``scripts/update_readme.py``; ``make bench`` does both),
so every headline figure comes from one run, and a unit test fails when the tables are stale.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import platform
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


# Rough minutes of a full run on the project's 2-core machine: the cheapest run first, so a run stopped
# half-way (or on a busy machine) has measured as many benchmarks as it could. Others count 10.
MINUTES = {
    "bench_quality": 1,
    "bench_detectors": 2,
    "bench_scoring": 2,
    "bench_training": 2,
    "bench_producer": 3,
    "bench_api_big_tx": 5,
    "bench_dashboard": 8,
    "bench_api": 20,
    "bench_stream": 30,
}


def discover(filters: Sequence[str] = ()) -> list[str]:
    names = sorted(p.stem for p in Path(__file__).parent.glob("bench_*.py"))
    names.sort(key=lambda n: MINUTES.get(n, 10))
    return [n for n in names if not filters or any(f in n for f in filters)]


RESULTS = Path(__file__).parent / "results.json"


def machine() -> dict[str, Any]:
    """What the figures are read next to: cores, 1/5/15-min load averages, the speed probe."""
    return {
        "cores": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "speed_probe_ms": round(speed_probe_ms(), 1),
    }


def _plain(value: Any) -> Any:
    """JSON for a table cell: numpy scalars become Python numbers."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    filters = list(sys.argv[1:] if argv is None else argv)
    failed = 0
    run: dict[str, Any] = {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "machine_at_start": machine(),
        "benchmarks": {},
    }
    for name in discover(filters):
        module = importlib.import_module(f"bench.{name}")
        print(f"\n## {name}\n", flush=True)
        started = time.perf_counter()
        entry: dict[str, Any] = {"machine_at_start": machine()}
        try:
            rows = module.main()
        except Exception as exc:  # one broken benchmark should not hide the others' numbers
            failed += 1
            print(f"FAILED: {type(exc).__name__}: {exc}", flush=True)
            entry.update(error=f"{type(exc).__name__}: {exc}", rows=[])
        else:
            print(format_table(rows))
            entry["rows"] = rows
        entry["seconds"] = round(time.perf_counter() - started, 1)
        entry["machine_at_end"] = machine()
        run["benchmarks"][name] = entry
        print(f"\n({entry['seconds']:.0f} s)", flush=True)
        if not filters:  # after each benchmark: a run stopped half-way still leaves what it measured
            _write(run, finished=False)
    if not filters:
        _write(run, finished=True)
        print(f"\nwrote {RESULTS}: `python scripts/update_readme.py` regenerates the tables from it")
    return 1 if failed else 0


def _write(run: dict[str, Any], finished: bool) -> None:
    run["machine_at_end"] = machine()
    run["finished"] = finished  # the generated table says when a run did not get to the end
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(run, indent=1, default=_plain) + "\n")
    tmp.replace(RESULTS)


if __name__ == "__main__":
    raise SystemExit(main())
