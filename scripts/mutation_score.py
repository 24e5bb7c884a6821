"""Kill rate per module of the last `make mutation` run (mutmut's results under mutants/).

A mutant counts as killed when a test failed, crashed or timed out under it. Mutants listed in
``EQUIVALENT`` behave exactly like the original code (no test can tell them apart) and leave the
denominator; every other survivor, and every mutant no selected test reaches, counts against the score.
Exit status 1 when a module kills less than ``TARGET`` of its mutants, or when a mutant listed in
``EQUIVALENT`` did not survive: mutmut numbers mutants in source order, so after an edit a listed
number can name another mutant, and the list has to be renumbered (each entry prints the line it
changes, to check against its reason).
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

_SAT_IN_FLOAT = (
    "values are satoshi amounts up to 21e14 (schema bound), exact in float64 (< 2**53): %, comparisons and "
    "sums give the same answers as on int64"
)
_AS_FLOAT = (
    "the parts, scores, distances and quantiles arrive as float arrays or Python numbers; without the "
    "float64 dtype they stay float, '1.0 - x' and the divisions are float for ints too, and searchsorted "
    "finds the same band for an int or a float"
)
_FALSY = "zero_copy_only=None is falsy: the same as False"
_BOOL_LUT = "a list of Python bools becomes a bool array without the dtype"
_DEFAULT_INT = "np.arange's default integer is int64 on every 64-bit platform NumPy 2 supports"
_NOT_A_BATCH = (
    "a single object is validated by ITEM_ADAPTER, never a list: no too_long error at the root, so the "
    "batch name only _too_many reads is unused"
)
_ERROR_DICT = "include_url/include_input only add keys to each error; _too_many reads type, loc and ctx"
_ACTUAL_LENGTH = (
    "pydantic-core reports actual_length (an int) for every too_long JSON array: the 'more' fallback is "
    "never reached"
)

# market_fee_rates: block heights, window keys and group keys are numbers or missing in every dtype variant.
_HEIGHTS = (
    "block heights as float64 instead of Float64: heights are integers < 2**53 (exact in float64) or "
    "missing, NaN and NA are both missing to notna()/where(), and the key's to_numpy(na_value=nan) renders "
    "both as NaN: the same keys"
)
_NO_HEIGHTS = (
    "the default block_height without the column is all missing: Series(None) (object) or Series() "
    "(float64 NaN) become the same all-NA Float64 heights through to_numeric and astype"
)
_WINDOWS = (
    "window keys as float64 instead of Float64: floored nanosecond timestamps, never missing (astype('int64') "
    "raises on NaT first), so '-1.0 - key' and where() give the same float keys"
)
_NO_WINDOWS = (
    "without a first_seen column every window key is missing, NaN (float64) or NA (Float64/None): "
    "'-1.0 - key', where() and to_numpy(na_value=nan) make them the same NaN keys"
)
_NO_WINDOWS_INDEX = (
    "without a first_seen column the window keys are all missing; a one-row Series (no index) aligned by "
    "where() leaves every other label missing as well: the same NaN keys, also with repeated labels "
    "(test_market_of_a_frame_with_repeated_index_labels)"
)
_KEY_TO_NUMPY = (
    "the key is a Float64 Series: to_numpy gives float64 without the dtype when na_value is NaN, and with "
    "dtype float64 pandas 2.x writes NA as NaN whether na_value is None or not given: the same array"
)
_KEY_OFFSET = (
    "'-1.0 - w' -> 'w - 1' / '-2.0 - w' for the window key w (a multiple of 6e11 ns): one-to-one, so windows "
    "stay apart; they could only meet a block at a height of 599,999,999,998 or more (w = +-6e11 ns), which "
    "the chain cannot reach (one block per ~10 min); 1 - w, the one that meets block 1, is killed"
)

_BENCHMARK_SETTINGS = (
    "bundle_scorer(bundle, None) builds its scorer from get_settings(): Settings only choose the risk "
    "detectors, watchlists and explain_top_k, and the three benchmark numbers rank by the forest's "
    "anomaly_score (the same with risk_detectors=False: 0.99304/1.0/0.98576 on the tests' benchmark)"
)

# mutant name -> why no test can kill it (it behaves like the original for every input the code can get).
EQUIVALENT: dict[str, str] = {
    **{
        f"btc_anomaly.features.x_has_prevouts__mutmut_{n}": _TO_NUMPY
        for n in (15, 16, 17, 18, 23, 24, 25, 26)
    },
    **{f"btc_anomaly.features.x_market_fee_rates__mutmut_{n}": _TO_NUMPY for n in (3, 5, 11, 13)},
    "btc_anomaly.features.x_market_fee_rates__mutmut_39": (
        "to_numpy(dtype=bool) -> to_numpy(): after astype('boolean').fillna(False) the flags hold no NA, and "
        "a NA-free nullable boolean array converts to a NumPy bool array without the dtype: the same mask"
    ),
    "btc_anomaly.features.x_market_fee_rates__mutmut_38": (
        "'= np.nan' -> '= None' on a float64 array: NumPy stores None as NaN"
    ),
    "btc_anomaly.features.x_market_fee_rates__mutmut_41": (
        "astype('boolean') -> astype(None), i.e. float64: True/False/None become 1.0/0.0/NaN, fillna(False) "
        "makes NaN 0.0 (no downcast warning on a float column) and to_numpy(dtype=bool) gives the same mask"
    ),
    **{f"btc_anomaly.features.x_market_fee_rates__mutmut_{n}": _HEIGHTS for n in (54, 67)},
    **{f"btc_anomaly.features.x_market_fee_rates__mutmut_{n}": _NO_HEIGHTS for n in (62, 64)},
    **{f"btc_anomaly.features.x_market_fee_rates__mutmut_{n}": _WINDOWS for n in (78, 83)},
    **{f"btc_anomaly.features.x_market_fee_rates__mutmut_{n}": _NO_WINDOWS for n in (86, 88, 89, 91, 93)},
    **{f"btc_anomaly.features.x_market_fee_rates__mutmut_{n}": _NO_WINDOWS_INDEX for n in (87, 90)},
    **{f"btc_anomaly.features.x_market_fee_rates__mutmut_{n}": _KEY_TO_NUMPY for n in (96, 97, 98, 99)},
    **{f"btc_anomaly.features.x_market_fee_rates__mutmut_{n}": _KEY_OFFSET for n in (104, 106)},
    **{
        f"btc_anomaly.features.x_relative_fee_rate__mutmut_{n}": (
            "np.asarray(log_fee_rate) without dtype=float64: a float input of any width (or an int) minus the "
            "float64 log1p of the market is float64, and widening to float64 is exact: the same values"
        )
        for n in (3, 5)
    },
    "btc_anomaly.features.x_market_fee_rates__mutmut_115": (
        "groupby(dropna=None): pandas tests dropna for truth, so None keeps the NaN-key group like False "
        "(test_rows_without_block_or_time_are_one_group passes under it)"
    ),
    "btc_anomaly.features.x_market_fee_rates__mutmut_124": (
        "transform('median') of the float64 rates is float64: to_numpy() gives the same array without the dtype"
    ),
    "btc_anomaly.features.x_market_fee_rates__mutmut_129": (
        "transform('count') is int64: 'count >= MARKET_MIN_ROWS' is the same on int64 as on float64"
    ),
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
    **{f"btc_anomaly.model.promotion.x__benchmark__mutmut_{n}": _BENCHMARK_SETTINGS for n in (2, 25)},
    **{f"btc_anomaly.model.promotion.x__benchmark_numbers__mutmut_{n}": _BENCHMARK_SETTINGS for n in (7, 9)},
    "btc_anomaly.model.promotion.x__benchmark_numbers__mutmut_5": (
        "without paths=, evaluate scores all of PATHS (canonical, summary, raw): the raw path is extra work, "
        "and the three numbers read are the same canonical and summary metrics"
    ),
    "btc_anomaly.model.promotion.x__benchmark__mutmut_22": (
        "champion_error '' instead of None: benchmark_check, its only reader, tests it for truth, and both "
        "are false"
    ),
    **{f"btc_anomaly.model.promotion.x_promote__mutmut_{n}": _SAME_CLIENT for n in (8, 11, 27, 30)},
    **{f"btc_anomaly.detectors.risk.x_details__mutmut_{n}": _POINTS for n in (91, 93, 99)},
    **{
        f"btc_anomaly.detectors.risk.x_{fn}__mutmut_{n}": _AS_FLOAT
        for fn, ns in (
            ("combine", (6, 8, 12, 14)),
            ("forest_part", (11, 13, 25, 27)),
            ("mahalanobis_part", (3, 5, 13, 15)),
            ("severity_of", (10, 12)),
        )
        for n in ns
    },
    "btc_anomaly.detectors.risk.x_combine__mutmut_18": "astype(None) is astype(float64)",
    **{
        f"btc_anomaly.detectors.risk.x_forest_part__mutmut_{n}": (
            "the anomaly score is in [0, 1], so 1 - score never passes 1: the upper clip never binds"
        )
        for n in (4, 14)
    },
    **{f"btc_anomaly.detectors.risk.x_signal_names__mutmut_{n}": _DEFAULT_INT for n in (17, 19)},
    "btc_anomaly.detectors.rules.x__script_flags__mutmut_7": (
        "'<= SMALL' -> '< SMALL': at exactly SMALL elements the dictionary path runs instead of the Python "
        "scan; both give the same flags (test_large_batches_read_scripts_through_the_dictionary_with_nulls)"
    ),
    "btc_anomaly.detectors.rules.x__script_flags__mutmut_6": (
        "np.zeros(0) -> np.zeros(1) for a batch without outputs (or inputs): the flags only weigh bincounts "
        "over no elements, which ignore the weights, and broadcast away against the empty value array"
    ),
    "btc_anomaly.detectors.rules.x__script_flags__mutmut_13": (
        "np.fromiter's count only preallocates: the array is the same without it"
    ),
    **{f"btc_anomaly.detectors.rules.x__script_flags__mutmut_{n}": _BOOL_LUT for n in (18, 20)},
    "btc_anomaly.detectors.rules.x__script_flags__mutmut_32": _FALSY,
    "btc_anomaly.detectors.rules.x__script_flags__mutmut_33": (
        "zero_copy_only=True: the indices have no nulls left (fill_null) and are a plain integer array, "
        "which converts without a copy"
    ),
    "btc_anomaly.detectors.rules.x_evaluate__mutmut_33": _SAT_IN_FLOAT,
    "btc_anomaly.detectors.rules.x_evaluate__mutmut_34": _FALSY,
    "btc_anomaly.detectors.rules.x_evaluate__mutmut_38": (
        "zero_copy_only=True: output values are int64 'not null' in the schema (and required by every "
        "body), which converts without a copy"
    ),
    "btc_anomaly.detectors.rules.x_evaluate__mutmut_92": "astype(None) is astype(float64)",
    "btc_anomaly.detectors.rules.x_evaluate__mutmut_173": (
        "'input_value > 0' -> '> 1': an input of 1 sat means a fee of at most 1 sat (fee = input - output, "
        "checked by every schema), under FEE_SHARE_MIN_SAT: the rule cannot fire at 1 either way"
    ),
    **{
        f"btc_anomaly.detectors.rules.x\u01c1RuleNames\u01c1__init____mutmut_{n}": _DEFAULT_INT
        for n in (6, 8)
    },
    **{
        f"btc_anomaly.api.body.x\u01c1BodyParser\u01c1transactions__mutmut_{n}": _NOT_A_BATCH
        for n in (30, 34, 35)
    },
    **{
        f"btc_anomaly.api.body.x\u01c1BodyParser\u01c1_too_many__mutmut_{n}": _ERROR_DICT
        for n in (3, 4, 5, 6)
    },
    **{
        f"btc_anomaly.api.body.x\u01c1BodyParser\u01c1_too_many__mutmut_{n}": _ACTUAL_LENGTH
        for n in (26, 27, 28)
    },
    **{
        f"btc_anomaly.model.promotion.x__compact__mutmut_{n}": (
            "_compact's only caller (_record) passes GateDecision.to_event(), which always has a reason"
        )
        for n in (43, 45, 48)
    },
    "btc_anomaly.model.promotion.x_promotion_history__mutmut_29": (
        "every recorded event carries its version (GateDecision.to_event): the default is never read"
    ),
    "btc_anomaly.model.promotion.x_promote__mutmut_91": (
        "with no champion alias load_alias returns None, the value the original picks: one extra registry read"
    ),
    **{
        f"btc_anomaly.model.promotion.x__mark_superseded__mutmut_{n}": (
            "promotion.previous_champion is only written by _record, after promotion.decided_at: a version "
            "that gets past the early return always has decided_at"
        )
        for n in (29, 31, 34)
    },
}


def module_of(meta: Path) -> str:
    return str(meta.relative_to(ROOT / "mutants" / "src")).removesuffix(".meta")


def module_of_key(name: str) -> str:
    """``btc_anomaly.features`` of ``btc_anomaly.features.x_f__mutmut_3`` (or ``...xǁClassǁmethod__mutmut_3``)."""
    return name.rpartition(".")[0]


def mutated_line(name: str) -> str:
    """The line a mutant changed (`mutmut show`'s "+" line), to read next to the reason it is listed for."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    module = module_of_key(name)
    try:
        diff = get_diff_for_mutant(name, path=f"src/{module.replace('.', '/')}.py")
    except Exception as exc:  # an absent mutant or a changed mutmut: the listing goes on without the line
        return f"(no diff: {type(exc).__name__})"
    return next(
        (x[1:].strip() for x in diff.splitlines() if x.startswith("+") and not x.startswith("+++")), ""
    )


def main() -> int:
    metas = sorted((ROOT / "mutants" / "src").rglob("*.py.meta"))
    if not metas:
        print("no mutmut results under mutants/: run `make mutation` first", file=sys.stderr)
        return 2
    header = f"{'module':<38} {'mutants':>7} {'killed':>7} {'survived':>8} {'no test':>7} {'equiv.':>6} {'score':>7} {'time s':>7}"
    print(header)
    print("-" * len(header))
    failing, survivors, stale = [], [], []
    for meta in metas:
        data = json.loads(meta.read_text())
        statuses = {k: status_by_exit_code[v] for k, v in data["exit_code_by_key"].items()}
        name = module_of(meta)
        module = name.removesuffix(".py").replace("/", ".")
        # Mutants are numbered in source order: after an edit a listed number can name another mutant.
        # A listed one that a test kills (or that is gone) means the list no longer fits the code; one a
        # stopped run never reached ("not checked") says nothing either way.
        stale += [
            (k, statuses.get(k, "absent"))
            for k in EQUIVALENT
            if module_of_key(k) == module and statuses.get(k, "absent") not in ("survived", "not checked")
        ]
        equivalent = [k for k, s in statuses.items() if k in EQUIVALENT and s == "survived"]
        killed = sum(s in ("killed", "timeout", "segfault") for s in statuses.values())
        survived = [k for k, s in statuses.items() if s == "survived" and k not in EQUIVALENT]
        untested = [k for k, s in statuses.items() if s == "no tests"]
        unchecked = [k for k, s in statuses.items() if s == "not checked"]
        # Ended by a signal mutmut does not classify (SIGTERM): neither killed nor survived, rerun them.
        odd = [k for k, s in statuses.items() if s == "suspicious"]
        counted = len(statuses) - len(equivalent)
        score = killed / counted if counted else 1.0
        seconds = sum(data.get("durations_by_key", {}).values())
        print(
            f"{name:<38} {len(statuses):>7} {killed:>7} {len(survived):>8} {len(untested):>7} "
            f"{len(equivalent):>6} {score:>7.1%} {seconds:>7.0f}"
            + (f"  ({len(unchecked)} not run)" if unchecked else "")
            + (f"  ({len(odd)} suspicious)" if odd else "")
        )
        if score < TARGET:
            failing.append(name)
        survivors += survived + untested + odd
    if EQUIVALENT:
        print("\nequivalent mutants (excluded), each with the line it changes:")
        for k, why in sorted(EQUIVALENT.items()):
            print(f"  {k}: {why}\n      {mutated_line(k)}")
    if survivors:
        print(f"\n{len(survivors)} mutants not killed (`mutmut show <name>` prints one):")
        for k in survivors:
            print(f"  {k}")
    if stale:
        print(
            f"\n{len(stale)} mutants listed as equivalent did not survive: renumber EQUIVALENT for the edited code"
        )
        for k, status in stale:
            print(f"  {k}: {status}")
    if failing:
        print(f"\nbelow {TARGET:.0%}: {', '.join(failing)}")
    return 1 if failing or stale else 0


if __name__ == "__main__":
    sys.exit(main())
