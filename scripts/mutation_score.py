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

_TO_NUMPY = (
    "pd.to_numeric gives float64 (None -> NaN) or a nullable Int64, whose to_numpy renders NA as NaN whatever "
    "the dtype/na_value given, and np.isnan reads int64 too: the same mask"
)
_DTYPES = (
    "keys and days arrive as int64/int32 arrays (Spark's xxhash64, Arrow date32) and Python ints become int64 "
    "either way; equality, ordering and searchsorted do not depend on the width"
)
_SAME_CLIENT = "version_by_alias builds the same client from settings when none is passed"
_POINTS = (
    "every category weight is a multiple of 0.01, so 100 x weight rounds to the same value at any digits"
)

# mutant name -> why no test can kill it (it behaves like the original for every input the code can get).
EQUIVALENT: dict[str, str] = {
    **{
        f"btc_anomaly.features.x_has_prevouts__mutmut_{n}": _TO_NUMPY
        for n in (15, 16, 17, 18, 23, 24, 25, 26)
    },
    **{
        f"btc_anomaly.processing.stored_hashes.x\u01c1StoredHashes\u01c1add__mutmut_{n}": _DTYPES
        for n in (8, 10, 12, 14)
    },
    **{
        f"btc_anomaly.processing.stored_hashes.x\u01c1StoredHashes\u01c1contains__mutmut_{n}": _DTYPES
        for n in (3, 5)
    },
    "btc_anomaly.processing.stored_hashes.x\u01c1StoredHashes\u01c1contains__mutmut_11": (
        "'or' -> 'and' in the early return: with no runs the loop finds nothing, with no keys the search is "
        "empty; the result is the same all-False array"
    ),
    "btc_anomaly.api.body.x_read_body__mutmut_4": "Starlette's Headers.get is case-insensitive",
    **{
        f"btc_anomaly.api.schemas.x_request_schemas__mutmut_{n}": (
            "the item schema is a union of two models, so it always has $defs: the pop default is never used"
        )
        for n in (6, 8)
    },
    "btc_anomaly.model.promotion.x__ensure_description__mutmut_8": (
        "'' -> 'XXXX' as the empty description: '[<timestamp>]' is in neither"
    ),
    "btc_anomaly.model.promotion.x__ensure_description__mutmut_15": "_description_line upper-cases the status",
    **{f"btc_anomaly.model.promotion.x_promote__mutmut_{n}": _SAME_CLIENT for n in (8, 11, 27, 30)},
    **{f"btc_anomaly.detectors.risk.x_details__mutmut_{n}": _POINTS for n in (91, 93, 99)},
}


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
