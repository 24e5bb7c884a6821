"""Raw Bitcoin transactions and blocks → canonical :class:`~btc_anomaly.schema.Transaction`.

Deserialization is python-bitcoinlib's (``CTransaction``/``CBlockHeader``); this module only adds what the
canonical record needs on top: script classification with Bitcoin Core's ``decodescript`` names, mainnet
addresses, sizes and weight, and fees from a prevout index. Mainnet only.

Decisions worth knowing:

* A coinbase has no prevouts: its input is ``script_type="coinbase"`` with null address/value, its
  ``input_value`` is null and its ``fee`` is 0 (a coinbase pays no fee; Blockchain.com reports 0 too).
* ``input_value``/``fee`` are set only when every prevout is known; a partial lookup still fills the known
  inputs' address/value/script_type.
* ``rbf`` follows BIP125 (any input nSequence < 0xfffffffe) and is never set on a coinbase, whose
  sequence numbers carry no replacement meaning.
* We decode, we do not validate: signatures and scripts are not checked. Anything that cannot be
  deserialized, or that the canonical schema cannot hold (e.g. a negative output value), raises
  :class:`~btc_anomaly.schema.InvalidTransaction` with a one-line reason.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import io
import string
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import bech32
import orjson
from bitcoin.core import CBlock, CBlockHeader, CTransaction, Hash160
from bitcoin.core.script import CScript, CScriptInvalidError
from bitcoin.core.serialize import SerializationError, SerializationTruncationError, VarIntSerializer
from bitcoin.wallet import P2PKHBitcoinAddress, P2SHBitcoinAddress
from pydantic import ValidationError

from btc_anomaly.schema import InvalidTransaction, Source, Transaction, validation_reason

# Mainnet constants, spelled out so a stray bitcoin.SelectParams() elsewhere cannot change our addresses.
_P2PKH_VERSION = 0x00
_P2SH_VERSION = 0x05
_BECH32_HRP = "bc"
_BECH32M_CONST = 0x2BC830A3  # BIP350
BLK_MAGIC = bytes.fromhex("f9beb4d9")
BIP34_HEIGHT = 227_931  # below it the coinbase height push is not enforced, so not trusted
MAX_MONEY = 21_000_000 * 100_000_000
_SEQUENCE_FINAL_MINUS_ONE = 0xFFFFFFFE
_OP_RETURN = 0x6A
_OP_RETURN_BYTE = b"\x6a"
_OP_CHECKSIG = 0xAC
_OP_CHECKMULTISIG = 0xAE
_HEX_CHARS = frozenset(string.hexdigits.encode() + string.whitespace.encode())

Prevout = tuple[int, bytes]  # (value in sat, scriptPubKey)
PrevoutKey = tuple[str, int]  # (txid as explorers show it, vout)


class InvalidBlock(InvalidTransaction):
    """A block that cannot be decoded; an InvalidTransaction so one ``except`` handles both."""


# --- scripts -------------------------------------------------------------------------------------


@lru_cache(maxsize=1 << 15)
def classify_script(script: bytes) -> tuple[str, str | None]:
    """``(script type, mainnet address or None)`` of a scriptPubKey, named as Core's ``decodescript``.

    Pattern order follows Core's ``Solver``. P2PK yields the P2PKH address of its key, as
    blockchain.info shows it. Cached: change outputs and exchange addresses repeat across a stream.
    """
    n = len(script)
    if n == 25 and script[:3] == b"\x76\xa9\x14" and script[23:] == b"\x88\xac":
        return "pubkeyhash", _base58(script[3:23], _P2PKH_VERSION)
    if n == 23 and script[:2] == b"\xa9\x14" and script[22] == 0x87:
        return "scripthash", _base58(script[2:22], _P2SH_VERSION)
    if 4 <= n <= 42 and (script[0] == 0 or 0x51 <= script[0] <= 0x60) and script[1] + 2 == n:
        version = script[0] - 0x50 if script[0] else 0
        program = script[2:]
        if version == 0:
            if n == 22:
                return "witness_v0_keyhash", _segwit(0, program)
            if n == 34:
                return "witness_v0_scripthash", _segwit(0, program)
            return "nonstandard", None
        if version == 1 and n == 34:
            return "witness_v1_taproot", _segwit(1, program)
        return "witness_unknown", _segwit(version, program)
    if n >= 1 and script[0] == _OP_RETURN and CScript(script[1:]).is_push_only():
        return "nulldata", None
    if n in (35, 67) and script[-1] == _OP_CHECKSIG and script[0] == n - 2 and _valid_pubkey(script[1:-1]):
        return "pubkey", _base58(Hash160(script[1:-1]), _P2PKH_VERSION)
    if n and script[-1] == _OP_CHECKMULTISIG and _is_multisig(script):
        return "multisig", None
    return "nonstandard", None


def _base58(payload: bytes, version: int) -> str:
    cls = P2PKHBitcoinAddress if version == _P2PKH_VERSION else P2SHBitcoinAddress
    return str(cls.from_bytes(payload, version))


def _segwit(version: int, program: bytes) -> str:
    """BIP173/BIP350 address: bech32 checksum for v0, bech32m for v1+.

    Neither python-bitcoinlib 0.12 nor the ``bech32`` 1.2 package knows bech32m (the latter checksums every
    version with the v0 constant, which gives invalid taproot addresses), so only the checksum constant
    is ours; the polymod, HRP expansion and base32 conversion are the reference package's.
    """
    data = [version, *(bech32.convertbits(program, 8, 5) or [])]
    const = 1 if version == 0 else _BECH32M_CONST
    polymod = bech32.bech32_polymod([*bech32.bech32_hrp_expand(_BECH32_HRP), *data, 0, 0, 0, 0, 0, 0]) ^ const
    checksum = [(polymod >> 5 * (5 - i)) & 31 for i in range(6)]
    return _BECH32_HRP + "1" + "".join(bech32.CHARSET[d] for d in data + checksum)


def _valid_pubkey(data: bytes) -> bool:
    """Core's CPubKey::ValidSize: the header byte must agree with the length."""
    if len(data) == 33:
        return data[0] in (2, 3)
    if len(data) == 65:
        return data[0] in (4, 6, 7)
    return False


