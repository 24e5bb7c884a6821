"""Raw transaction and block decoding against real mainnet data and Bitcoin Core's vectors."""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from bitcoin.core import CBlock, CTransaction

from btc_anomaly.ingestion.decode import (
    BLK_MAGIC,
    MAX_MONEY,
    InvalidBlock,
    PrevoutIndex,
    classify_script,
    decode_block,
    decode_summary,
    decode_transaction,
    iter_blk_bytes,
    iter_blk_file,
    load_prevouts,
)
from btc_anomaly.schema import InvalidTransaction

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ReadFixture = Callable[[Path | str], bytes]

EXAMPLE_TXID = "15e10745f15593a899cef391191bdd3d7c12412cc4696b7bcb669d0feadc8521"
BLOCK_388381 = "blocks/rbtc/mainnet-000000000000000004c2b624ed5d7756c508d90fd0da2c7c679febfa6c4735f0"


def _sha256d(data: bytes) -> bytes:
    return hashlib.sha256(hashlib.sha256(data).digest()).digest()


def _vectors(name: str) -> list[tuple[str, str]]:
    """(serialized tx hex, flags) of every vector row; rows that are a single string are comments."""
    rows = json.loads((FIXTURES / "transactions" / "bitcoin-core-vectors" / name).read_text())
    return [(row[1], row[2]) for row in rows if isinstance(row[0], list)]


