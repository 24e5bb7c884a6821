"""Rules and watchlists on real transactions: each rule fires on a real tx with the property and not on a
real tx without it; the watchlists flag real txs touching real listed addresses (tests/fixtures/SOURCES.md,
data/labels/SOURCES.md)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from bitcoin.core import CTransaction

from btc_anomaly.detectors import rules
from btc_anomaly.detectors.watchlist import (
    build_watchlist,
    load_json,
    load_lines,
    load_tagpack,
    load_watchlist,
)
from btc_anomaly.ingestion.decode import decode_block, decode_transaction
from helpers.detectors import FIXTURES, LABELS, record, sample_records, table

DUST_BLOCK = (
    FIXTURES
    / "blocks"
    / "js-bitcoin-block"
    / ("00000000000004bfad597c3a381f1c60612e62d4b70f638a5e3f5099e5265d0b.hex")
)
DUST_FANOUT_TX = "3015b773a4044136e9a5bde2fe231f889444a704deba9e3c119a072eaca4b889"
OFAC_PAYMENT_HEX = FIXTURES / "detectors" / "tx_c963a556_pays_ofac_address.hex"
OFAC_PAYMENT_TX = "c963a556f78add900461507285f34a9396434119b73229adec382cd02b724dd0"

# rule → (real tx with the property, real tx without it: a near miss where one exists)
CASES = {
    "peel_chain_step": (
        "9e8530a3589b",
        "1823999231ae",
    ),  # negative: 1 in, 2 out, >= 10 BTC, but no small peel
    "round_large_transfer": ("1db6251a9afc", "8b6f7958d15e"),  # negative: pays 12.5+ BTC, not a whole number
    "very_high_fee_rate": ("450c309b70fb", "3a5adcc3b7e1"),  # negative: 600-999 sat/vB
    "excessive_fee_share": ("cb17089d2451", "399ad0b7cba6"),  # negative: fee 20-50 % of the input
    "old_style_script": ("1db6251a9afc", "c252a5368e7c"),  # 2011 P2PK vs P2PKH only
    "op_return_payload": ("d81564dde50d", "9e8530a3589b"),
    "large_consolidation": ("812089d53a80", "4e99434f63a1"),  # negative: 176 inputs into 11 outputs
}


def _fires(rec: dict) -> set[str]:
    hits = rules.evaluate(table([rec]))[0]
    return {r.id for r, hit in zip(rules.RULES, hits, strict=True) if hit}


@pytest.mark.parametrize("rule_id", sorted(CASES))
def test_rule_fires_on_a_real_tx_with_the_property_and_not_without(rule_id: str) -> None:
    positive, negative = (record(h) for h in CASES[rule_id])
    assert rule_id in _fires(positive)
    assert rule_id not in _fires(negative)


def test_the_negatives_are_near_misses() -> None:
    # The negative examples share part of the property, so the thresholds are what separates them.
    peel = record("1823999231ae")
    assert (peel["input_count"], peel["output_count"]) == (1, 2) and peel["output_value"] >= 10 * rules.COIN
    fee_rate = record("3a5adcc3b7e1")
    assert 600 <= fee_rate["fee"] / fee_rate["vsize"] < rules.VERY_HIGH_FEE_RATE
    share = record("399ad0b7cba6")
    assert 0.2 <= share["fee"] / share["input_value"] < rules.FEE_SHARE
    assert record("4e99434f63a1")["input_count"] >= 100


def test_dust_fanout_fires_on_the_real_127_output_dust_transaction_of_block_137500() -> None:
    block = decode_block(DUST_BLOCK.read_text())
    txs = {t.hash: t.model_dump() for t in block.transactions}
    dust = txs[DUST_FANOUT_TX]
    assert dust["output_count"] == 127
    assert "dust_fanout" in _fires(dust)
    # Not on the sample's real fan-outs that pay ordinary amounts (>= 10 outputs, no dust).
    fanouts = [r for r in sample_records() if r["output_count"] >= 10][:50]
    assert fanouts and not any("dust_fanout" in _fires(r) for r in fanouts)
    assert not any("dust_fanout" in _fires(t) for h, t in txs.items() if h != DUST_FANOUT_TX)


def test_rules_need_their_inputs_and_skip_unknown_fees() -> None:
    rec = dict(record("450c309b70fb"), fee=None, input_value=None)
    assert "very_high_fee_rate" not in _fires(rec)


def test_rule_counts_on_the_sample_stay_small() -> None:
    hits = rules.evaluate(table(list(sample_records())))
    share = hits.mean(axis=0)
    assert share.max() < 0.06, dict(zip(rules.RULE_IDS, share.round(4), strict=True))
    assert (hits.sum(axis=0) > 0).sum() >= len(rules.RULES) - 1  # every rule but dust fan-out fires in it


# --- watchlists ---------------------------------------------------------------------------------------------


def test_watchlist_loads_the_committed_lists() -> None:
    wl = load_watchlist(LABELS)
    assert wl.lists["ofac_sdn"] == 435
    assert wl.lists["ransomware"] > 7000 and wl.lists["sextortion"] > 12000
    assert {e.category for e in wl.lookup("386wa1UM6nA798AWNh64jdrejZyedeXgUN")} == {"sanctions"}
    # Tag-level categories win over the pack's: hacks.yaml mixes hacked exchanges and hackers.
    cats = {e.category for es in build_watchlist(LABELS).entries.values() for e in es if e.list == "hacks"}
    assert {"exchange", "service_hack"} <= cats


def test_formats_agree_on_the_ofac_list() -> None:
    lines = {a for a, _ in load_lines(LABELS / "ofac" / "sanctioned_addresses_XBT.txt", "x")}
    as_json = {a for a, _ in load_json(LABELS / "ofac" / "sanctioned_addresses_XBT.json", "x")}
    pack = {a for a, _ in load_tagpack(LABELS / "graphsense" / "ofac.yaml", "x")}
    assert lines == as_json and len(lines) == 435
    assert len(pack & lines) > 300  # two independent scrapes of the same SDN list


def test_watchlist_flags_a_real_transaction_paying_an_ofac_address() -> None:
    raw = OFAC_PAYMENT_HEX.read_text().strip()
    assert hashlib.sha256(hashlib.sha256(bytes.fromhex(raw)).digest()).digest()[::-1].hex() == OFAC_PAYMENT_TX
    assert CTransaction.deserialize(bytes.fromhex(raw)).GetTxid()[::-1].hex() == OFAC_PAYMENT_TX
    tx = decode_transaction(raw).model_dump()
    t = table([tx])
    (hits,) = load_watchlist(LABELS).match(
        t.column("inputs").combine_chunks(), t.column("outputs").combine_chunks()
    )
    paid = [h for h in hits if h["side"] == "output"]
    assert {h["address"] for h in paid} == {"386wa1UM6nA798AWNh64jdrejZyedeXgUN"}
    assert {h["list"] for h in paid} == {"ofac_sdn", "graphsense_ofac"}
    assert {h["category"] for h in paid} == {"sanctions"}


def test_watchlist_flags_a_real_sample_transaction_spending_from_an_ofac_address() -> None:
    rec = record("dbf58d5997f7")
    t = table([rec, record("9e8530a3589b")])
    hits = load_watchlist(LABELS).match(
        t.column("inputs").combine_chunks(), t.column("outputs").combine_chunks()
    )
    assert {(h["list"], h["address"], h["side"]) for h in hits[0]} == {
        ("ofac_sdn", "3HqA7i3ttECLvgqvq69HNxxUP5BL7Z5YgA", "input"),
        ("graphsense_ofac", "3HqA7i3ttECLvgqvq69HNxxUP5BL7Z5YgA", "input"),
    }
    assert hits[1] == []


def test_watchlist_of_a_missing_folder_is_empty(tmp_path: Path) -> None:
    assert len(load_watchlist(tmp_path / "nowhere")) == 0
    assert len(load_watchlist(None)) == 0
