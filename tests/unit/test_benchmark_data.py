"""The labelled benchmark (``resources/benchmark.jsonl.gz``) is valid, consistent and what its SOURCES.md says.

Built by ``scripts/build_benchmark.py`` from real data; see ``data/benchmark/SOURCES.md`` for the recipes.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from collections import Counter
from functools import lru_cache
from typing import Any

import orjson
import pytest

from btc_anomaly.config import PROJECT_ROOT
from btc_anomaly.features import DUST_LIMIT_SAT
from btc_anomaly.schema import Transaction

BENCHMARK = PROJECT_ROOT / "src" / "btc_anomaly" / "resources" / "benchmark.jsonl.gz"
SOURCES_MD = PROJECT_ROOT / "data" / "benchmark" / "SOURCES.md"
SAMPLE = PROJECT_ROOT / "data" / "sample" / "transactions.jsonl.gz"
SAMPLE_SOURCES_MD = PROJECT_ROOT / "data" / "sample" / "SOURCES.md"

KEYS = ["id", "split", "label", "archetype", "source_txid", "source_block", "change", "tx", "hex"]
ARCHETYPES = {
    "canonical": {
        "fee_overpayment",
        "fee_share_burn",
        "zero_fee",
        "below_relay_fee",
        "dust_fanout",
        "consolidation",
        "huge_transfer",
        "op_return_spam",
        *(
            f"past_range_{q}"
            for q in (
                "fee_rate",
                "fee",
                "output_value",
                "input_count",
                "output_count",
                "vsize",
                "dust_outputs",
            )
        ),
    },
    "raw": {
        "past_range_size",
        "past_range_input_count",
        "past_range_output_count",
        "dust_fanout",
        "op_return_spam",
    },
}
CANONICAL_BLOCKS = (388_381, 419_328, 481_824, 692_261)
# Archetypes whose rows carry ~1,000+ real inputs or outputs (or a 100-300 kB payload) each: fewer rows
# (scripts/build_benchmark.py: N_ROWS_HEAVY) so that the file stays small enough to ship.
HEAVY = {
    "consolidation",
    "past_range_input_count",
    "past_range_output_count",
    "past_range_vsize",
    "past_range_size",
}


@lru_cache(maxsize=1)
def _lines() -> tuple[bytes, ...]:
    return tuple(gzip.decompress(BENCHMARK.read_bytes()).splitlines())


@lru_cache(maxsize=1)
def _rows() -> tuple[dict[str, Any], ...]:
    return tuple(orjson.loads(line) for line in _lines())


@lru_cache(maxsize=1)
def _sample() -> tuple[dict[str, Any], ...]:
    return tuple(orjson.loads(line) for line in gzip.decompress(SAMPLE.read_bytes()).splitlines())


def _sources_value(key: str) -> str:
    match = re.search(rf"^- {key}: `?([^`\n]+)`?$", SOURCES_MD.read_text(), re.MULTILINE)
    assert match, f"SOURCES.md has no '- {key}:' line"
    return match.group(1)


def _fee_rate(tx: dict[str, Any]) -> float:
    return tx["fee"] / tx["vsize"]


def _dust(tx: dict[str, Any]) -> int:
    return sum(1 for o in tx["outputs"] if o["value"] < DUST_LIMIT_SAT and o["script_type"] != "nulldata")


QUANTITY = {
    "fee_rate": _fee_rate,
    "fee": lambda t: t["fee"],
    "output_value": lambda t: t["output_value"],
    "input_count": lambda t: t["input_count"],
    "output_count": lambda t: t["output_count"],
    "vsize": lambda t: t["vsize"],
    "dust_outputs": _dust,
    "size": lambda t: t["size"],
}


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    first = raw[pos]
    if first < 0xFD:
        return first, pos + 1
    width = {0xFD: 2, 0xFE: 4, 0xFF: 8}[first]
    return int.from_bytes(raw[pos + 1 : pos + 1 + width], "little"), pos + 1 + width


def _reparse(raw: bytes) -> tuple[str, int, int]:
    """(txid, size, weight) re-derived from serialized bytes, independently of the project's decoder."""
    segwit = raw[4:6] == b"\x00\x01"
    pos = body = 6 if segwit else 4
    n_in, pos = _varint(raw, pos)
    for _ in range(n_in):
        script, pos = _varint(raw, pos + 36)
        pos += script + 4
    n_out, pos = _varint(raw, pos)
    for _ in range(n_out):
        script, pos = _varint(raw, pos + 8)
        pos += script
    body_end = pos
    if segwit:
        for _ in range(n_in):
            items, pos = _varint(raw, pos)
            for _ in range(items):
                length, pos = _varint(raw, pos)
                pos += length
    assert pos + 4 == len(raw), "trailing or missing bytes"
    stripped = raw[:4] + raw[body:body_end] + raw[-4:]
    txid = hashlib.sha256(hashlib.sha256(stripped).digest()).digest()[::-1].hex()
    return txid, len(raw), 3 * len(stripped) + len(raw)