def _is_multisig(script: bytes) -> bool:
    """Core's MatchMultisig: ``m <pubkey>... n CHECKMULTISIG`` with 1 <= m <= n <= 20."""
    try:
        ops = [(op, data) for op, data, _ in CScript(script).raw_iter()]
    except CScriptInvalidError:
        return False
    if len(ops) < 4 or ops[-1][0] != _OP_CHECKMULTISIG:
        return False
    required = _script_small_number(*ops[0])
    if required is None:
        return False
    keys = 0
    i = 1
    while i < len(ops) and ops[i][1] is not None and _valid_pubkey(ops[i][1]):
        keys += 1
        i += 1
    total = _script_small_number(*ops[i]) if i < len(ops) else None
    return total is not None and required <= total == keys and i + 2 == len(ops)


def _script_small_number(op: int, data: bytes | None) -> int | None:
    if 0x51 <= op <= 0x60:
        return op - 0x50
    # 17..20 keys can only be written minimally as a one-byte push.
    if op == 1 and data is not None and 17 <= data[0] <= 20:
        return data[0]
    return None


# --- prevouts ------------------------------------------------------------------------------------


class PrevoutIndex(dict[PrevoutKey, Prevout]):
    """``(txid hex, vout) → (value sat, scriptPubKey bytes)``: what fee computation needs to know."""

    @classmethod
    def from_records(cls, records: list[dict[str, Any]]) -> PrevoutIndex:
        index = cls()
        for r in records:
            index[(str(r["txid"]).lower(), int(r["vout"]))] = (
                int(r["value_sats"]),
                bytes.fromhex(r["script_pubkey"]),
            )
        return index

    def add_outputs(self, tx: CTransaction, txid: str) -> None:
        for n, out in enumerate(tx.vout):
            self[(txid, n)] = (out.nValue, bytes(out.scriptPubKey))


def load_prevouts(path: str | Path) -> PrevoutIndex:
    """Read a ``*.utxos.json`` list (``[{txid, vout, value_sats, script_pubkey, ...}]``); gzip is fine."""
    data = Path(path).read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return PrevoutIndex.from_records(orjson.loads(data))


