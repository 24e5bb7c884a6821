"""Blockchain.com JSON → canonical Transaction, on recorded real blockchain.info responses."""

from __future__ import annotations

import copy
import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from btc_anomaly.ingestion.blockchain_com import from_blockchain_tx, parse_rawblock, parse_unconfirmed
from btc_anomaly.schema import InvalidTransaction

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
API = FIXTURES / "api" / "blockchain_info"
RAWTX = sorted((API / "rawtx").glob("*.json"))
ReadFixture = Callable[[Path | str], bytes]


def _load(path: Path) -> Any:
    return json.loads(path.read_text())


def _rawtx(prefix: str) -> dict[str, Any]:
    return _load(next(p for p in RAWTX if p.name.startswith(prefix)))


def _all_recorded_txs(read_fixture: ReadFixture) -> list[dict[str, Any]]:
    txs = [_load(p) for p in RAWTX]
    for path in sorted((API / "multiaddr").iterdir()):
        txs += json.loads(read_fixture(path))["txs"]
    txs += _load(API / "rawblock" / "rawblock_603966_partial.json")["tx"]
    return txs


@pytest.mark.parametrize("path", RAWTX, ids=lambda p: p.stem[:12])
def test_rawtx_fee_equals_recorded_fee(path: Path) -> None:
    raw = _load(path)
    tx = from_blockchain_tx(raw, source="rest")
    assert tx.hash == path.stem == raw["hash"]
    assert tx.fee == raw["fee"]
    assert tx.input_value == sum(i["prev_out"]["value"] for i in raw["inputs"])
    assert tx.output_value == sum(o["value"] for o in raw["out"])
    assert (tx.size, tx.weight, tx.vsize) == (raw["size"], raw["weight"], -(-raw["weight"] // 4))
    assert (tx.version, tx.locktime, tx.block_height) == (raw["ver"], raw["lock_time"], raw["block_height"])
    assert tx.first_seen == dt.datetime.fromtimestamp(raw["time"], dt.UTC)
    assert tx.input_count == raw["vin_sz"] and tx.output_count == raw["vout_sz"]
    assert tx.source == "rest" and not tx.is_coinbase
    assert tx.is_segwit == any(i["witness"] for i in raw["inputs"])


def test_addresses_and_types_agree_with_blockchain_info(read_fixture: ReadFixture) -> None:
    """Our addresses (derived from the scripts) equal blockchain.info's ``addr`` everywhere both exist.

    That includes taproot outputs, whose bech32m checksum the ``bech32`` package alone gets wrong.
    """
    compared = taproot = 0
    for raw in _all_recorded_txs(read_fixture):
        try:
            tx = from_blockchain_tx(raw, source="rest")
        except InvalidTransaction:
            continue  # multiaddr txs with outputs cut to the wallet's; tested below
        pairs = [(i.get("prev_out"), t) for i, t in zip(raw["inputs"], tx.inputs, strict=True)]
        pairs += list(zip(raw["out"], tx.outputs, strict=True))
        for theirs, ours in pairs:
            if theirs and theirs.get("addr"):
                assert ours.address == theirs["addr"], (raw["hash"], ours.script_type)
                compared += 1
                taproot += ours.script_type == "witness_v1_taproot"
    assert compared > 100 and taproot > 0


def test_script_types_of_known_txs() -> None:
    p2pk = from_blockchain_tx(_rawtx("1db6251a"), source="rest")  # 2011, height 140,496
    assert [i.script_type for i in p2pk.inputs] == ["pubkey"]
    assert [o.script_type for o in p2pk.outputs] == ["pubkeyhash", "pubkey"]
    assert p2pk.inputs[0].address is not None  # P2PK shown as its P2PKH address, like blockchain.info
    assert p2pk.fee == 0

    op_return = from_blockchain_tx(_rawtx("2033435d"), source="rest")
    assert op_return.has_op_return and "nulldata" in [o.script_type for o in op_return.outputs]

    rbf = from_blockchain_tx(_rawtx("4a367acd"), source="rest")
    assert rbf.rbf and rbf.is_segwit
    assert {i.script_type for i in rbf.inputs} == {"witness_v0_scripthash", "scripthash"}


def test_websocket_utx_message_and_sources() -> None:
    raw = _rawtx("e47f4369")
    via_ws = from_blockchain_tx({"op": "utx", "x": raw}, source="ws")
    direct = from_blockchain_tx(raw, source="rest")
    assert via_ws.source == "ws"
    assert via_ws.model_dump(exclude={"source"}) == direct.model_dump(exclude={"source"})
    seen = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    assert from_blockchain_tx(raw, source="ws", first_seen=seen).first_seen == seen


def test_unconfirmed_tx_has_no_block_height() -> None:
    raw = _rawtx("e47f4369")
    raw["block_height"] = None
    raw.pop("block_index")
    assert from_blockchain_tx(raw, source="ws").block_height is None


def test_missing_prevout_value_keeps_their_fee() -> None:
    raw = _rawtx("cccd3a9c")
    del raw["inputs"][1]["prev_out"]["value"]
    tx = from_blockchain_tx(raw, source="rest")
    assert tx.input_value is None and tx.inputs[1].value is None
    assert tx.fee == raw["fee"]
    del raw["fee"]
    assert from_blockchain_tx(raw, source="rest").fee is None


def test_multiaddr_truncated_outputs_are_rejected(read_fixture: ReadFixture) -> None:
    body = json.loads(read_fixture(API / "multiaddr" / "multiaddr_bc1qw508d6qejx.json.gz"))
    good, bad = parse_unconfirmed(body)  # same {"txs": [...]} shape as /unconfirmed-transactions
    assert (len(good), len(bad)) == (35, 26)
    for raw, reason in bad:
        assert raw["vout_sz"] > len(raw["out"]) and "incomplete" in reason
    for tx in good:
        assert tx.fee is not None and tx.fee >= 0
    # the BIP173 example address receives dust; some of it sits in complete txs
    assert sum(o.value <= 1_000 for tx in good for o in tx.outputs) > 0


def test_rawblock_partial(read_fixture: ReadFixture) -> None:
    block = parse_rawblock(json.loads(read_fixture(API / "rawblock" / "rawblock_603966_partial.json")))
    assert block.height == 603_966 and block.n_tx == 3503
    assert block.hash == "0000000000000000000efcea1cc1a169955e9cf6f039ddeabfdd1da1ac6d9899"
    assert block.failures == [] and len(block.transactions) == 10
    coinbase, *rest = block.transactions
    assert coinbase.is_coinbase and coinbase.inputs[0].script_type == "coinbase"
    assert coinbase.fee == 0 and coinbase.input_value is None and not coinbase.rbf
    assert coinbase.is_segwit  # the witness reserved value
    assert coinbase.has_op_return  # witness commitment
    assert all(t.block_height == 603_966 and not t.is_coinbase and t.fee is not None for t in rest)


def test_parse_unconfirmed_collects_failures() -> None:
    good_raw = _rawtx("e47f4369")
    body = {"txs": [good_raw, {"hash": "xyz"}, "not an object", {**good_raw, "fee": good_raw["fee"] + 1}]}
    good, bad = parse_unconfirmed(body)
    assert [t.hash for t in good] == [good_raw["hash"]]
    assert [reason.split(":")[0] for _, reason in bad] == [
        "missing or malformed hash",
        "expected a JSON object, got str",
        f"tx {good_raw['hash'][:16]}…",
    ]
    with pytest.raises(InvalidTransaction):
        parse_unconfirmed({"no": "txs"})
    with pytest.raises(InvalidTransaction):
        parse_unconfirmed([])  # type: ignore[arg-type]


def _mutated(change: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    raw = copy.deepcopy(_rawtx("cccd3a9c"))
    change(raw)
    return raw


@pytest.mark.parametrize(
    ("raw", "reason_part"),
    [
        (_mutated(lambda d: d.pop("hash")), "hash"),
        (_mutated(lambda d: d.update(hash="12" * 31)), "hash"),
        (_mutated(lambda d: d.update(inputs=None)), "inputs"),
        (_mutated(lambda d: d.update(out={})), "out"),
        (_mutated(lambda d: d["out"][0].update(value=-1)), "negative"),
        (_mutated(lambda d: d["out"][0].update(value="1000")), "integer"),
        (_mutated(lambda d: d["out"][0].update(value=True)), "integer"),
        (_mutated(lambda d: d["out"][0].pop("value")), "missing value"),
        (_mutated(lambda d: d["out"][0].update(value=21_000_000 * 10**8 + 1)), "21 million"),
        (_mutated(lambda d: d["inputs"][0]["prev_out"].update(value=-5)), "negative"),
        (_mutated(lambda d: d["inputs"][0]["prev_out"].update(script="zz")), "hex"),
        (_mutated(lambda d: d["inputs"][0].update(prev_out=[1])), "prev_out"),
        (_mutated(lambda d: d.update(fee=d["fee"] + 1)), "fee"),
        (_mutated(lambda d: d.update(vin_sz=9)), "incomplete"),
        (_mutated(lambda d: d.pop("size")), "size"),
        (_mutated(lambda d: d.pop("weight")), "weight"),
        (_mutated(lambda d: d.pop("ver")), "ver"),
        (_mutated(lambda d: d.update(lock_time=-1)), "negative"),
        (_mutated(lambda d: d.update(block_height="800000")), "integer"),
        (_mutated(lambda d: d.update(size=-3)), "negative"),
        (_mutated(lambda d: d.update(time=10**20)), "unix time"),
        (["not", "a", "dict"], "JSON object"),
    ],
)
def test_malformed_objects_raise_with_a_reason(raw: Any, reason_part: str) -> None:
    with pytest.raises(InvalidTransaction) as info:
        from_blockchain_tx(raw, source="rest")
    assert reason_part in info.value.reason and "\n" not in info.value.reason