def test_file_matches_sources_md() -> None:
    data = BENCHMARK.read_bytes()
    assert data[:3] == b"\x1f\x8b\x08" and data[4:8] == b"\x00\x00\x00\x00"  # gzip, mtime 0: reproducible
    assert hashlib.sha256(data).hexdigest() == _sources_value("sha256")
    assert len(data) == int(_sources_value("bytes"))
    assert len(_rows()) == int(_sources_value("rows"))


def test_every_row_is_well_formed_and_validates() -> None:
    rows = _rows()
    assert [list(r) for r in rows] == [KEYS] * len(rows)
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({r["tx"]["hash"] for r in rows}) == len(rows)
    ids: Counter[str] = Counter()
    for r, line in zip(rows, _lines(), strict=True):
        prefix = "c" if r["split"] == "canonical" else "r"
        ids[prefix] += 1
        assert r["id"] == f"{prefix}-{ids[prefix]:04d}"  # file order
        tx = Transaction.model_validate(r["tx"])
        # "tx" is byte for byte what to_json_bytes gives ("hex" is the last key)
        assert tx.to_json_bytes() == line[line.index(b',"tx":') + 6 : line.rindex(b',"hex":"')]
        assert re.fullmatch(r"[0-9a-f]{64}", r["source_txid"])
        assert isinstance(r["source_block"], int)
        if r["split"] == "canonical":
            assert tx.fee is not None and tx.input_value is not None and tx.source == "block"
        else:
            assert r["split"] == "raw"
            assert tx.fee is None and tx.input_value is None and tx.source == "rawtx"
            assert tx.block_height is None


def test_labels_and_archetypes_are_as_documented() -> None:
    for r in _rows():
        archetype = r["archetype"]
        if r["label"] == 0:
            assert archetype == "normal" and r["change"] == ""
            assert r["source_txid"] == r["tx"]["hash"]  # normals are unmodified
        else:
            assert r["label"] == 1
            assert archetype in ARCHETYPES[r["split"]] or archetype.startswith("historical_"), archetype
            assert r["change"].strip()
            if archetype.startswith("historical_"):
                assert r["source_txid"] == r["tx"]["hash"] and r["change"].startswith("unmodified")
            else:
                assert r["source_txid"] != r["tx"]["hash"]


def test_counts_per_split_and_archetype() -> None:
    counts = Counter((r["split"], r["archetype"]) for r in _rows())
    for split, names in ARCHETYPES.items():
        for name in names:
            assert counts[(split, name)] >= (12 if name in HEAVY else 20), (split, name)
    assert counts[("raw", "normal")] == 1_500
    # every held-out transaction of the sample is a canonical normal
    held = re.findall(
        r"^\| [\d,]+ \| `[0-9a-f]{64}` \| [\d,]+ \| [\d,]+ \| ([\d,]+) \|",
        SAMPLE_SOURCES_MD.read_text(),
        re.M,
    )
    assert len(held) == len(CANONICAL_BLOCKS)
    assert counts[("canonical", "normal")] == sum(int(h.replace(",", "")) for h in held)