# --- transactions --------------------------------------------------------------------------------


def decode_transaction(
    raw: bytes | str,
    *,
    prevouts: Mapping[PrevoutKey, Prevout] | None = None,
    first_seen: dt.datetime | None = None,
    block_height: int | None = None,
    source: Source = "rawtx",
) -> Transaction:
    """Decode one serialized transaction (hex string, whitespace tolerated, or raw bytes)."""
    data = _hex_to_bytes(raw) if isinstance(raw, str) else bytes(raw)
    if not data:
        raise InvalidTransaction("empty transaction", raw)
    stream = io.BytesIO(data)
    tx = _read_tx(stream, data, raw)
    if stream.tell() != len(data):
        raise InvalidTransaction(f"{len(data) - stream.tell()} trailing bytes after the transaction", raw)
    return _canonical(
        tx,
        data,
        lookups=(prevouts,) if prevouts else (),
        first_seen=first_seen or dt.datetime.now(dt.UTC),
        block_height=block_height,
        source=source,
        raw=raw,
    )[0]


def decode_summary(hex_str: str) -> dict[str, Any]:
    """One JSON-able line per transaction for ``btc-anomaly decode``; never raises on bad input."""
    try:
        tx = decode_transaction(hex_str)
    except InvalidTransaction as exc:
        return {"txid": None, "valid": False, "reason": exc.reason}
    return {
        "txid": tx.hash,
        "valid": True,
        "input_count": tx.input_count,
        "output_count": tx.output_count,
        "output_value": tx.output_value,
        "script_types": [o.script_type for o in tx.outputs],
        "is_segwit": tx.is_segwit,
        "is_coinbase": tx.is_coinbase,
        "rbf": tx.rbf,
        "has_op_return": tx.has_op_return,
        "size": tx.size,
        "vsize": tx.vsize,
        "weight": tx.weight,
    }


def _hex_to_bytes(text: str) -> bytes:
    digits = "".join(text.split())
    if not digits:
        raise InvalidTransaction("empty input", text)
    if len(digits) % 2:
        raise InvalidTransaction(f"odd-length hex ({len(digits)} digits)", text)
    try:
        return bytes.fromhex(digits)
    except ValueError:
        pos = next(i for i, c in enumerate(digits) if c not in string.hexdigits)
        raise InvalidTransaction(f"non-hex character {digits[pos]!r} at position {pos}", text) from None


def _read_tx(stream: io.BytesIO, data: bytes, raw: bytes | str | None) -> CTransaction:
    start = stream.tell()
    try:
        tx = CTransaction.stream_deserialize(stream)
    except SerializationTruncationError as exc:
        raise InvalidTransaction(f"truncated transaction at byte {start}: {exc}", raw) from None
    except (SerializationError, struct.error, ValueError) as exc:
        raise InvalidTransaction(f"not a transaction: {exc}", raw) from None
    if not tx.has_witness() and data[start + 4 : start + 6] == b"\x00\x01":
        # Core refuses this too ("Superfluous witness record"): the marker promises witnesses.
        raise InvalidTransaction("segwit marker present but every witness is empty", raw)
    return tx


