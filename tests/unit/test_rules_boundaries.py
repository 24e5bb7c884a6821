"""Each rule at its exact threshold, one step either side, on real transactions edited only where the rule
looks; and every rule on the whole sample (the batch path) and on single transactions (the small-batch path)
against a plain per-transaction reading of the rule descriptions."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

from btc_anomaly.detectors import rules
from btc_anomaly.detectors.rules import COIN, RULES
from helpers.detectors import record, sample_records, table

PEEL = "9e8530a3589b"  # 1 input, 2 outputs, 155 BTC
FANOUT = "298f57352c9b"  # 1 input, 21 ordinary outputs
CONSOLIDATION = "812089d53a80"  # 200 inputs, 2 outputs
OLD = ("pubkey", "multisig")


def plain(rec: dict) -> set[str]:
    """The rules as their descriptions say, one transaction at a time."""
    outs, ins = rec["outputs"] or [], rec["inputs"] or []
    values = [o["value"] for o in outs]
    total = sum(values)
    dust = sum(1 for o in outs if o["value"] < 546 and o.get("script_type") != "nulldata")
    fee, vsize, spent = rec["fee"], rec["vsize"], rec["input_value"]
    fired = {
        "dust_fanout": len(outs) >= 10 and dust >= 10 and 2 * dust >= len(outs),
        "peel_chain_step": len(ins) == 1
        and len(outs) == 2
        and total >= 10 * COIN
        and min(values) <= 0.01 * total,
        "round_large_transfer": any(v >= 10 * COIN and v % COIN == 0 for v in values),
        "very_high_fee_rate": fee is not None and vsize > 0 and fee / vsize >= 1000,
        "excessive_fee_share": fee is not None and bool(spent) and fee / spent >= 0.5 and fee >= 10_000,
        "old_style_script": any(x.get("script_type") in OLD for x in outs + ins),
        "op_return_payload": bool(rec["has_op_return"]),
        "large_consolidation": len(ins) >= 100 and len(outs) <= 2,
    }
    return {k for k, v in fired.items() if v}


def fires(*recs: dict) -> list[set[str]]:
    hits = rules.evaluate(table(list(recs)))
    assert hits.shape == (len(recs), len(RULES)) and hits.dtype == bool
    return [{r.id for r, h in zip(RULES, row, strict=True) if h} for row in hits]


def _with_outputs(base: str, values: list[int], script: str = "pubkeyhash") -> dict:
    rec = copy.deepcopy(record(base))
    template = rec["outputs"][0]
    rec["outputs"] = [dict(template, value=v, script_type=script) for v in values]
    return rec


def test_every_rule_matches_its_description_on_the_whole_sample() -> None:
    recs = list(sample_records())
    got = fires(*recs)
    expected = [plain(r) for r in recs]
    wrong = [(r["hash"][:12], g, e) for r, g, e in zip(recs, got, expected, strict=True) if g != e]
    assert not wrong, wrong[:5]
    assert set().union(*expected) >= set(rules.RULE_IDS) - {"dust_fanout"}


def test_single_transactions_match_the_batch() -> None:
    recs = [r for r in sample_records() if plain(r)][:40]
    assert all(fires(r) == [plain(r)] for r in recs)


def test_no_rows_no_hits() -> None:
    hits = rules.evaluate(table([]))
    assert hits.shape == (0, len(RULES)) and hits.dtype == bool


def test_dust_fanout_edges() -> None:
    ordinary = 50_000
    assert "dust_fanout" in fires(_with_outputs(FANOUT, [545] * 10))[0]  # 10 of 10 outputs just under 546
    assert "dust_fanout" not in fires(_with_outputs(FANOUT, [545] * 9))[0]  # 9 outputs
    assert "dust_fanout" not in fires(_with_outputs(FANOUT, [546] * 10))[0]  # at the limit is not dust
    half = _with_outputs(FANOUT, [545] * 10 + [ordinary] * 10)
    assert "dust_fanout" in fires(half)[0]  # dust exactly half of the outputs
    assert "dust_fanout" not in fires(_with_outputs(FANOUT, [545] * 10 + [ordinary] * 11))[0]
    nine_and_op_return = _with_outputs(FANOUT, [545] * 9 + [0])
    nine_and_op_return["outputs"][-1]["script_type"] = "nulldata"
    assert "dust_fanout" not in fires(nine_and_op_return)[0]  # OP_RETURN outputs are not dust
    assert "dust_fanout" in fires(_with_outputs(FANOUT, [0] * 10, script="nonstandard"))[0]


def test_peel_chain_edges() -> None:
    ten = 10 * COIN
    assert "peel_chain_step" in fires(_with_outputs(PEEL, [ten - ten // 100, ten // 100]))[0]  # 10 BTC, 1 %
    assert (
        "peel_chain_step" not in fires(_with_outputs(PEEL, [ten - ten // 100 - 1, ten // 100]))[0]
    )  # < 10 BTC
    assert "peel_chain_step" not in fires(_with_outputs(PEEL, [ten - ten // 100 - 1, ten // 100 + 1]))[0]
    small_first = _with_outputs(PEEL, [ten // 100, ten - ten // 100])
    assert "peel_chain_step" in fires(small_first)[0]  # the smaller output may come first
    three = _with_outputs(PEEL, [ten, ten // 200, ten // 200])
    assert "peel_chain_step" not in fires(three)[0]
    two_inputs = _with_outputs(PEEL, [ten, ten // 200])
    two_inputs["inputs"] = two_inputs["inputs"] * 2
    assert "peel_chain_step" not in fires(two_inputs)[0]


def test_round_large_transfer_edges() -> None:
    assert fires(
        _with_outputs(PEEL, [10 * COIN, 5]),
        _with_outputs(PEEL, [9 * COIN, 5]),
        _with_outputs(PEEL, [10 * COIN + 1, 5]),
        _with_outputs(PEEL, [5, 21 * COIN]),
    ) == [
        {"round_large_transfer", "peel_chain_step"},
        set(),
        {"peel_chain_step"},
        {"round_large_transfer", "peel_chain_step"},
    ]


def test_fee_rules_edges() -> None:
    base = record(PEEL)
    vsize = base["vsize"]

    def fee(f: int | None, spent: int | None = 10**12, size: int | None = None) -> dict:
        return dict(base, fee=f, input_value=spent, vsize=vsize if size is None else size)

    assert [
        ("very_high_fee_rate" in f) for f in fires(fee(1000 * vsize), fee(1000 * vsize - 1), fee(None))
    ] == [
        True,
        False,
        False,
    ]
    assert "very_high_fee_rate" not in fires(fee(10**9, size=0))[0]  # no size: no rate
    share = fires(
        fee(10_000, 20_000), fee(10_000, 20_001), fee(9_999, 19_998), fee(10**6, 0), fee(None, 20_000)
    )
    assert [("excessive_fee_share" in f) for f in share] == [True, False, False, False, False]


def test_old_scripts_on_either_side() -> None:
    rec = record(PEEL)
    out_p2pk = _with_outputs(PEEL, [COIN, COIN], script="pubkey")
    in_multisig = copy.deepcopy(rec)
    in_multisig["inputs"][0]["script_type"] = "multisig"
    in_p2pkh = copy.deepcopy(rec)
    in_p2pkh["inputs"][0]["script_type"] = "pubkeyhash"
    assert [("old_style_script" in f) for f in fires(out_p2pk, in_multisig, in_p2pkh)] == [True, True, False]


def test_large_consolidation_edges() -> None:
    rec = record(CONSOLIDATION)
    assert len(rec["inputs"]) == 200 and len(rec["outputs"]) == 2
    exactly = dict(rec, inputs=rec["inputs"][:100])
    fewer = dict(rec, inputs=rec["inputs"][:99])
    three_out = dict(rec, outputs=rec["outputs"] + rec["outputs"][:1])
    one_out = dict(rec, outputs=rec["outputs"][:1])
    got = [("large_consolidation" in f) for f in fires(exactly, fewer, three_out, one_out)]
    assert got == [True, False, False, True]


def test_large_batches_read_scripts_through_the_dictionary_with_nulls() -> None:
    """Over ``SMALL`` elements the script flags come from a dictionary pass; a null script type is not old."""
    recs = []
    for i, r in enumerate(list(sample_records())[: rules.SMALL + 50]):
        r = copy.deepcopy(r)
        if i % 7 == 0:
            r["outputs"][0]["script_type"] = None
        if i % 11 == 0:
            r["inputs"][0]["script_type"] = "pubkey"
        recs.append(r)
    assert sum(len(r["outputs"]) for r in recs) > rules.SMALL
    assert fires(*recs) == [plain(r) for r in recs]


def test_op_return_flag() -> None:
    rec = record(PEEL)
    assert [("op_return_payload" in f) for f in fires(dict(rec, has_op_return=True), rec)] == [True, False]


def test_rule_names_share_one_list_per_set_of_hits() -> None:
    hits = np.zeros((4, len(RULES)), dtype=bool)
    hits[0, [0, 7]] = True
    hits[2, [0, 7]] = True
    hits[3, 3] = True
    names = rules.RuleNames()
    rows = names.rows(hits)
    assert rows == [
        ["dust_fanout", "large_consolidation"],
        [],
        ["dust_fanout", "large_consolidation"],
        ["very_high_fee_rate"],
    ]
    assert rows[0] is rows[2]
    again = names.rows(hits[:1])
    assert again[0] is rows[0]  # kept across calls
    every = names.rows(np.ones((1, len(RULES)), dtype=bool))
    assert every == [list(rules.RULE_IDS)]


@pytest.mark.parametrize("i", range(len(RULES)))
def test_catalogue_lists_every_rule(i: int) -> None:
    entry = rules.describe()[i]
    assert entry == {"id": RULES[i].id, "description": RULES[i].description, "weight": RULES[i].weight}
    assert len(rules.describe()) == len(RULES)


def test_transactions_without_inputs_or_outputs_get_the_header_rules_only() -> None:
    """The schema takes empty input and output lists, and ``list_column`` reads a null list as an empty one:
    such rows are judged on their header fields alone, in a batch of their own and next to ordinary rows
    (first or last), never an error."""
    base = record(PEEL)
    vsize = base["vsize"]
    burnt = dict(base, fee=1000 * vsize, input_value=1000 * vsize)  # fires both header rules
    bare = [dict(burnt, inputs=[], outputs=[]), dict(base, inputs=None, outputs=None)]
    assert fires(*bare) == [{"very_high_fee_rate", "excessive_fee_share"}, set()]
    assert fires(bare[1]) == [set()]
    old = copy.deepcopy(base)
    old["inputs"][0]["script_type"] = "pubkey"
    no_inputs = dict(old, inputs=[])
    no_outputs = dict(old, outputs=[])
    for batch in ([old, no_inputs], [old, no_outputs], [old, *bare], [*bare, old]):
        assert fires(*batch) == [plain(r) for r in batch]
    assert fires(old, no_outputs)[1] == {"old_style_script"}  # the P2PK input alone still counts
    assert "peel_chain_step" not in fires(old, no_inputs)[1]  # a peel step spends exactly one input


def test_zero_sizes_and_values_give_no_rate_and_no_warning() -> None:
    """A zero vsize or input value is "no rate", decided without NumPy's divide-by-zero warnings (which would
    flood the service logs), while any positive size does give a rate."""
    base = record(PEEL)
    rows = [
        dict(base, vsize=0, fee=10**9),
        dict(base, input_value=0, fee=10**6),
        dict(base, vsize=0, input_value=0, fee=0),
        dict(base, fee=None, input_value=None),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = fires(*rows)
    assert "very_high_fee_rate" not in got[0] and "excessive_fee_share" not in got[1]
    assert not ({"very_high_fee_rate", "excessive_fee_share"} & (got[2] | got[3]))
    assert "very_high_fee_rate" in fires(dict(base, vsize=1, fee=1000))[0]


def test_a_null_script_type_is_not_old_whatever_the_batch_holds() -> None:
    """On the dictionary path a null script type reads as "not old" even when the last script type the
    batch introduces is an old one."""
    recs = [copy.deepcopy(r) for r in sample_records() if "old_style_script" not in plain(r)][: rules.SMALL]
    assert sum(len(r["outputs"]) for r in recs) > rules.SMALL
    assert not any(o["script_type"] in OLD for r in recs for o in r["outputs"])
    recs[0]["outputs"][0]["script_type"] = None
    recs[-1]["outputs"][-1]["script_type"] = "pubkey"  # the dictionary's last entry
    got = fires(*recs)
    assert got == [plain(r) for r in recs]
    assert "old_style_script" not in got[0] and "old_style_script" in got[-1]
