"""Kill rate per module of the last `make mutation` run (mutmut's results under mutants/).

A mutant counts as killed when a test failed, crashed or timed out under it. Mutants listed in
``EQUIVALENT`` behave exactly like the original code (no test can tell them apart) and leave the
denominator; every other survivor, and every mutant no selected test reaches, counts against the score.
Exit status 1 when a module kills less than ``TARGET`` of its mutants.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mutmut.stats import status_by_exit_code

TARGET = 0.90
ROOT = Path(__file__).resolve().parents[1]

# mutant name -> why no test can kill it.
EQUIVALENT: dict[str, str] = {}


def module_of(meta: Path) -> str:
    return str(meta.relative_to(ROOT / "mutants" / "src")).removesuffix(".meta")


def main() -> int:
    metas = sorted((ROOT / "mutants" / "src").rglob("*.py.meta"))
    if not metas:
        print("no mutmut results under mutants/: run `make mutation` first", file=sys.stderr)
        return 2
    header = f"{'module':<38} {'mutants':>7} {'killed':>7} {'survived':>8} {'no test':>7} {'equiv.':>6} {'score':>7} {'time s':>7}"
    print(header)
    print("-" * len(header))
    failing, survivors = [], []
    for meta in metas:
        data = json.loads(meta.read_text())
        statuses = {k: status_by_exit_code[v] for k, v in data["exit_code_by_key"].items()}
        equivalent = [k for k in statuses if k in EQUIVALENT]
        killed = sum(s in ("killed", "timeout", "segfault") for s in statuses.values())
        survived = [k for k, s in statuses.items() if s == "survived" and k not in EQUIVALENT]
        untested = [k for k, s in statuses.items() if s == "no tests"]
        unchecked = [k for k, s in statuses.items() if s == "not checked"]
        counted = len(statuses) - len(equivalent)
        score = killed / counted if counted else 1.0
        seconds = sum(data.get("durations_by_key", {}).values())
        name = module_of(meta)
        print(
            f"{name:<38} {len(statuses):>7} {killed:>7} {len(survived):>8} {len(untested):>7} "
            f"{len(equivalent):>6} {score:>7.1%} {seconds:>7.0f}"
            + (f"  ({len(unchecked)} not run)" if unchecked else "")
        )
        if score < TARGET:
            failing.append(name)
        survivors += survived + untested
    if EQUIVALENT:
        print("\nequivalent mutants (excluded):")
        for k, why in sorted(EQUIVALENT.items()):
            print(f"  {k}: {why}")
    if survivors:
        print(f"\n{len(survivors)} mutants not killed (`mutmut show <name>` prints one):")
        for k in survivors:
            print(f"  {k}")
    if failing:
        print(f"\nbelow {TARGET:.0%}: {', '.join(failing)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