def _canonical(
    tx: CTransaction,
    data: bytes,
    *,
    lookups: tuple[Mapping[PrevoutKey, Prevout] | None, ...],
    first_seen: dt.datetime,
    block_height: int | None,
    source: Source,
    raw: bytes | str | None = None,
) -> tuple[Transaction, str, bytes]:
    """The canonical record, the txid hex and the txid in internal byte order."""
    if tx.has_witness():
        stripped = CTransaction(tx.vin, tx.vout, tx.nLockTime, tx.nVersion).serialize()
        weight = 3 * len(stripped) + len(data)
    else:
        stripped = data
        weight = 4 * len(data)
    txid_le = _sha256d(stripped)
    txid = txid_le[::-1].hex()
    coinbase = tx.is_coinbase()

    inputs: list[dict[str, Any]] = []
    input_value: int | None = 0
    if coinbase:
        inputs.append({"address": None, "value": None, "script_type": "coinbase"})
        input_value = None
    else:
        for txin in tx.vin:
            key = (txin.prevout.hash[::-1].hex(), txin.prevout.n)
            prevout = next((p[key] for p in lookups if p is not None and key in p), None)
            if prevout is None:
                inputs.append({"address": None, "value": None, "script_type": "unknown"})
                input_value = None
                continue
            value, spk = prevout
            script_type, address = classify_script(spk)
            inputs.append({"address": address, "value": value, "script_type": script_type})
            if input_value is not None:
                input_value += value

    outputs: list[dict[str, Any]] = []
    output_value = 0
    has_op_return = False
    for n, out in enumerate(tx.vout):
        if not 0 <= out.nValue <= MAX_MONEY:
            raise InvalidTransaction(f"output {n} value {out.nValue} is out of range", raw)
        spk = bytes(out.scriptPubKey)
        script_type, address = classify_script(spk)
        outputs.append({"address": address, "value": out.nValue, "script_type": script_type})
        output_value += out.nValue
        has_op_return = has_op_return or spk[:1] == _OP_RETURN_BYTE
    if output_value > MAX_MONEY:
        raise InvalidTransaction(f"total output value {output_value} sat exceeds 21 million BTC", raw)

    fee: int | None = None
    if coinbase:
        fee = 0
    elif input_value is not None:
        fee = input_value - output_value
        if fee < 0:
            raise InvalidTransaction(f"outputs ({output_value} sat) exceed inputs ({input_value} sat)", raw)

    record = {
        "hash": txid,
        "first_seen": first_seen,
        "block_height": block_height,
        "version": tx.nVersion,
        "locktime": tx.nLockTime,
        "size": len(data),
        "vsize": (weight + 3) // 4,
        "weight": weight,
        "fee": fee,
        "input_count": len(inputs),
        "output_count": len(outputs),
        "input_value": input_value,
        "output_value": output_value,
        "is_coinbase": coinbase,
        "has_op_return": has_op_return,
        "is_segwit": tx.has_witness(),
        "rbf": not coinbase and any(i.nSequence < _SEQUENCE_FINAL_MINUS_ONE for i in tx.vin),
        "inputs": inputs,
        "outputs": outputs,
        "source": source,
    }
    try:
        return Transaction.model_validate(record), txid, txid_le
    except ValidationError as exc:
        raise InvalidTransaction(validation_reason(exc), raw) from None


def _sha256d(data: bytes) -> bytes:
    return hashlib.sha256(hashlib.sha256(data).digest()).digest()


# --- blocks --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DecodedBlock:
    hash: str
    height: int | None  # BIP34 coinbase height; None before BIP34 or when absent
    time: dt.datetime
    tx_count: int
    transactions: list[Transaction]
    prev_hash: str
    merkle_root: str
    version: int
    size: int
    weight: int


def decode_block(
    data: bytes | str,
    *,
    prevouts: Mapping[PrevoutKey, Prevout] | None = None,
    source: Source = "block",
) -> DecodedBlock:
    """Decode a block given as binary, hex (line breaks tolerated) or one blk*.dat frame.

    Prevouts created earlier in the same block are resolved from the block itself, so a prevout index
    only needs the block's external spends. The merkle root is recomputed and must match the header.
    """
    raw = _block_bytes(data)
    stream = io.BytesIO(raw)
    try:
        header = CBlockHeader.stream_deserialize(stream)
        tx_count = VarIntSerializer.stream_deserialize(stream)
    except (SerializationError, struct.error) as exc:
        raise InvalidBlock(f"truncated block header: {exc}") from None
    header_len = stream.tell()
    txs: list[tuple[CTransaction, bytes]] = []
    for i in range(tx_count):
        start = stream.tell()
        try:
            tx = _read_tx(stream, raw, None)
        except InvalidTransaction as exc:
            raise InvalidBlock(f"tx {i} of {tx_count}: {exc.reason}") from None
        txs.append((tx, raw[start : stream.tell()]))
    if stream.tell() != len(raw):
        raise InvalidBlock(f"{len(raw) - stream.tell()} trailing bytes after {tx_count} transactions")
    if not txs:
        raise InvalidBlock("block has no transactions")

    block_time = dt.datetime.fromtimestamp(header.nTime, dt.UTC)
    height = _bip34_height(header.nVersion, txs[0][0])
    in_block = PrevoutIndex()
    transactions: list[Transaction] = []
    txids: list[bytes] = []
    for i, (tx, tx_raw) in enumerate(txs):
        try:
            record, txid, txid_le = _canonical(
                tx,
                tx_raw,
                lookups=(in_block, prevouts),
                first_seen=block_time,
                block_height=height,
                source=source,
            )
        except InvalidTransaction as exc:
            raise InvalidBlock(f"tx {i}: {exc.reason}") from None
        in_block.add_outputs(tx, txid)
        transactions.append(record)
        txids.append(txid_le)

    if CBlock.build_merkle_tree_from_txids(txids)[-1] != header.hashMerkleRoot:
        raise InvalidBlock("merkle root of the transactions does not match the header")
    return DecodedBlock(
        hash=header.GetHash()[::-1].hex(),
        height=height,
        time=block_time,
        tx_count=tx_count,
        transactions=transactions,
        prev_hash=header.hashPrevBlock[::-1].hex(),
        merkle_root=header.hashMerkleRoot[::-1].hex(),
        version=header.nVersion,
        size=len(raw),
        weight=4 * header_len + sum(t.weight for t in transactions),
    )