def _subsidy(height: int) -> int:
    return (50 * 100_000_000) >> (height // 210_000)


# --- the example transaction of the original CLI ----------------------------------------------------


def test_example_tx_is_self_authenticating_and_decodes(read_fixture: ReadFixture) -> None:
    hex_str = read_fixture("example_tx_15e10745.hex").decode()
    assert _sha256d(bytes.fromhex(hex_str.strip()))[::-1].hex() == EXAMPLE_TXID

    tx = decode_transaction(hex_str)
    assert tx.hash == EXAMPLE_TXID
    assert (tx.input_count, tx.output_count, tx.output_value) == (5, 4, 6_013_440_000)
    # mempool.space's own /api/tx sample for this tx: size 884, weight 3536, first output 12.4 BTC
    # to 1BUBQuPV3gEV7P2XLNuAJQjf5t265Yyj9t.
    assert (tx.size, tx.weight, tx.vsize) == (884, 3536, 884)
    assert (tx.outputs[0].address, tx.outputs[0].value) == (
        "1BUBQuPV3gEV7P2XLNuAJQjf5t265Yyj9t",
        1_240_000_000,
    )
    assert all(o.script_type == "pubkeyhash" for o in tx.outputs)
    # no prevout lookup: inputs are unknown and there is no fee
    assert all(i.script_type == "unknown" and i.value is None for i in tx.inputs)
    assert tx.fee is None and tx.input_value is None
    assert not tx.is_segwit and not tx.is_coinbase and not tx.rbf and not tx.has_op_return
    assert tx.source == "rawtx" and tx.first_seen.tzinfo is not None


def test_example_tx_with_prevouts_gets_a_fee(read_fixture: ReadFixture) -> None:
    hex_str = read_fixture("example_tx_15e10745.hex").decode()
    ctx = CTransaction.deserialize(bytes.fromhex(hex_str.strip()))
    # Made-up prevout values (the real ones are not in the repo): 20,000 sat more than the outputs.
    values = [1_200_000_000] * 4 + [6_013_440_000 + 20_000 - 4 * 1_200_000_000]
    script = bytes.fromhex("76a9140a59837ccd4df25adc31cdad39be6a8d97557ed688ac")
    prevouts = {
        (i.prevout.hash[::-1].hex(), i.prevout.n): (v, script) for i, v in zip(ctx.vin, values, strict=True)
    }
    tx = decode_transaction(hex_str, prevouts=prevouts)
    assert tx.fee == 20_000 and tx.input_value == 6_013_460_000
    assert {i.address for i in tx.inputs} == {"1wizSAYSbuyXbt9d8JV8ytm5acqq2TorC"}

    partial = dict(list(prevouts.items())[:2])
    tx = decode_transaction(hex_str, prevouts=partial)
    assert tx.fee is None and tx.input_value is None
    assert [i.value is not None for i in tx.inputs].count(True) == 2


def test_hex_whitespace_and_bytes_give_the_same_tx(read_fixture: ReadFixture) -> None:
    hex_str = read_fixture("example_tx_15e10745.hex").decode().strip()
    spaced = "\n".join(hex_str[i : i + 64] for i in range(0, len(hex_str), 64)) + "\n  "
    assert decode_transaction(spaced).hash == EXAMPLE_TXID
    assert decode_transaction(bytes.fromhex(hex_str)).hash == EXAMPLE_TXID
    assert decode_transaction(hex_str.upper()).hash == EXAMPLE_TXID


def test_decode_summary(read_fixture: ReadFixture) -> None:
    summary = decode_summary(read_fixture("example_tx_15e10745.hex").decode())
    assert summary["valid"] is True and summary["txid"] == EXAMPLE_TXID
    assert summary["script_types"] == ["pubkeyhash"] * 4
    assert {
        k: summary[k] for k in ("input_count", "output_count", "output_value", "size", "vsize", "weight")
    } == {
        "input_count": 5,
        "output_count": 4,
        "output_value": 6_013_440_000,
        "size": 884,
        "vsize": 884,
        "weight": 3536,
    }
    assert json.loads(json.dumps(summary)) == summary
    bad = decode_summary("not hex")
    assert bad["valid"] is False and bad["txid"] is None and bad["reason"]


# --- garbage in, one-line reason out ----------------------------------------------------------------


def _example_hex() -> str:
    return (FIXTURES / "example_tx_15e10745.hex").read_text().strip()


@pytest.mark.parametrize(
    ("raw", "reason_part"),
    [
        ("", "empty"),
        ("   \n", "empty"),
        (b"", "empty"),
        ("zz", "non-hex"),
        ("0g00", "non-hex"),
        ("abc", "odd-length"),
        ("0100", "truncated"),
        ("01000000", "truncated"),
        (_example_hex()[:-2], "truncated"),
        (_example_hex()[:400], "truncated"),
        (_example_hex() + "00", "trailing"),
        (bytes.fromhex(_example_hex()) + b"\x00\x00", "trailing"),
        ("deadbeef" * 8, ""),
        # segwit marker and flag but an empty witness (Core: "Superfluous witness record")
        (
            "01000000"
            + "0001"
            + "01"
            + "00" * 32
            + "00000000"
            + "00"
            + "ffffffff"
            + "01"
            + "00" * 8
            + "00"
            + "00"
            + "00000000",
            "witness",
        ),
    ],
)
def test_garbage_raises_invalid_transaction_with_a_reason(raw: str | bytes, reason_part: str) -> None:
    with pytest.raises(InvalidTransaction) as info:
        decode_transaction(raw)
    reason = info.value.reason
    assert reason and "\n" not in reason and reason_part in reason
    if isinstance(raw, str):
        summary = decode_summary(raw)
        assert summary["valid"] is False and summary["reason"] == reason


# --- Bitcoin Core vectors ---------------------------------------------------------------------------


@pytest.mark.parametrize(("hex_str", "flags"), _vectors("tx_valid.json"))
def test_core_valid_vectors_decode(hex_str: str, flags: str) -> None:
    tx = decode_transaction(hex_str)
    reference = CTransaction.deserialize(bytes.fromhex(hex_str))
    assert tx.hash == reference.GetTxid()[::-1].hex()
    assert tx.size == len(bytes.fromhex(hex_str))
    assert tx.weight == reference.calc_weight()
    assert tx.vsize == -(-tx.weight // 4)
    assert tx.is_segwit == reference.has_witness()
    assert tx.input_count == len(reference.vin) and tx.output_count == len(reference.vout)


def test_core_valid_vector_count() -> None:
    assert len(_vectors("tx_valid.json")) == 119
    assert len(_vectors("tx_invalid.json")) == 93


@pytest.mark.parametrize(("hex_str", "flags"), _vectors("tx_invalid.json"))
def test_core_invalid_vectors_are_well_formed(hex_str: str, flags: str) -> None:
    """tx_invalid.json is about consensus (scripts, CheckTransaction), not serialization.

    Every entry deserializes; we decode but do not validate scripts or signatures, so they decode too,
    except the BADTX ones whose output amounts the canonical schema cannot hold (negative, or above
    21 million BTC): those must be refused with a reason naming the value.
    """
    reference = CTransaction.deserialize(bytes.fromhex(hex_str))
    values = [o.nValue for o in reference.vout]
    representable = all(0 <= v <= MAX_MONEY for v in values) and sum(values) <= MAX_MONEY
    if representable:
        assert decode_transaction(hex_str).hash == reference.GetTxid()[::-1].hex()
    else:
        assert "BADTX" in flags
        with pytest.raises(InvalidTransaction, match="value"):
            decode_transaction(hex_str)


# --- script classification ----------------------------------------------------------------------------

GENESIS_PUBKEY = (
    "04678afdb0fe5548271967f1a67130b7105cd6a828e03909a67962e0ea1f61deb649f6bc3f4cef38c4f35504e51ec112"
    "de5c384df7ba0b8d578a4c702b6bf11d5f"
)
KEY_02 = "02" + "79be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"


@pytest.mark.parametrize(
    ("script_hex", "script_type", "address"),
    [
        (
            "76a91462e907b15cbf27d5425399ebf6f0fb50ebb88f1888ac",
            "pubkeyhash",
            "1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNa",
        ),
        (
            "a914c9848245ae4f5d5934b5cbdfb79e04cdd337470b87",
            "scripthash",
            "3L4YUynB4X44rJBY9CmiLMN8Wjti49JCYB",
        ),
        ("41" + GENESIS_PUBKEY + "ac", "pubkey", "1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNa"),
        ("21" + KEY_02 + "ac", "pubkey", "1BgGZ9tcN4rm9KBzDn7KprQz87SZ26SAMH"),
        # BIP173 / BIP350 test vectors
        (
            "0014751e76e8199196d454941c45d1b3a323f1433bd6",
            "witness_v0_keyhash",
            "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4",
        ),
        (
            "00201863143c14c5166804bd19203356da136c985678cd4d27a1b8c6329604903262",
            "witness_v0_scripthash",
            "bc1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3qccfmv3",
        ),
        (
            "512079be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798",
            "witness_v1_taproot",
            "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqzk5jj0",
        ),
        (
            "5128751e76e8199196d454941c45d1b3a323f1433bd6751e76e8199196d454941c45d1b3a323f1433bd6",
            "witness_unknown",
            "bc1pw508d6qejxtdg4y5r3zarvary0c5xw7kw508d6qejxtdg4y5r3zarvary0c5xw7kt5nd6y",
        ),
        ("6002751e", "witness_unknown", "bc1sw50qgdz25j"),
        ("5210751e76e8199196d454941c45d1b3a323", "witness_unknown", "bc1zw508d6qejxtdg4y5r3zarvaryvaxxpcs"),
        ("0015751e76e8199196d454941c45d1b3a323f1433bd6aa", "nonstandard", None),  # v0 needs 20 or 32 bytes
        ("6a", "nulldata", None),
        ("6a0d234672656553616d6f75726169", "nulldata", None),
        ("6a24aa21a9ed" + "00" * 32, "nulldata", None),
        ("6aac", "nonstandard", None),  # OP_RETURN followed by a non-push
        ("6a4c", "nonstandard", None),  # truncated push
        ("5121" + KEY_02 + "21" + "03" + KEY_02[2:] + "52ae", "multisig", None),
        ("5121" + KEY_02 + "51ae", "multisig", None),
        ("5221" + KEY_02 + "51ae", "nonstandard", None),  # m > n
        ("5121" + "05" + KEY_02[2:] + "51ae", "nonstandard", None),  # not a pubkey header byte
        ("", "nonstandard", None),
        ("51", "nonstandard", None),
        ("21" + "05" + KEY_02[2:] + "ac", "nonstandard", None),
    ],
)
def test_classify_script(script_hex: str, script_type: str, address: str | None) -> None:
    assert classify_script(bytes.fromhex(script_hex)) == (script_type, address)


ESPLORA_TYPES = {
    "p2pk": "pubkey",
    "p2pkh": "pubkeyhash",
    "p2sh": "scripthash",
    "v0_p2wpkh": "witness_v0_keyhash",
    "v0_p2wsh": "witness_v0_scripthash",
    "v1_p2tr": "witness_v1_taproot",
    "op_return": "nulldata",
    "multisig": "multisig",
    "anchor": "witness_unknown",
}


def test_classify_script_agrees_with_mempool_space(read_fixture: ReadFixture) -> None:
    """Every scriptPubKey in the recorded mempool.space (Esplora) objects gets Esplora's type and address."""
    seen: dict[str, tuple[str, str | None]] = {}

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "scriptpubkey" in node and "scriptpubkey_type" in node:
                seen[node["scriptpubkey"]] = (
                    node["scriptpubkey_type"],
                    node.get("scriptpubkey_address") or None,
                )
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in sorted((FIXTURES / "api" / "mempool_space").glob("*.json")):
        walk(json.loads(read_fixture(path)))
    assert len(seen) >= 40
    assert {"p2pkh", "p2sh", "v0_p2wpkh", "v0_p2wsh", "v1_p2tr", "op_return"} <= {t for t, _ in seen.values()}
    for script_hex, (esplora_type, esplora_address) in seen.items():
        script_type, address = classify_script(bytes.fromhex(script_hex))
        if esplora_type == "unknown":  # Esplora lumps non-standard witness programs in with the rest
            assert script_type in ("nonstandard", "witness_unknown"), script_hex
        else:
            assert script_type == ESPLORA_TYPES[esplora_type], script_hex
        if esplora_type != "p2pk":  # Esplora gives P2PK no address; we give its P2PKH one
            assert address == esplora_address, script_hex


# --- blocks ------------------------------------------------------------------------------------------------

# file → (height or None when the coinbase carries no BIP34 height, tx count)
BLOCKS = {
    "blocks/js-bitcoin-block/genesis.hex": (None, 1),
    "blocks/js-bitcoin-block/000000000424d2cd4654499d26eda28c570e08ba7216b49b4b97b08e7e6f70f4.hex": (None, 5),
    "blocks/js-bitcoin-block/00000000000004bfad597c3a381f1c60612e62d4b70f638a5e3f5099e5265d0b.hex": (
        None,
        86,
    ),
    "blocks/bitcoinkit/block1.raw": (None, 1),
    "blocks/btcd/277647.dat.gz": (277_647, 213),
    "blocks/rbtc/mainnet-00000000000000000379eaa19dce8c9b722d46ae6a57c2f1a988119488b50931.hex": (363_725, 1),
    "blocks/rbtc/mainnet-00000000000002dc756eebf4f49723ed8d30cc28a5f108eb94b1ba88ac4f9c22.hex": (None, 23),
    "blocks/rbtc/mainnet-00000000000743f190a18c5577a3c2d2a1f610ae9601ac046a38084ccb7cd721.hex": (None, 2),
    "blocks/rbtc/mainnet-00000000000a4d0a398161ffc163c503763b1f4360639393e0e4c8e300e0caec.hex": (None, 1),
    f"{BLOCK_388381}.raw.gz": (388_381, 784),
}


def _binary_block(data: bytes) -> bytes:
    """The bare serialized block, whatever the fixture's encoding (hex with line breaks, blk framing)."""
    if data[:4] == BLK_MAGIC:
        (length,) = struct.unpack_from("<I", data, 4)
        return data[8 : 8 + length]
    if all(c in b"0123456789abcdefABCDEF\r\n " for c in data[:200]):
        return bytes.fromhex(data.decode())
    return data


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_fixture_blocks_decode(name: str, read_fixture: ReadFixture) -> None:
    data = read_fixture(name)
    height, tx_count = BLOCKS[name]
    block = decode_block(data)
    reference = CBlock.deserialize(_binary_block(data))

    assert block.tx_count == tx_count == len(block.transactions) == len(reference.vtx)
    assert block.height == height
    assert block.hash == reference.GetHash()[::-1].hex()
    stem = Path(name).name.split(".")[0].removeprefix("mainnet-")
    if len(stem) == 64:
        assert block.hash == stem
    # python-bitcoinlib recomputes the merkle root from its own txids; it must match the header and ours.
    assert reference.calc_merkle_root() == reference.hashMerkleRoot
    assert block.merkle_root == reference.hashMerkleRoot[::-1].hex()
    assert [t.hash for t in block.transactions] == [tx.GetTxid()[::-1].hex() for tx in reference.vtx]
    assert block.size == len(_binary_block(data))
    assert block.weight == reference.GetWeight()
    assert block.time == dt.datetime.fromtimestamp(reference.nTime, dt.UTC)
    assert all(t.first_seen == block.time and t.block_height == height for t in block.transactions)
    assert all(t.source == "block" for t in block.transactions)
    assert block.transactions[0].is_coinbase
    assert not any(t.is_coinbase for t in block.transactions[1:])


@pytest.mark.parametrize(
    "stem",
    [
        "genesis",
        "000000000424d2cd4654499d26eda28c570e08ba7216b49b4b97b08e7e6f70f4",
        "00000000000004bfad597c3a381f1c60612e62d4b70f638a5e3f5099e5265d0b",
    ],
)
def test_blocks_agree_with_bitcoin_core_getblock(stem: str, read_fixture: ReadFixture) -> None:
    """Bitcoin Core's ``getblock <hash> 2`` output: txids, sizes, weights, script types and addresses."""
    folder = FIXTURES / "blocks" / "js-bitcoin-block"
    json_path = folder / f"{stem}.json"
    core = json.loads(read_fixture(json_path if json_path.exists() else folder / f"{stem}.json.gz"))
    block = decode_block(read_fixture(folder / f"{stem}.hex"))
    assert block.hash == core["hash"] and block.tx_count == core["nTx"]
    assert block.size == core["size"] and block.weight == core["weight"]
    for core_tx, tx in zip(core["tx"], block.transactions, strict=True):
        assert (tx.hash, tx.size, tx.vsize, tx.weight) == (
            core_tx["txid"],
            core_tx["size"],
            core_tx["vsize"],
            core_tx["weight"],
        )
        assert tx.version == core_tx["version"] and tx.locktime == core_tx["locktime"]
        for core_out, out in zip(core_tx["vout"], tx.outputs, strict=True):
            spk = core_out["scriptPubKey"]
            assert out.script_type == spk["type"]
            assert out.value == round(core_out["value"] * 100_000_000)
            core_address = spk.get("address") or (spk.get("addresses") or [None])[0]
            if spk["type"] != "pubkey":  # Core shows P2PK without an address
                assert out.address == core_address


def test_block_388381_fees_with_prevouts(read_fixture: ReadFixture, tmp_path: Path) -> None:
    utxos = tmp_path / "utxos.json"
    utxos.write_bytes(read_fixture(f"{BLOCK_388381}.utxos.json.gz"))
    prevouts = load_prevouts(utxos)
    assert prevouts == load_prevouts(FIXTURES / f"{BLOCK_388381}.utxos.json.gz")  # gzip read transparently

    block = decode_block(read_fixture(f"{BLOCK_388381}.raw.gz"), prevouts=prevouts)
    assert block.height == 388_381
    assert all(t.fee is not None for t in block.transactions)
    fees = sum(t.fee or 0 for t in block.transactions[1:])
    assert fees == 15_227_937
    coinbase = block.transactions[0]
    assert coinbase.output_value == _subsidy(388_381) + fees

    assert coinbase.inputs[0].script_type == "coinbase"
    assert coinbase.input_value is None and coinbase.fee == 0 and not coinbase.rbf
    for tx in block.transactions[1:]:
        assert tx.input_value == sum(i.value or 0 for i in tx.inputs)
        assert all(i.script_type != "unknown" for i in tx.inputs)

    # The prevout file lists only external spends: some inputs must have been resolved from the block itself.
    txids = {t.hash for t in block.transactions}
    ref = CBlock.deserialize(read_fixture(f"{BLOCK_388381}.raw.gz"))
    in_block = [i for tx in ref.vtx[1:] for i in tx.vin if i.prevout.hash[::-1].hex() in txids]
    assert in_block and all((i.prevout.hash[::-1].hex(), i.prevout.n) not in prevouts for i in in_block)


def test_block_without_prevouts_has_no_fees_but_coinbase(read_fixture: ReadFixture) -> None:
    block = decode_block(read_fixture(f"{BLOCK_388381}.raw.gz"))
    assert block.transactions[0].fee == 0
    # Spends of outputs created earlier in the block still resolve.
    with_fee = [t for t in block.transactions[1:] if t.fee is not None]
    assert 0 < len(with_fee) < len(block.transactions) - 1


def test_block_input_forms(read_fixture: ReadFixture) -> None:
    hex_text = read_fixture(
        "blocks/rbtc/mainnet-00000000000002dc756eebf4f49723ed8d30cc28a5f108eb94b1ba88ac4f9c22.hex"
    )
    assert b"\n" in hex_text
    binary = bytes.fromhex(hex_text.decode())
    framed = BLK_MAGIC + struct.pack("<I", len(binary)) + binary
    hashes = {
        decode_block(hex_text).hash,
        decode_block(hex_text.decode()).hash,
        decode_block(binary).hash,
        decode_block(framed).hash,
        decode_block(framed + b"\x00" * 16).hash,
    }
    assert hashes == {"00000000000002dc756eebf4f49723ed8d30cc28a5f108eb94b1ba88ac4f9c22"}


def test_iter_blk_file(read_fixture: ReadFixture, tmp_path: Path) -> None:
    frames = read_fixture("blocks/btcd/277647.dat.gz")
    genesis = bytes.fromhex(read_fixture("blocks/js-bitcoin-block/genesis.hex").decode())
    blk = tmp_path / "blk00000.dat"
    blk.write_bytes(frames + BLK_MAGIC + struct.pack("<I", len(genesis)) + genesis + b"\x00" * 64)
    blocks = list(iter_blk_file(blk))
    assert [b.tx_count for b in blocks] == [213, 1]
    assert blocks[0].hash.startswith("0000000000000000054a714e") and blocks[0].hash.endswith("52a8")
    assert blocks[0].height == 277_647 and blocks[1].height is None

    gz = tmp_path / "blk00000.dat.gz"
    gz.write_bytes(gzip.compress(blk.read_bytes()))
    assert [b.hash for b in iter_blk_file(gz)] == [b.hash for b in blocks]
    assert [b.hash for b in iter_blk_bytes(frames)] == [blocks[0].hash]
    with pytest.raises(InvalidBlock, match="stray"):
        list(iter_blk_bytes(frames + b"\x01\x02"))

    bad = tmp_path / "bad.dat"
    bad.write_bytes(b"\x0b\x11\x09\x07" + frames[4:])
    with pytest.raises(InvalidBlock, match="magic"):
        list(iter_blk_file(bad))


@pytest.mark.parametrize(
    ("mutate", "reason_part"),
    [
        (lambda b: b[:-1], "truncated"),
        (lambda b: b + b"\x00", "trailing"),
        (lambda b: b[:50], "too short"),
        (lambda b: b[:200] + bytes([b[200] ^ 0xFF]) + b[201:], ""),
        (lambda b: BLK_MAGIC + struct.pack("<I", len(b) + 10) + b, "frame"),
        (lambda b: BLK_MAGIC + struct.pack("<I", len(b)) + b + b"\x01", "after the framed block"),
    ],
)
def test_corrupt_blocks_raise(
    mutate: Callable[[bytes], bytes], reason_part: str, read_fixture: ReadFixture
) -> None:
    binary = bytes.fromhex(
        read_fixture(
            "blocks/rbtc/mainnet-00000000000002dc756eebf4f49723ed8d30cc28a5f108eb94b1ba88ac4f9c22.hex"
        ).decode()
    )
    with pytest.raises(InvalidTransaction) as info:
        decode_block(mutate(binary))
    assert reason_part in info.value.reason and "\n" not in info.value.reason


def test_tampered_tx_breaks_the_merkle_root(read_fixture: ReadFixture) -> None:
    binary = bytes.fromhex(read_fixture("blocks/js-bitcoin-block/genesis.hex").decode())
    # Same length, different coinbase text: only the merkle root can notice.
    tampered = binary.replace(b"The Times", b"The Tim3s")
    assert tampered != binary
    with pytest.raises(InvalidBlock, match="merkle"):
        decode_block(tampered)


# --- real historical transactions with their prevouts ---------------------------------------------------


def _historical() -> list[dict[str, object]]:
    return json.loads((FIXTURES / "transactions" / "authenticated-historical-transactions.json").read_text())


@pytest.mark.parametrize("case", _historical(), ids=lambda c: str(c["name"]))
def test_authenticated_historical_transactions(case: dict[str, object]) -> None:
    prevouts = PrevoutIndex()
    for prev in case["prev_transactions"]:  # type: ignore[attr-defined]
        raw = bytes.fromhex(prev["transaction"])
        prevouts.add_outputs(CTransaction.deserialize(raw), decode_transaction(raw).hash)
    tx = decode_transaction(str(case["transaction"]), prevouts=prevouts, block_height=int(case["height"]))  # type: ignore[call-overload]

    # The merkle branch from the tx up to the header's merkle root authenticates txid and block.
    header = bytes.fromhex(str(case["block_header"]))
    assert _sha256d(header)[::-1].hex() == case["block_hash"]
    node, position = bytes.fromhex(tx.hash)[::-1], int(case["position"])  # type: ignore[call-overload]
    for sibling_hex in case["merkle"]:  # type: ignore[attr-defined]
        sibling = bytes.fromhex(sibling_hex)[::-1]
        node = _sha256d(sibling + node) if position & 1 else _sha256d(node + sibling)
        position >>= 1
    assert node == header[36:68]

    assert tx.is_segwit and tx.fee is not None and tx.fee > 0
    assert tx.input_value == sum(i.value or 0 for i in tx.inputs)
    assert tx.fee == tx.input_value - tx.output_value
    assert tx.vsize < tx.size  # the witness discount
    if case["name"] == "first-taproot-keypath":
        assert tx.inputs[0].script_type == "witness_v1_taproot"
        assert tx.inputs[0].address is not None and tx.inputs[0].address.startswith("bc1p")
        taproot_outputs = [o for o in tx.outputs if o.script_type == "witness_v1_taproot"]
        assert taproot_outputs and all(o.address and o.address.startswith("bc1p") for o in taproot_outputs)
        assert tx.has_op_return and tx.rbf  # nSequence 0xfffffffd
    if case["name"] == "segwit-activation":
        assert tx.inputs[0].script_type == "witness_v0_keyhash"