def test_normals_are_held_out_of_the_sample_and_sources_used_once() -> None:
    sample = {t["hash"] for t in _sample()}
    rows = _rows()
    for r in rows:
        assert r["tx"]["hash"] not in sample
        assert r["source_txid"] not in sample
    canonical_normals = {r["tx"]["hash"] for r in rows if r["split"] == "canonical" and r["label"] == 0}
    modified = [r for r in rows if r["label"] == 1 and not r["archetype"].startswith("historical_")]
    assert len({r["source_txid"] for r in modified}) == len(modified)  # each source used once
    normals = {r["tx"]["hash"] for r in rows if r["label"] == 0}
    assert all(r["source_txid"] in normals for r in modified)  # anomalies are modified normals
    canonical_sources = Counter(
        r["source_block"]
        for r in modified
        if r["split"] == "canonical" and r["source_txid"] in canonical_normals
    )
    assert set(canonical_sources) == set(CANONICAL_BLOCKS)


def test_held_out_fees_complete_the_sample_blocks() -> None:
    # coinbase output = subsidy + fees of the block's sample transactions + fees of its benchmark normals
    normals_fee: Counter[int] = Counter()
    for r in _rows():
        if r["split"] == "canonical" and r["label"] == 0:
            normals_fee[r["source_block"]] += r["tx"]["fee"]
    for height in CANONICAL_BLOCKS:
        txs = [t for t in _sample() if t["block_height"] == height and t["source"] == "block"]
        (coinbase,) = [t for t in txs if t["is_coinbase"]]
        fees = sum(t["fee"] for t in txs if not t["is_coinbase"])
        subsidy = (50 * 100_000_000) >> (height // 210_000)
        assert coinbase["output_value"] == subsidy + fees + normals_fee[height]


def test_hex_gives_the_transaction() -> None:
    for r in _rows():
        if r["label"] == 0 and r["split"] == "canonical":
            # unmodified block transactions, evaluated by their canonical tx: no hex (file size)
            assert r["hex"] == "", r["id"]
            continue
        assert r["hex"], r["id"]  # every anomaly and every raw row carries its serialization
        txid, size, weight = _reparse(bytes.fromhex(r["hex"]))
        tx = r["tx"]
        assert (txid, size, weight, (weight + 3) // 4) == (
            tx["hash"],
            tx["size"],
            tx["weight"],
            tx["vsize"],
        ), r["id"]
        assert tx["is_segwit"] == (size * 4 != weight)


@pytest.mark.parametrize("split", ["canonical", "raw"])
def test_past_range_rows_exceed_the_maximum(split: str) -> None:
    rows = _rows()
    population = list(_sample())
    if split == "raw":  # raw anomalies are also beyond every raw normal
        population += [r["tx"] for r in rows if r["split"] == "raw" and r["label"] == 0]
    past = [r for r in rows if r["split"] == split and r["archetype"].startswith("past_range_")]
    assert {r["archetype"] for r in past} == {a for a in ARCHETYPES[split] if a.startswith("past_range_")}
    maxima = {}
    for quantity in {r["archetype"].removeprefix("past_range_") for r in past}:
        # the raw split has no fee archetype, and only raw normals lack a fee
        maxima[quantity] = max(QUANTITY[quantity](t) for t in population)
    for r in past:
        quantity = r["archetype"].removeprefix("past_range_")
        assert QUANTITY[quantity](r["tx"]) >= 1.5 * maxima[quantity], (r["id"], quantity)


def test_recipes_do_what_they_say() -> None:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in _rows():
        if r["split"] == "canonical":
            by.setdefault(r["archetype"], []).append(r["tx"])
    assert all(t["fee"] == 0 for t in by["zero_fee"])
    assert all(0 < _fee_rate(t) < 1 for t in by["below_relay_fee"])
    assert all(0.30 <= t["fee"] / t["input_value"] <= 0.95 for t in by["fee_share_burn"])
    assert all(100 <= _dust(t) <= 1_000 for t in by["dust_fanout"])
    assert all(200 <= t["input_count"] <= 3_000 and t["output_count"] <= 2 for t in by["consolidation"])
    assert all(10_000e8 <= t["output_value"] <= 60_000e8 for t in by["huge_transfer"])
    assert all(t["has_op_return"] for t in by["op_return_spam"])