def iter_blk_file(
    path: str | Path,
    *,
    prevouts: Mapping[PrevoutKey, Prevout] | None = None,
    source: Source = "block",
) -> Iterator[DecodedBlock]:
    """Decode every framed block of a Bitcoin Core ``blk*.dat`` file (gzip is fine)."""
    data = Path(path).read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return iter_blk_bytes(data, prevouts=prevouts, source=source)


def iter_blk_bytes(
    data: bytes,
    *,
    prevouts: Mapping[PrevoutKey, Prevout] | None = None,
    source: Source = "block",
) -> Iterator[DecodedBlock]:
    """Decode consecutive ``magic + length + block`` frames, stopping at the zero padding Core leaves."""
    offset = 0
    while offset + 8 <= len(data):
        magic = data[offset : offset + 4]
        if magic == b"\x00\x00\x00\x00":
            break
        if magic != BLK_MAGIC:
            raise InvalidBlock(f"bad network magic {magic.hex()} at offset {offset}")
        (length,) = struct.unpack_from("<I", data, offset + 4)
        end = offset + 8 + length
        if end > len(data):
            raise InvalidBlock(f"block at offset {offset} claims {length} bytes, the data ends first")
        yield decode_block(data[offset + 8 : end], prevouts=prevouts, source=source)
        offset = end
    if data[offset:].strip(b"\x00"):
        raise InvalidBlock(f"{len(data) - offset} stray bytes at offset {offset} after the last frame")


def _block_bytes(data: bytes | str) -> bytes:
    if isinstance(data, str):
        raw = _hex_to_bytes(data)
    else:
        raw = bytes(data)
        if raw[:64] and all(b in _HEX_CHARS for b in raw[:64]):
            raw = _hex_to_bytes(raw.decode("ascii", errors="replace"))
    if raw[:4] == BLK_MAGIC:
        if len(raw) < 8:
            raise InvalidBlock("blk frame shorter than its 8-byte prefix")
        (length,) = struct.unpack_from("<I", raw, 4)
        body, rest = raw[8 : 8 + length], raw[8 + length :]
        if len(body) < length:
            raise InvalidBlock(f"blk frame claims {length} bytes but holds {len(body)}")
        if rest.strip(b"\x00"):
            raise InvalidBlock("data after the framed block; use iter_blk_file for several blocks")
        raw = body
    if len(raw) < 81:
        raise InvalidBlock(f"{len(raw)} bytes is too short for a block")
    return raw


def _bip34_height(version: int, coinbase: CTransaction) -> int | None:
    if version < 2 or not coinbase.is_coinbase():
        return None
    try:
        _op, data, _ = next(iter(CScript(coinbase.vin[0].scriptSig).raw_iter()))
    except (StopIteration, CScriptInvalidError):
        return None
    if data is None or not 1 <= len(data) <= 4 or data[-1] & 0x80:
        return None
    height = int.from_bytes(data, "little")
    return height if height >= BIP34_HEIGHT else None
