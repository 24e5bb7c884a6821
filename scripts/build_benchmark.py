"""Build ``src/btc_anomaly/resources/benchmark.jsonl.gz``: a labelled detection benchmark from real data.

    .venv/bin/python scripts/build_benchmark.py --shared /work/shared/data

Two splits, one JSON object per line (``id, split, label, archetype, source_txid, source_block, change, tx,
hex``; ``tx`` is exactly ``Transaction.to_json_bytes()``; ``hex`` is the serialized transaction for the anomalies
and the raw split, empty for the canonical normals: see ``Row.keeps_hex``):

* ``canonical``: prevouts known, so fee and input value are exact. The normals (label 0) are the block
  transactions ``scripts/build_sample.py`` holds out of ``data/sample`` (never trained on). The anomalies
  (label 1) are held-out transactions modified one way each (see ``CANONICAL_ARCHETYPES``), plus a few
  real historical oddities from the recorded API responses.
* ``raw``: what ``/predict/raw`` sees, no prevout lookup, fee and input value null. The normals are
  transactions of the raw blocks that are not in the sample; the anomalies are some of them modified,
  plus real oddities of those blocks.

Every modified transaction is rebuilt with python-bitcoinlib, serialized (with witness) and decoded again
by ``btc_anomaly.ingestion.decode.decode_transaction`` with a prevout map holding its (possibly modified)
prevout values, so size, vsize, weight, hash, fee, input value, script types and addresses are always
the decoder's. Signatures are not valid for the modified transactions (nothing here signs); the decoder
does not check them, and every other consensus rule the canonical record reflects (values in range, fee
>= 0, weight <= 4,000,000) holds.

Deterministic (seeded per archetype, fixed input order, gzip mtime 0): a rerun is byte-identical.
Writes ``data/benchmark/SOURCES.md`` with provenance, counts, sha256 and the recipe of every archetype.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import hashlib
import io
import math
import random
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from bitcoin.core import (
    CBlock,
    CBlockHeader,
    COutPoint,
    CTransaction,
    CTxIn,
    CTxInWitness,
    CTxOut,
    CTxWitness,
    lx,
)
from bitcoin.core.script import OP_RETURN, CScript, CScriptWitness

from btc_anomaly.config import PROJECT_ROOT
from btc_anomaly.features import DUST_LIMIT_SAT
from btc_anomaly.ingestion.decode import (
    BLK_MAGIC,
    classify_script,
    decode_block,
    decode_transaction,
    load_prevouts,
)
from btc_anomaly.schema import Transaction

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_sample  # scripts/ is not a package

SEED = "btc-anomaly-benchmark-v1"
MAX_WEIGHT = 4_000_000  # consensus limit of a block, so of any transaction in one
RAW_NORMALS = 1_500
N_ROWS = 26  # anomalies per archetype and split
# Archetypes whose rows carry ~1,000-3,000 real inputs or outputs, or a 100-300 kB payload, each (file size).
N_ROWS_HEAVY = 12
RAW_SALT = "raw-normal:"

# Heights of the shared blocks whose coinbase carries no BIP34 height (from the shared data's SOURCES.md).
KNOWN_HEIGHTS = {
    "000000000019d6689c085ae165831e934ff763ae46a2a6c172b3f1b60a8ce26f": 0,
    "00000000839a8e6886ab5951d76f411475428afc90947ee320161bbf18eb6048": 1,
    "000000000424d2cd4654499d26eda28c570e08ba7216b49b4b97b08e7e6f70f4": 62_500,
    "00000000000a4d0a398161ffc163c503763b1f4360639393e0e4c8e300e0caec": 91_842,
    "00000000000743f190a18c5577a3c2d2a1f610ae9601ac046a38084ccb7cd721": 91_880,
    "00000000000004bfad597c3a381f1c60612e62d4b70f638a5e3f5099e5265d0b": 137_500,
    "00000000000002dc756eebf4f49723ed8d30cc28a5f108eb94b1ba88ac4f9c22": 170_060,
    "000000000000034a7dedef4a161fa058a2d67a173a90155f3a2fe6fc132e0ebf": 200_000,
}

# Real oddities with known prevouts, from the recorded API responses (none of them is in data/sample).
CANONICAL_HISTORICAL: dict[str, tuple[str, str, str]] = {
    # txid: (archetype, file under the shared dir, why)
    "f859a4e6692c3f15a279449eac191ecb9d17d2d6c003bbae9a55e5da07147eab": (
        "historical_annex_fee_burn",
        "api/mempool_space/non-standard-txs.json",
        "a taproot spend whose witness carries an annex (non-standard to relay), mined in block 896,088; its "
        "only output is an OP_RETURN, so its whole 11,586-sat input is fee (fee share 100 %)",
    ),
    "b10c0000004da5a9d1d9b4ae32e09f0b3e62d21a5cce5428d4ad714fb444eb5d": (
        "historical_every_script_type",
        "api/mempool_space/transactions-random.json",
        "a showcase mined in block 850,000: a vanity txid (b10c0000004d…), locktime set to the genesis "
        "block's timestamp, 10 inputs and 9 outputs of every script type (P2PK, bare multisig, P2A, "
        "OP_RETURN, ...), the paying ones worth 240-582 sat",
    ),
    "20b984492b5264162a4c92c9a34bc7fa08b67d669de7b4c5982ad3cb28aaecf6": (
        "historical_unknown_witness_output",
        "api/mempool_space/transactions-random.json",
        "a Runes runestone (OP_RETURN OP_13) that pays 546 sat to a 20-byte witness v1 program, an undefined "
        "(witness_unknown) output type that consensus leaves unencumbered",
    ),
}
FIRST_TAPROOT = (
    "33e794d097969002ee05d336686fc03c9e15a597c1b9827669460fac98799036",
    "historical_first_taproot_spend",
    "transactions/authenticated-historical-transactions.json",
    "the first taproot key-path spend (block 709,635, three blocks after activation): an OP_RETURN message "
    "paying 24 % of its input as fee, 126 sat/vB",
)


# --- data ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Inp:
    """One input as it appears in a real transaction, with its prevout when known."""

    txin: CTxIn
    wit: CTxInWitness
    prevout: tuple[int, bytes] | None  # (value sat, scriptPubKey)

    @property
    def key(self) -> tuple[str, int]:
        return (self.txin.prevout.hash[::-1].hex(), self.txin.prevout.n)


@dataclass
class Block:
    file: str  # path under the shared dir
    hash: str
    height: int | None
    time: dt.datetime
    txs: list[CTransaction]
    records: list[Transaction]  # one per tx, canonical (with prevouts) or raw (without)
    prevouts: dict[tuple[str, int], tuple[int, bytes]] | None  # canonical blocks: external + in-block
    inputs: dict[str, list[Inp]] = field(default_factory=dict)  # txid → its inputs
    input_pool: list[Inp] = field(default_factory=list)  # every non-coinbase input of the block
    output_pool: list[tuple[int, bytes]] = field(default_factory=list)  # real spendable outputs
    median_fee_rate: float | None = None

    def __post_init__(self) -> None:
        for tx, rec in zip(self.txs, self.records, strict=True):
            if rec.is_coinbase:
                continue
            self.inputs[rec.hash] = ins = inputs_of(tx, self.prevouts)
            self.input_pool.extend(ins)
            for out in tx.vout:
                spk = bytes(out.scriptPubKey)
                if out.nValue > 0 and classify_script(spk)[0] != "nulldata":
                    self.output_pool.append((out.nValue, spk))
        if self.prevouts is not None:
            self.median_fee_rate = statistics.median(
                r.fee / r.vsize for r in self.records if not r.is_coinbase and r.fee is not None
            )

    @property
    def canonical(self) -> bool:
        return self.prevouts is not None

    def by_hash(self) -> dict[str, tuple[CTransaction, Transaction]]:
        return {r.hash: (t, r) for t, r in zip(self.txs, self.records, strict=True)}


def inputs_of(tx: CTransaction, prevouts: dict[tuple[str, int], tuple[int, bytes]] | None) -> list[Inp]:
    wits = list(tx.wit.vtxinwit) + [CTxInWitness()] * (len(tx.vin) - len(tx.wit.vtxinwit))
    out = []
    for txin, wit in zip(tx.vin, wits, strict=True):
        key = (txin.prevout.hash[::-1].hex(), txin.prevout.n)
        out.append(Inp(txin, wit, None if prevouts is None else prevouts[key]))
    return out


def block_bytes(path: Path) -> list[bytes]:
    """The serialized blocks of a shared file: binary, hex (line breaks allowed) or blk*.dat framing."""
    data = path.read_bytes()
    if path.suffix == ".hex":
        return [bytes.fromhex("".join(data.decode().split()))]
    if data[:4] != BLK_MAGIC:
        return [data]
    out, offset = [], 0
    while offset + 8 <= len(data) and data[offset : offset + 4] == BLK_MAGIC:
        length = int.from_bytes(data[offset + 4 : offset + 8], "little")
        out.append(data[offset + 8 : offset + 8 + length])
        offset += 8 + length
    return out


def header_time(header: CBlockHeader) -> dt.datetime:
    return dt.datetime.fromtimestamp(header.nTime, dt.UTC)


def load_canonical_blocks(shared: Path) -> list[Block]:
    """The four rBTC blocks with a prevout view, every transaction decoded with exact fees."""
    blocks = []
    for utxos in sorted((shared / "blocks" / "rbtc").glob("*.utxos.json")):
        raw_path = utxos.with_name(utxos.name.replace(".utxos.json", ".raw"))
        raw = raw_path.read_bytes()
        cblock = CBlock.deserialize(raw)
        prevouts = dict(load_prevouts(utxos))
        for tx in cblock.vtx:
            txid = tx.GetTxid()[::-1].hex()
            for n, out in enumerate(tx.vout):
                prevouts[(txid, n)] = (out.nValue, bytes(out.scriptPubKey))
        time = header_time(cblock.get_header())
        decoded = decode_block(raw, prevouts=load_prevouts(utxos))
        assert decoded.height is not None
        # Normals are exactly the sample's decoder output; anomalies are decoded one by one below, so
        # check that one-by-one decoding reproduces the block decoder.
        for tx, rec in zip(cblock.vtx[1:50], decoded.transactions[1:50], strict=True):
            again = decode_transaction(
                tx.serialize(),
                prevouts=prevouts,
                first_seen=time,
                block_height=decoded.height,
                source="block",
            )
            assert again.to_json_bytes() == rec.to_json_bytes(), rec.hash
        blocks.append(
            Block(
                file=str(raw_path.relative_to(shared)),
                hash=decoded.hash,
                height=decoded.height,
                time=time,
                txs=list(cblock.vtx),
                records=decoded.transactions,
                prevouts=prevouts,
            )
        )
    return sorted(blocks, key=lambda b: b.height or 0)


def load_raw_blocks(shared: Path, exclude: set[str]) -> list[Block]:
    """Every other shared block, each transaction decoded alone without prevouts (as /predict/raw)."""
    blocks = []
    for path in sorted((shared / "blocks").rglob("*")):
        if path.is_dir() or path.suffix not in (".raw", ".hex", ".blk", ".dat"):
            continue
        for raw in block_bytes(path):
            cblock = CBlock.deserialize(raw)
            block_hash = cblock.GetHash()[::-1].hex()
            if block_hash in exclude:
                continue
            time = header_time(cblock.get_header())
            records = []
            for tx in cblock.vtx:
                rec = decode_transaction(tx.serialize(), first_seen=time, source="rawtx")
                assert rec.hash == tx.GetTxid()[::-1].hex()
                records.append(rec)
            height = KNOWN_HEIGHTS.get(block_hash)
            if height is None:
                height = decode_block(raw).height
            assert height is not None, path
            blocks.append(
                Block(
                    file=str(path.relative_to(shared)),
                    hash=block_hash,
                    height=height,
                    time=time,
                    txs=list(cblock.vtx),
                    records=records,
                    prevouts=None,
                )
            )
    return sorted(blocks, key=lambda b: b.height or 0)


# --- building transactions -------------------------------------------------------------------------------


@dataclass
class Built:
    tx: Transaction
    hex: str


def assemble(
    block: Block,
    like: CTransaction,
    inputs: list[Inp],
    outputs: list[tuple[int, bytes]],
    prevout_values: dict[tuple[str, int], int] | None = None,
) -> Built:
    """Serialize the transaction and decode it again with the project's decoder."""
    ctx = serialize_tx(like, inputs, outputs)
    raw = ctx.serialize()
    prevouts = None
    if block.canonical:
        prevouts = {}
        for i in inputs:
            assert i.prevout is not None
            value = (prevout_values or {}).get(i.key, i.prevout[0])
            prevouts[i.key] = (value, i.prevout[1])
    tx = decode_transaction(
        raw,
        prevouts=prevouts,
        first_seen=block.time,
        block_height=block.height if block.canonical else None,
        source="block" if block.canonical else "rawtx",
    )
    assert tx.weight <= MAX_WEIGHT, (tx.hash, tx.weight)
    return Built(tx, raw.hex())


def serialize_tx(like: CTransaction, inputs: list[Inp], outputs: list[tuple[int, bytes]]) -> CTransaction:
    wits = [i.wit for i in inputs]
    witness = CTxWitness(wits) if any(not w.is_null() for w in wits) else CTxWitness()
    vout = [CTxOut(v, CScript(spk)) for v, spk in outputs]
    return CTransaction([i.txin for i in inputs], vout, like.nLockTime, like.nVersion, witness)


def vsize_of(like: CTransaction, inputs: list[Inp], outputs: list[tuple[int, bytes]]) -> int:
    ctx = serialize_tx(like, inputs, outputs)
    full = len(ctx.serialize())
    stripped = len(CTransaction(ctx.vin, ctx.vout, ctx.nLockTime, ctx.nVersion).serialize())
    return (3 * stripped + full + 3) // 4


def op_return(payload: bytes) -> bytes:
    return bytes(CScript([OP_RETURN, payload]))


def filler(length: int, tag: str) -> bytes:
    """A large OP_RETURN payload: readable ASCII, deliberately repetitive so the file stays small."""
    unit = f"btc-anomaly benchmark payload {tag} / ".encode()
    return (unit * (length // len(unit) + 1))[:length]


def loguniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def largest(outputs: list[tuple[int, bytes]]) -> int:
    """Index of the largest spendable output (the change, in the recipes); ties: the first."""
    best = -1
    for k, (v, spk) in enumerate(outputs):
        if classify_script(spk)[0] != "nulldata" and (best < 0 or v > outputs[best][0]):
            best = k
    return best


def is_dust(value: int, spk: bytes) -> bool:
    return value < DUST_LIMIT_SAT and classify_script(spk)[0] != "nulldata"


def dust_count(tx: Transaction) -> int:
    return sum(1 for o in tx.outputs if o.value < DUST_LIMIT_SAT and o.script_type != "nulldata")


def fee_rate(tx: Transaction) -> float:
    assert tx.fee is not None
    return tx.fee / tx.vsize


def sat(n: float) -> str:
    return f"{round(n):,} sat"


def btc(n: int) -> str:
    return f"{n / 1e8:,.8f}".rstrip("0").rstrip(".") + " BTC"


def rate(x: float) -> str:
    return f"{x:,.3g} sat/vB" if x < 100 else f"{x:,.0f} sat/vB"


# --- the anomaly recipes ---------------------------------------------------------------------------------


@dataclass
class Source:
    block: Block
    ctx: CTransaction
    rec: Transaction

    @property
    def inputs(self) -> list[Inp]:
        return self.block.inputs[self.rec.hash]

    @property
    def outputs(self) -> list[tuple[int, bytes]]:
        return [(o.nValue, bytes(o.scriptPubKey)) for o in self.ctx.vout]


@dataclass(frozen=True)
class Maxima:
    """The largest value of each past-range quantity over the sample (and, for raw, the raw normals)."""

    fee_rate: float
    fee: int
    output_value: int
    input_count: int
    output_count: int
    vsize: int
    dust_outputs: int
    size: int

    @classmethod
    def of(cls, txs: list[Transaction]) -> Maxima:
        with_fee = [t for t in txs if t.fee is not None]
        return cls(
            fee_rate=max((fee_rate(t) for t in with_fee), default=0.0),
            fee=max((t.fee or 0 for t in with_fee), default=0),
            output_value=max(t.output_value for t in txs),
            input_count=max(t.input_count for t in txs),
            output_count=max(t.output_count for t in txs),
            vsize=max(t.vsize for t in txs),
            dust_outputs=max(dust_count(t) for t in txs),
            size=max(t.size for t in txs),
        )

    def merge(self, other: Maxima) -> Maxima:
        return Maxima(*(max(a, b) for a, b in zip(vars(self).values(), vars(other).values(), strict=True)))


Recipe = Callable[[Source, random.Random, "Context"], tuple[Built, str] | None]


@dataclass
class Context:
    maxima: Maxima
    row: int = 0  # index of the row being built within its archetype


def take_from_outputs(
    outputs: list[tuple[int, bytes]], amount: int
) -> tuple[list[tuple[int, bytes]], list[int]] | None:
    """Lower output values by ``amount`` in total, largest first, leaving each spendable output >= 546 sat."""
    outs = list(outputs)
    touched = []
    for k in sorted(range(len(outs)), key=lambda k: (-outs[k][0], k)):
        if amount <= 0:
            break
        v, spk = outs[k]
        if classify_script(spk)[0] == "nulldata":
            continue
        cut = min(amount, v - DUST_LIMIT_SAT)
        if cut <= 0:
            continue
        outs[k] = (v - cut, spk)
        amount -= cut
        touched.append(k)
    return None if amount > 0 else (outs, touched)


def set_fee(src: Source, new_fee: int, why: str) -> tuple[Built, str] | None:
    """Same transaction, fee changed to ``new_fee`` by moving value to or from the largest output."""
    fee = src.rec.fee or 0
    outs = src.outputs
    k = largest(outs)
    if k < 0:
        return None
    v, spk = outs[k]
    new_value = v + fee - new_fee
    if new_value < DUST_LIMIT_SAT:
        return None
    outs[k] = (new_value, spk)
    built = assemble(src.block, src.ctx, src.inputs, outs)
    assert built.tx.fee == new_fee
    delta = new_fee - fee
    moved = f"{sat(abs(delta))} {'taken from' if delta > 0 else 'added to'} output {k} (its largest)"
    return built, f"fee {sat(fee)} -> {sat(new_fee)} ({why}); {moved}"


def fee_overpayment(src: Source, rng: random.Random, ctx: Context) -> tuple[Built, str] | None:
    """Fee rate = F x the source block's median fee rate, F log-uniform in [10, 1000]; the extra fee is
    taken from the largest output, which must keep >= 546 sat (else the source is skipped, as when its own
    fee is already higher). Nothing else changes."""
    median = src.block.median_fee_rate or 0.0
    factor = loguniform(rng, 10, 1000)
    new_fee = math.ceil(factor * median * src.rec.vsize)
    if new_fee <= (src.rec.fee or 0):
        return None
    why = (
        f"{rate(fee_rate(src.rec))} -> {rate(new_fee / src.rec.vsize)}, {factor:.0f}x the block's median "
        f"fee rate of {rate(median)}"
    )
    return set_fee(src, new_fee, why)


def fee_share_burn(src: Source, rng: random.Random, ctx: Context) -> tuple[Built, str] | None:
    """Fee = S x the input value, S uniform in [0.30, 0.95]; the extra fee is taken from the outputs,
    largest first, each keeping >= 546 sat (sources whose outputs cannot give that much are skipped)."""
    share = rng.uniform(0.30, 0.95)
    input_value = src.rec.input_value or 0
    fee = src.rec.fee or 0
    new_fee = round(share * input_value)
    if new_fee <= fee:
        return None
    taken = take_from_outputs(src.outputs, new_fee - fee)
    if taken is None:
        return None
    outs, touched = taken
    built = assemble(src.block, src.ctx, src.inputs, outs)
    assert built.tx.fee == new_fee
    where = ", ".join(str(k) for k in touched)
    return built, (
        f"fee {sat(fee)} -> {sat(new_fee)} = {share:.1%} of the {sat(input_value)} input value; "
        f"the {sat(new_fee - fee)} taken from output(s) {where}, largest first, each left >= 546 sat"
    )


def zero_fee(src: Source, rng: random.Random, ctx: Context) -> tuple[Built, str] | None:
    """Fee = 0 exactly: the old fee is added to the largest output (sources paying no fee are skipped)."""
    if not src.rec.fee:
        return None
    return set_fee(src, 0, "no fee at all")


def below_relay_fee(src: Source, rng: random.Random, ctx: Context) -> tuple[Built, str] | None:
    """Fee = max(1, floor(R x vsize)) sat, R uniform in [0.05, 0.95], so 0 < fee rate < 1 sat/vB;
    the difference is added to the largest output."""
    target = rng.uniform(0.05, 0.95)
    new_fee = max(1, math.floor(target * src.rec.vsize))
    if not 0 < new_fee < src.rec.vsize or new_fee >= (src.rec.fee or 0):
        return None
    why = (
        f"{rate(fee_rate(src.rec))} -> {new_fee / src.rec.vsize:.2f} sat/vB, under the 1 sat/vB relay minimum"
    )
    return set_fee(src, new_fee, why)


PAYOUT_RANGE = (DUST_LIMIT_SAT, 1_000_000)  # values of the outputs a mass payout borrows: 546 sat - 0.01 BTC


def borrowed_outputs(
    src: Source, rng: random.Random, n: int, values: tuple[int, int] | None = None
) -> list[tuple[int, bytes]] | None:
    """``n`` distinct real (value, script) outputs of the source's block (None if it has fewer), optionally
    only among those whose value lies in ``values``."""
    pool = src.block.output_pool
    if values is not None:
        pool = [o for o in pool if values[0] <= o[0] <= values[1]]
    return rng.sample(pool, n) if n <= len(pool) else None


def with_fee_rate_kept(
    src: Source,
    inputs: list[Inp],
    outs: list[tuple[int, bytes]],
    change: int,
) -> tuple[Built, int] | None:
    """Set output ``change`` so the fee rate stays the source's (canonical) or the output value is kept
    (raw, fee unknown). Returns the built transaction and the new fee (0 for raw)."""
    if src.block.canonical:
        in_value = sum(i.prevout[0] for i in inputs if i.prevout)
        vsize = vsize_of(src.ctx, inputs, outs)
        new_fee = round(fee_rate(src.rec) * vsize)
        rest = sum(v for k, (v, _) in enumerate(outs) if k != change)
        value = in_value - rest - new_fee
    else:
        new_fee = 0
        rest = sum(v for k, (v, _) in enumerate(outs) if k != change)
        value = src.rec.output_value - rest
    if value < DUST_LIMIT_SAT or value > 21_000_000 * 100_000_000:
        return None
    outs = list(outs)
    outs[change] = (value, outs[change][1])
    built = assemble(src.block, src.ctx, inputs, outs)
    if src.block.canonical:
        assert built.tx.fee == new_fee
    return built, new_fee


def fee_kept_text(src: Source, built: Built) -> str:
    if not src.block.canonical:
        return "total output value kept (fee unknown: no prevouts)"
    return (
        f"fee rate kept at {rate(fee_rate(src.rec))} (fee {sat(src.rec.fee or 0)} -> {sat(built.tx.fee or 0)}, "
        f"vsize {src.rec.vsize:,} -> {built.tx.vsize:,} vB)"
    )


def dust_fanout(src: Source, rng: random.Random, ctx: Context) -> tuple[Built, str] | None:
    """The outputs are replaced by N dust outputs, N = round(log-uniform in [100, 1000]), each of a uniform
    1-545 sat (below the 546-sat dust limit ``features.DUST_LIMIT_SAT`` counts), paying the scripts of N
    distinct real outputs of the same block, plus the source's largest output (the change) at a random
    position. Canonical: the change gets input value - dust - fee, the fee being the source's fee rate x
    the new vsize (skipped if the change would fall under 546 sat). Raw (fee unknown): the change gets the
    old output value - dust, so the total output value (and the unknown fee) stay."""
    n = round(loguniform(rng, 100, 1000))
    k = largest(src.outputs)
    if k < 0:
        return None
    change_spk = src.outputs[k][1]
    borrowed = borrowed_outputs(src, rng, n)
    if borrowed is None:
        return None
    dust = [(rng.randint(1, DUST_LIMIT_SAT - 1), spk) for _, spk in borrowed]
    pos = rng.randrange(n + 1)
    outs = [*dust[:pos], (0, change_spk), *dust[pos:]]
    done = with_fee_rate_kept(src, src.inputs, outs, pos)
    if done is None:
        return None
    built, _ = done
    total = sum(v for v, _ in dust)
    return built, (
        f"its {src.rec.output_count} output(s) replaced by {n} dust outputs of 1-545 sat ({sat(total)} in "
        f"all) to the scripts of distinct real outputs of block {src.block.height:,}"
        f", plus its change output (the old output {k}) at position {pos}; " + fee_kept_text(src, built)
    )


def other_inputs(src: Source) -> list[Inp]:
    """The real inputs of the source's block that the source itself does not spend."""
    own = {i.key for i in src.inputs}
    return [i for i in src.block.input_pool if i.key not in own]


def borrow_inputs(src: Source, rng: random.Random, n: int) -> list[Inp]:
    """``n`` real inputs of other transactions of the block, in BIP69 order (by outpoint).

    Each keeps its outpoint, nSequence and prevout (value, script). Its unlocking data (scriptSig and
    witness) is replaced by that of an earlier borrowed input of exactly the same shape (scriptSig length
    and witness item lengths), which leaves size, weight and vsize byte-identical while the repeated bytes
    compress; none of the signatures of a modified transaction would verify anyway.
    """
    picked = sorted(rng.sample(other_inputs(src), n), key=lambda i: i.key)
    seen: dict[tuple[int, tuple[int, ...]], tuple[CScript, CTxInWitness]] = {}
    out = []
    for i in picked:
        shape = (len(i.txin.scriptSig), tuple(len(x) for x in i.wit.scriptWitness.stack))
        if shape in seen:
            script_sig, wit = seen[shape]
            i = Inp(CTxIn(i.txin.prevout, script_sig, i.txin.nSequence), wit, i.prevout)
        else:
            seen[shape] = (i.txin.scriptSig, i.wit)
        out.append(i)
    return out


def consolidation(src: Source, rng: random.Random, ctx: Context) -> tuple[Built, str] | None:
    """N inputs, N = round(log-uniform in [200, 3000]) (at most the inputs the block has): the source's own
    plus real inputs of other transactions of the same block (``borrow_inputs``), with their real prevout
    values and scripts, all in BIP69 order. One output (the source's largest output's script) or, with
    probability 1/2, two (plus its second-largest output, value unchanged). The first output gets input
    value - other output - fee at the source's fee rate x the new vsize."""
    own = src.inputs
    n = round(loguniform(rng, 200, 3000))
    n = min(n, len(own) + len(other_inputs(src)))
    if n < 200 or n <= len(own):
        return None
    inputs = sorted([*own, *borrow_inputs(src, rng, n - len(own))], key=lambda i: i.key)
    outs_src = src.outputs
    order = sorted(
        (k for k, (_, spk) in enumerate(outs_src) if classify_script(spk)[0] != "nulldata"),
        key=lambda k: (-outs_src[k][0], k),
    )
    if not order:
        return None
    two = rng.random() < 0.5 and len(order) >= 2
    outs = [(0, outs_src[order[0]][1])]
    if two:
        outs.append(outs_src[order[1]])
    done = with_fee_rate_kept(src, inputs, outs, 0)
    if done is None:
        return None
    built, _ = done
    kept = (
        f"its two largest outputs (the second with its value {sat(outs_src[order[1]][0])})"
        if two
        else ("its largest output")
    )
    return built, (
        f"{n:,} inputs: its own {len(own)} plus {n - len(own):,} real inputs of other transactions of block "
        f"{src.block.height:,} (real outpoints, prevout values and scripts; unlocking data, see borrow_inputs); "
        f"outputs reduced "
        f"to {kept}; " + fee_kept_text(src, built)
    )


def huge_transfer(src: Source, rng: random.Random, ctx: Context) -> tuple[Built, str] | None:
    """Every output value and every prevout value scaled by T / output value, T log-uniform in
    [10,000, 60,000] BTC (rounded down; the residue goes to the largest output and the largest prevout),
    so the output value is exactly T and the fee is unchanged in sat."""
    target = round(loguniform(rng, 10_000, 60_000) * 100_000_000)
    old = src.rec.output_value
    if old <= 0:
        return None
    scale = target / old
    outs = [(math.floor(v * scale), spk) for v, spk in src.outputs]
    k = largest(outs)
    outs[k] = (outs[k][0] + target - sum(v for v, _ in outs), outs[k][1])
    fee = src.rec.fee or 0
    values = {i.key: math.floor((i.prevout[0] if i.prevout else 0) * scale) for i in src.inputs}
    big = max(values, key=lambda key: (values[key], key))
    values[big] += target + fee - sum(values.values())
    if values[big] <= 0:
        return None
    built = assemble(src.block, src.ctx, src.inputs, outs, prevout_values=values)
    assert built.tx.fee == fee and built.tx.output_value == target
    return built, (
        f"every output and prevout value scaled by {scale:,.1f}x: output value {btc(old)} -> {btc(target)}, "
        f"input value {btc(src.rec.input_value or 0)} -> {btc(built.tx.input_value or 0)} (rounding residue on "
        f"the largest output and prevout); fee unchanged at {sat(fee)}"
    )


def op_return_spam(src: Source, rng: random.Random, ctx: Context) -> tuple[Built, str] | None:
    """Even rows: 1-20 OP_RETURN outputs (uniform count) with random payloads of 40-80 bytes each; odd
    rows: one OP_RETURN with a 1,000-50,000-byte payload (repetitive ASCII, so the file compresses). The
    outputs are inserted at random positions with value 0. Canonical: the fee rate is kept (the extra fee
    comes from the largest output); raw: no value changes."""
    outs = src.outputs
    k = largest(outs)
    if k < 0:
        return None
    if ctx.row % 2 == 0:
        m = rng.randint(1, 20)
        lengths = [rng.randint(40, 80) for _ in range(m)]
        added = [op_return(rng.randbytes(n)) for n in lengths]
        what = (
            f"{m} OP_RETURN outputs with random payloads of {min(lengths)}-{max(lengths)} bytes"
            if m > 1
            else f"one OP_RETURN output with a random payload of {lengths[0]} bytes"
        )
    else:
        n = rng.randint(1_000, 50_000)
        added = [op_return(filler(n, src.rec.hash[:8]))]
        what = f"one OP_RETURN output with a {n:,}-byte payload (repetitive ASCII)"
    positions = sorted(rng.randrange(len(outs) + 1) for _ in added)
    new = list(outs)
    change = k
    for shift, (pos, spk) in enumerate(zip(positions, added, strict=True)):
        new.insert(pos + shift, (0, spk))
        if pos + shift <= change:
            change += 1
    done = with_fee_rate_kept(src, src.inputs, new, change)
    if done is None:
        return None
    built, _ = done
    via = f"; the value comes from output {k} (its largest)" if src.block.canonical else ""
    return built, f"added {what} at random positions; " + fee_kept_text(src, built) + via


# past range: 1.5-20x beyond the sample maximum unless the block weight limit or the file size caps it
FACTORS: dict[str, tuple[float, float]] = {
    "fee_rate": (1.5, 20.0),
    "fee": (1.5, 20.0),
    "output_value": (1.5, 20.0),
    "dust_outputs": (1.5, 20.0),
    # The next four add real bytes to every row (an OP_RETURN of ~150-250 kB, ~1,000 inputs, ~1,700 outputs):
    # kept near the low end so the file stays small (and < 4,000,000 weight). A count at 1.6x is no more
    # past range than one at 1.5x, while each added input or output is ~60-80 incompressible bytes.
    "vsize": (1.5, 2.5),
    "size": (1.5, 2.5),
    "input_count": (1.5, 1.6),
    "output_count": (1.5, 1.6),
}


def past_fee_rate(src: Source, rng: random.Random, ctx: Context) -> tuple[Built, str] | None:
    """Fee rate = F x the sample's maximum fee rate (F log-uniform in [1.5, 20]), the extra fee taken from
    the largest output (skipped if it cannot give that much)."""
    factor = loguniform(rng, *FACTORS["fee_rate"])
    target = factor * ctx.maxima.fee_rate
    new_fee = math.ceil(target * src.rec.vsize)
    why = f"{rate(fee_rate(src.rec))} -> {rate(new_fee / src.rec.vsize)} = {factor:.1f}x the sample maximum {rate(ctx.maxima.fee_rate)}"
    return set_fee(src, new_fee, why)


def past_fee(src: Source, rng: random.Random, ctx: Context) -> tuple[Built, str] | None:
    """Fee = F x the sample's maximum fee (F log-uniform in [1.5, 20]), taken from the outputs, largest
    first, each keeping >= 546 sat."""
    factor = loguniform(rng, *FACTORS["fee"])
    new_fee = math.ceil(factor * ctx.maxima.fee)
    fee = src.rec.fee or 0
    taken = take_from_outputs(src.outputs, new_fee - fee)
    if taken is None:
        return None
    outs, touched = taken
    built = assemble(src.block, src.ctx, src.inputs, outs)
    assert built.tx.fee == new_fee
    return built, (
        f"fee {sat(fee)} -> {sat(new_fee)} = {factor:.1f}x the sample maximum {sat(ctx.maxima.fee)}; taken from "
        f"output(s) {', '.join(map(str, touched))}, largest first, each left >= 546 sat"
    )


def past_output_value(src: Source, rng: random.Random, ctx: Context) -> tuple[Built, str] | None:
    """Output value = F x the sample's maximum (F log-uniform in [1.5, 20]): the difference is added to the
    largest output and to the value of the largest prevout, so the fee is unchanged."""
    factor = loguniform(rng, *FACTORS["output_value"])
    target = math.ceil(factor * ctx.maxima.output_value)
    delta = target - src.rec.output_value
    outs = src.outputs
    k = largest(outs)
    if k < 0:
        return None
    outs[k] = (outs[k][0] + delta, outs[k][1])
    values = {i.key: i.prevout[0] for i in src.inputs if i.prevout}
    big = max(values, key=lambda key: (values[key], key))
    values[big] += delta
    built = assemble(src.block, src.ctx, src.inputs, outs, prevout_values=values)
    assert built.tx.output_value == target and built.tx.fee == src.rec.fee
    return built, (
        f"output value {btc(src.rec.output_value)} -> {btc(target)} = {factor:.1f}x the sample maximum "
        f"{btc(ctx.maxima.output_value)}: {btc(delta)} added to output {k} (its largest) and to the value of "
        f"its largest prevout, so the fee stays {sat(src.rec.fee or 0)}"
    )


def past_input_count(src: Source, rng: random.Random, ctx: Context) -> tuple[Built, str] | None:
    """Input count = max(ceil(F x the maximum), maximum + 1), F log-uniform in [1.5, 1.6]: real inputs of other
    transactions of the same block appended (``borrow_inputs``). Canonical: the fee rate is kept and the
    outputs are untouched, so the appended inputs' prevout values are scaled (all by one factor) to pay
    exactly the extra fee. Raw: nothing else changes."""
    factor = loguniform(rng, *FACTORS["input_count"])
    n = max(math.ceil(factor * ctx.maxima.input_count), ctx.maxima.input_count + 1)
    own = src.inputs
    if n - len(own) > len(other_inputs(src)):
        return None
    borrowed = borrow_inputs(src, rng, n - len(own))
    inputs = [*own, *borrowed]
    outs = src.outputs
    head = (
        f"{n - len(own):,} real inputs of other transactions of block {src.block.height:,} appended ({len(own)} "
        f"-> {n:,} inputs = {n / ctx.maxima.input_count:.2f}x the maximum {ctx.maxima.input_count:,}); "
    )
    if not src.block.canonical:
        built = assemble(src.block, src.ctx, inputs, outs)
        return built, head + "outputs unchanged (fee unknown: no prevouts)"
    # Outputs stay as they are: the added inputs' prevout values are scaled so that together they pay
    # exactly the extra fee the larger transaction owes at the source's fee rate.
    fee = src.rec.fee or 0
    new_fee = round(fee_rate(src.rec) * vsize_of(src.ctx, inputs, outs))
    real = {i.key: i.prevout[0] for i in borrowed if i.prevout}
    scale = (new_fee - fee) / sum(real.values())
    values = {key: math.floor(v * scale) for key, v in real.items()}
    big = max(values, key=lambda key: (values[key], key))
    values[big] += new_fee - fee - sum(values.values())
    built = assemble(src.block, src.ctx, inputs, outs, prevout_values=values)
    assert built.tx.fee == new_fee and built.tx.output_value == src.rec.output_value
    return built, head + (
        f"their real prevout values scaled by {scale:.3g} so that together they pay exactly the extra fee; "
        f"outputs unchanged; " + fee_kept_text(src, built)
    )


def past_output_count(src: Source, rng: random.Random, ctx: Context) -> tuple[Built, str] | None:
    """Output count = max(ceil(F x the maximum), maximum + 1), F log-uniform in [1.5, 1.6]: outputs appended
    that pay distinct real outputs of the same block whose value is 546 sat - 0.01 BTC, at their real
    values, scaled down by one factor (>= 0.05, each >= 546 sat) when the largest output cannot fund them.
    The largest output pays for them (and, canonical, for the extra fee at the kept fee rate)."""
    factor = loguniform(rng, *FACTORS["output_count"])
    n = max(math.ceil(factor * ctx.maxima.output_count), ctx.maxima.output_count + 1)
    outs = src.outputs
    k = largest(outs)
    if k < 0 or n <= len(outs):
        return None
    borrowed = borrowed_outputs(src, rng, n - len(outs), PAYOUT_RANGE)
    if borrowed is None:
        return None
    available = outs[k][0] - DUST_LIMIT_SAT
    if src.block.canonical:  # the fee grows with the size at the kept fee rate
        extra_vsize = vsize_of(src.ctx, src.inputs, [*outs, *borrowed]) - src.rec.vsize
        available -= math.ceil(fee_rate(src.rec) * extra_vsize) + 1
    scale = min(1.0, available / sum(v for v, _ in borrowed))
    if scale < 0.05:
        return None
    while True:
        added = [(max(DUST_LIMIT_SAT, math.floor(v * scale)), spk) for v, spk in borrowed]
        if sum(v for v, _ in added) <= available:
            break
        scale *= 0.99
    done = with_fee_rate_kept(src, src.inputs, [*outs, *added], k)
    if done is None:
        return None
    built, _ = done
    scaled = f", scaled by {scale:.2g} (at least 546 sat)" if scale < 1 else ""
    return built, (
        f"{len(added):,} outputs appended ({len(outs)} -> {n:,} = {n / ctx.maxima.output_count:.2f}x the maximum "
        f"{ctx.maxima.output_count:,}), paying distinct real outputs of block {src.block.height:,} worth 546 sat "
        f"- 0.01 BTC at their real values{scaled}, funded by output {k} (its largest); "
        + fee_kept_text(src, built)
    )


def _grow(src: Source, rng: random.Random, ctx: Context, quantity: str) -> tuple[Built, str] | None:
    """One OP_RETURN output appended whose payload (repetitive ASCII) brings vsize (canonical) or size (raw)
    to F x the maximum, F log-uniform in [1.5, 2.5] (the payload bytes are real bytes of the file, so the
    range stays low; 10x would already reach the 4,000,000 weight limit). Canonical: fee rate kept, the
    extra fee from the largest output."""
    factor = loguniform(rng, *FACTORS[quantity])
    maximum = ctx.maxima.vsize if quantity == "vsize" else ctx.maxima.size
    target = math.ceil(factor * maximum)
    outs = src.outputs
    k = largest(outs)
    if k < 0:
        return None
    measure = src.rec.vsize if quantity == "vsize" else src.rec.size
    length = max(1, target - measure - 14)
    for _ in range(4):
        new = [*outs, (0, op_return(filler(length, src.rec.hash[:8])))]
        ctx_tx = serialize_tx(src.ctx, src.inputs, new)
        got = vsize_of(src.ctx, src.inputs, new) if quantity == "vsize" else len(ctx_tx.serialize())
        if got == target:
            break
        length += target - got
    done = with_fee_rate_kept(src, src.inputs, new, k)
    if done is None:
        return None
    built, _ = done
    got = built.tx.vsize if quantity == "vsize" else built.tx.size
    if got <= maximum:
        return None
    unit = "vB" if quantity == "vsize" else "bytes"
    return built, (
        f"one OP_RETURN output with a {length:,}-byte payload (repetitive ASCII) appended: {quantity} "
        f"{measure:,} -> {got:,} {unit} = {got / maximum:.2f}x the maximum {maximum:,}; "
        + fee_kept_text(src, built)
    )


def past_vsize(src: Source, rng: random.Random, ctx: Context) -> tuple[Built, str] | None:
    return _grow(src, rng, ctx, "vsize")


def past_size(src: Source, rng: random.Random, ctx: Context) -> tuple[Built, str] | None:
    return _grow(src, rng, ctx, "size")


past_vsize.__doc__ = past_size.__doc__ = _grow.__doc__


def past_dust_outputs(src: Source, rng: random.Random, ctx: Context) -> tuple[Built, str] | None:
    """Dust outputs = max(ceil(F x the maximum), maximum + 1), F log-uniform in [1.5, 20]: outputs of a
    uniform 1-545 sat appended, paying distinct real output scripts of the same block, funded by the
    largest output; canonical: fee rate kept."""
    factor = loguniform(rng, *FACTORS["dust_outputs"])
    n = max(math.ceil(factor * ctx.maxima.dust_outputs), ctx.maxima.dust_outputs + 1)
    outs = src.outputs
    have = sum(1 for v, spk in outs if is_dust(v, spk))
    k = largest(outs)
    if k < 0 or n <= have:
        return None
    borrowed = borrowed_outputs(src, rng, n - have)
    if borrowed is None:
        return None
    added = [(rng.randint(1, DUST_LIMIT_SAT - 1), spk) for _, spk in borrowed]
    done = with_fee_rate_kept(src, src.inputs, [*outs, *added], k)
    if done is None:
        return None
    built, _ = done
    assert dust_count(built.tx) == n
    return built, (
        f"{len(added)} dust outputs of 1-545 sat ({sat(sum(v for v, _ in added))}) appended to real output scripts "
        f"of block {src.block.height:,}: {have} -> {n} dust outputs = {n / ctx.maxima.dust_outputs:.1f}x the "
        f"maximum {ctx.maxima.dust_outputs}, funded by output {k} (its largest); " + fee_kept_text(src, built)
    )


CANONICAL_ARCHETYPES: dict[str, tuple[Recipe, int]] = {
    "fee_overpayment": (fee_overpayment, N_ROWS),
    "fee_share_burn": (fee_share_burn, N_ROWS),
    "zero_fee": (zero_fee, N_ROWS),
    "below_relay_fee": (below_relay_fee, N_ROWS),
    "dust_fanout": (dust_fanout, N_ROWS),
    "consolidation": (consolidation, N_ROWS_HEAVY),
    "huge_transfer": (huge_transfer, N_ROWS),
    "op_return_spam": (op_return_spam, N_ROWS),
    "past_range_fee_rate": (past_fee_rate, N_ROWS),
    "past_range_fee": (past_fee, N_ROWS),
    "past_range_output_value": (past_output_value, N_ROWS),
    "past_range_input_count": (past_input_count, N_ROWS_HEAVY),
    "past_range_output_count": (past_output_count, N_ROWS_HEAVY),
    "past_range_vsize": (past_vsize, N_ROWS_HEAVY),
    "past_range_dust_outputs": (past_dust_outputs, N_ROWS),
}
RAW_ARCHETYPES: dict[str, tuple[Recipe, int]] = {
    "past_range_size": (past_size, N_ROWS_HEAVY),
    "past_range_input_count": (past_input_count, N_ROWS_HEAVY),
    "past_range_output_count": (past_output_count, N_ROWS_HEAVY),
    "dust_fanout": (dust_fanout, N_ROWS),
    "op_return_spam": (op_return_spam, N_ROWS),
}
# The quantity each past_range archetype pushes, read off a canonical Transaction.
PAST_RANGE: dict[str, Callable[[Transaction], float]] = {
    "fee_rate": fee_rate,
    "fee": lambda t: t.fee or 0,
    "output_value": lambda t: t.output_value,
    "input_count": lambda t: t.input_count,
    "output_count": lambda t: t.output_count,
    "vsize": lambda t: t.vsize,
    "dust_outputs": dust_count,
    "size": lambda t: t.size,
}


# --- rows ------------------------------------------------------------------------------------------------


@dataclass
class Row:
    split: str
    label: int
    archetype: str
    source_txid: str
    source_block: int | None
    change: str
    tx: Transaction
    hex: str  # always held (the build checks every row against it); written only when ``keeps_hex``

    @property
    def keeps_hex(self) -> bool:
        """Whether the file carries ``hex``: anomalies (modified, or real oddities) and the raw split.

        A canonical normal is an unmodified block transaction whose canonical ``tx`` is what is evaluated
        (its serialization is in the shared block, ``source_txid`` names it); its ``hex`` is written empty.
        """
        return self.label == 1 or self.split == "raw"


def interleaved(sources: dict[int, list[Source]], rng: random.Random) -> Iterator[Source]:
    """Each block's sources shuffled, then taken round-robin across blocks."""
    lists = []
    for key in sorted(sources):
        items = list(sources[key])
        rng.shuffle(items)
        lists.append(items)
    for k in range(max(len(x) for x in lists)):
        for items in lists:
            if k < len(items):
                yield items[k]


def make_anomalies(
    split: str,
    archetypes: dict[str, tuple[Recipe, int]],
    sources: dict[int, list[Source]],
    maxima: Maxima,
    used: set[str],
) -> list[Row]:
    rows = []
    for name, (recipe, wanted) in archetypes.items():
        rng = random.Random(f"{SEED}:{split}:{name}")
        ctx = Context(maxima)
        made = 0
        for src in interleaved(sources, rng):
            if made == wanted:
                break
            if src.rec.hash in used:
                continue
            result = recipe(src, rng, ctx)
            if result is None:
                continue
            built, change = result
            check_past_range(name, built.tx, maxima)
            used.add(src.rec.hash)
            rows.append(Row(split, 1, name, src.rec.hash, src.block.height, change, built.tx, built.hex))
            made += 1
            ctx.row += 1
        if made < wanted:
            raise SystemExit(f"{split}/{name}: only {made} of {wanted} sources qualified")
    return rows


def check_past_range(archetype: str, tx: Transaction, maxima: Maxima) -> None:
    if archetype.startswith("past_range_"):
        quantity = archetype.removeprefix("past_range_")
        value = PAST_RANGE[quantity](tx)
        assert value >= 1.5 * getattr(maxima, quantity), (archetype, tx.hash, value)


# --- historical oddities ---------------------------------------------------------------------------------


def esplora_tx(obj: dict[str, Any]) -> tuple[bytes, dict[tuple[str, int], tuple[int, bytes]]]:
    """Re-serialize an Esplora (mempool.space) tx object; checked against its txid, size and weight."""
    vin, wits, prevouts = [], [], {}
    for i in obj["vin"]:
        vin.append(
            CTxIn(COutPoint(lx(i["txid"]), i["vout"]), CScript(bytes.fromhex(i["scriptsig"])), i["sequence"])
        )
        wits.append(CTxInWitness(CScriptWitness([bytes.fromhex(w) for w in i.get("witness") or []])))
        prevouts[(i["txid"], i["vout"])] = (
            i["prevout"]["value"],
            bytes.fromhex(i["prevout"]["scriptpubkey"]),
        )
    vout = [CTxOut(o["value"], CScript(bytes.fromhex(o["scriptpubkey"]))) for o in obj["vout"]]
    witness = CTxWitness(wits) if any(not w.is_null() for w in wits) else CTxWitness()
    tx = CTransaction(vin, vout, obj["locktime"], obj["version"], witness)
    raw = tx.serialize()
    assert tx.GetTxid()[::-1].hex() == obj["txid"] and len(raw) == obj["size"], obj["txid"]
    return raw, prevouts


def canonical_historical(shared: Path) -> list[Row]:
    rows = []
    for txid, (archetype, rel, why) in CANONICAL_HISTORICAL.items():
        data = orjson.loads((shared / rel).read_bytes())
        (obj,) = [t for t in (data if isinstance(data, list) else [data]) if t["txid"] == txid]
        raw, prevouts = esplora_tx(obj)
        status = obj["status"]
        tx = decode_transaction(
            raw,
            prevouts=prevouts,
            first_seen=dt.datetime.fromtimestamp(status["block_time"], dt.UTC),
            block_height=status["block_height"],
            source="block",
        )
        assert tx.hash == txid and tx.weight == obj["weight"] and tx.fee == obj["fee"]
        rows.append(
            Row(
                "canonical",
                1,
                archetype,
                txid,
                status["block_height"],
                f"unmodified real transaction: {why}",
                tx,
                raw.hex(),
            )
        )
    txid, archetype, rel, why = FIRST_TAPROOT
    (item,) = [t for t in orjson.loads((shared / rel).read_bytes()) if t["name"] == "first-taproot-keypath"]
    prevouts = {}
    for prev in item["prev_transactions"]:
        ptx = CTransaction.deserialize(bytes.fromhex(prev["transaction"]))
        for n, out in enumerate(ptx.vout):
            prevouts[(ptx.GetTxid()[::-1].hex(), n)] = (out.nValue, bytes(out.scriptPubKey))
    header = CBlockHeader.deserialize(bytes.fromhex(item["block_header"]))
    assert header.GetHash()[::-1].hex() == item["block_hash"]
    tx = decode_transaction(
        item["transaction"],
        prevouts=prevouts,
        first_seen=header_time(header),
        block_height=item["height"],
        source="block",
    )
    assert tx.hash == txid and tx.fee is not None
    rows.append(
        Row(
            "canonical",
            1,
            archetype,
            txid,
            item["height"],
            f"unmodified real transaction: {why}",
            tx,
            item["transaction"],
        )
    )
    return rows


@dataclass(frozen=True)
class RawOddity:
    archetype: str
    why: str
    match: Callable[[Transaction], bool]
    limit: int | None = None  # keep this many (lowest rank); the others leave the benchmark


RAW_ODDITIES = (
    RawOddity(
        "historical_dust_fanout",
        "a real 2011 dust fan-out: 126 of its 127 outputs are below 546 sat",
        lambda t: dust_count(t) >= 20,
    ),
    RawOddity(
        "historical_bare_multisig",
        "pays a bare (non-P2SH) 1-of-N multisig output, an old-style script little used in 2015 except to "
        "embed data (Counterparty's encoding)",
        lambda t: any(o.script_type == "multisig" for o in t.outputs),
    ),
    RawOddity(
        "historical_nonstandard_multisig_data",
        "three outputs shaped like 1-of-2 multisig whose second 'key' is 33 bytes of Counterparty data (a bet "
        "on whether a block hash is even or odd, starting 'CNTRPRTY'), so non-standard",
        lambda t: any(o.script_type == "nonstandard" for o in t.outputs),
    ),
    RawOddity(
        "historical_large_sweep",
        "one of the largest sweeps in the raw blocks: 250-450 inputs into 1-2 outputs, 40-80 kB",
        lambda t: t.input_count >= 250,
    ),
    RawOddity(
        "historical_sweep_wave",
        "one of 33 near-identical 200-input, 1-output P2SH sweeps (65 kB each, mostly witness) that fill 2.2 of "
        "the 2.26 MB of block 540,107",
        lambda t: t.input_count >= 200 and t.output_count == 1 and t.size > 60_000 and t.is_segwit,
        limit=2,
    ),
)
# Transactions like these are kept out of the raw normals even when not picked as oddities.
RAW_EXCLUDED = ("other transactions with >= 200 inputs", lambda t: t.input_count >= 200)


def rank(salt: str, txid: str) -> bytes:
    return hashlib.sha256((salt + txid).encode()).digest()


# --- output ----------------------------------------------------------------------------------------------


def row_bytes(row: Row, rid: str) -> bytes:
    return orjson.dumps(
        {
            "id": rid,
            "split": row.split,
            "label": row.label,
            "archetype": row.archetype,
            "source_txid": row.source_txid,
            "source_block": row.source_block,
            "change": row.change,
            "tx": orjson.loads(row.tx.to_json_bytes()),
            "hex": row.hex if row.keeps_hex else "",
        }
    )


def write(rows: list[Row], path: Path) -> bytes:
    ids: Counter[str] = Counter()
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        for row in rows:
            prefix = "c" if row.split == "canonical" else "r"
            ids[prefix] += 1
            gz.write(row_bytes(row, f"{prefix}-{ids[prefix]:04d}") + b"\n")
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shared", type=Path, required=True, help="the shared real-data directory (read-only)"
    )
    parser.add_argument(
        "--out", type=Path, default=PROJECT_ROOT / "src" / "btc_anomaly" / "resources" / "benchmark.jsonl.gz"
    )
    parser.add_argument("--sources-md", type=Path, default=PROJECT_ROOT / "data" / "benchmark" / "SOURCES.md")
    parser.add_argument(
        "--sample", type=Path, default=PROJECT_ROOT / "data" / "sample" / "transactions.jsonl.gz"
    )
    args = parser.parse_args()

    sample = [Transaction.from_json(line) for line in gzip.decompress(args.sample.read_bytes()).splitlines()]
    sample_hashes = {t.hash for t in sample}
    sample_max = Maxima.of(sample)

    # canonical split
    blocks = load_canonical_blocks(args.shared)
    normals: list[Row] = []
    sources: dict[int, list[Source]] = {}
    for block in blocks:
        by_hash = block.by_hash()
        held = build_sample.held_out(block.records)
        missing = [h for h in by_hash if h not in sample_hashes and h not in set(held)]
        assert not missing and not set(held) & sample_hashes, "rebuild data/sample first (build_sample.py)"
        assert block.height is not None
        sources[block.height] = []
        for h in held:
            ctx, rec = by_hash[h]
            normals.append(Row("canonical", 0, "normal", h, block.height, "", rec, ctx.serialize().hex()))
            sources[block.height].append(Source(block, ctx, rec))
    used: set[str] = set()
    canonical = [
        *normals,
        *make_anomalies("canonical", CANONICAL_ARCHETYPES, sources, sample_max, used),
        *canonical_historical(args.shared),
    ]

    # raw split
    raw_blocks = load_raw_blocks(args.shared, exclude={b.hash for b in blocks})
    picked: dict[str, list[tuple[Block, CTransaction, Transaction]]] = {o.archetype: [] for o in RAW_ODDITIES}
    pool: list[tuple[Block, CTransaction, Transaction]] = []
    excluded = Counter()
    for block in raw_blocks:
        for ctx, rec in zip(block.txs, block.records, strict=True):
            if rec.is_coinbase:
                continue
            assert rec.hash not in sample_hashes
            oddity = next((o for o in RAW_ODDITIES if o.match(rec)), None)
            if oddity is not None:
                picked[oddity.archetype].append((block, ctx, rec))
            elif RAW_EXCLUDED[1](rec):
                excluded[RAW_EXCLUDED[0]] += 1
            else:
                pool.append((block, ctx, rec))
    pool.sort(key=lambda x: rank(RAW_SALT, x[2].hash))
    chosen = sorted(pool[:RAW_NORMALS], key=lambda x: (x[0].height or 0, rank(RAW_SALT, x[2].hash)))
    raw_normals = [
        Row("raw", 0, "normal", r.hash, b.height, "", r, c.serialize().hex()) for b, c, r in chosen
    ]
    raw_max = sample_max.merge(Maxima.of([r.tx for r in raw_normals]))
    raw_sources: dict[int, list[Source]] = {}
    for b, c, r in chosen:
        raw_sources.setdefault(b.height or 0, []).append(Source(b, c, r))
    historical_raw = []
    for oddity in RAW_ODDITIES:
        found = sorted(picked[oddity.archetype], key=lambda x: rank(RAW_SALT, x[2].hash))
        if oddity.limit is not None:
            excluded[f"more {oddity.archetype} than the {oddity.limit} kept"] += len(found[oddity.limit :])
            found = found[: oddity.limit]
        for b, c, r in found:
            historical_raw.append(
                Row(
                    "raw",
                    1,
                    oddity.archetype,
                    r.hash,
                    b.height,
                    f"unmodified real transaction: {oddity.why}",
                    r,
                    c.serialize().hex(),
                )
            )
    raw_rows = [
        *raw_normals,
        *make_anomalies("raw", RAW_ARCHETYPES, raw_sources, raw_max, used),
        *historical_raw,
    ]

    rows = [*canonical, *raw_rows]
    for row in rows:  # the promise of the file: tx is what decoding hex gives
        again = decode_transaction(row.hex)
        assert (again.hash, again.size, again.weight) == (row.tx.hash, row.tx.size, row.tx.weight), (
            row.tx.hash
        )
    assert len({r.tx.hash for r in rows}) == len(rows), "duplicate transaction"
    data = write(rows, args.out)
    inputs = [
        *(args.shared / b.file for b in blocks),
        *(args.shared / b.file.replace(".raw", ".utxos.json") for b in blocks),
        *sorted({args.shared / b.file for b in raw_blocks}),
        *sorted({args.shared / rel for _, rel, _ in CANONICAL_HISTORICAL.values()}),
        args.shared / FIRST_TAPROOT[2],
    ]
    summary = Summary(
        rows, data, blocks, raw_blocks, sample_max, raw_max, chosen, excluded, args.shared, inputs
    )
    args.sources_md.parent.mkdir(parents=True, exist_ok=True)
    args.sources_md.write_text(sources_md(summary), encoding="utf-8")
    counts = Counter((r.split, r.archetype) for r in rows)
    print(f"{len(rows)} rows, {len(data):,} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
    for (split, archetype), n in sorted(counts.items()):
        print(f"  {split:9} {archetype:40} {n}")


# --- SOURCES.md ------------------------------------------------------------------------------------------


@dataclass
class Summary:
    rows: list[Row]
    data: bytes
    blocks: list[Block]
    raw_blocks: list[Block]
    sample_max: Maxima
    raw_max: Maxima
    chosen: list[tuple[Block, CTransaction, Transaction]]
    excluded: Counter[str]
    shared: Path
    inputs: list[Path]


UPSTREAM = {
    "blocks/rbtc": "github `n42blockchain/rBTC` @ `09a78ebf0d48dffb0aac14116919d852b7995cd7`, "
    "`tests/data/bitcoin-core-26/` (GPL-3.0-only; zstd-decompressed)",
    "blocks/btcd": "github `btcsuite/btcd` @ `2c67bc29cedf391baf5e2d453855256432bb2006`, `wire/testdata/` and "
    "`blockchain/testdata/277647.dat.bz2` (ISC; bunzip2)",
    "blocks/bitcoinkit": "github `yenom/BitcoinKit` @ `74bd7642dfb3f6af6baf242c7bb084af6ee3ae1b`, "
    "`TestResources/` (MIT)",
    "blocks/js-bitcoin-block": "github `rvagg/js-bitcoin-block` @ `a73608f6e06cfaac791c34ac7a8ca3e5ef2847eb`, "
    "`test/fixtures/` (Apache-2.0)",
    "api/mempool_space": "github `mempool/mempool` @ `3b6ed8bde7826e80283bcd87e11478ce15c93ec7`, backend "
    "test data and frontend fixtures (AGPL-3.0)",
    "transactions": "github `n42blockchain/rBTC` @ `09a78ebf0d48dffb0aac14116919d852b7995cd7`, "
    "`tests/data/bitcoin-core-26/authenticated-historical-transactions.json` (GPL-3.0-only)",
}


def upstream(rel: str) -> str:
    return next(v for k, v in UPSTREAM.items() if rel.startswith(k))


def recipe_doc(fn: Callable[..., Any]) -> str:
    return " ".join((fn.__doc__ or "").split()).replace("``", "`")


def size_table(rows: list[Row]) -> str:
    """Rows grouped by weight, with what each group costs gzipped alone (level 9, as the file)."""
    heavy = [a for a, (_, n) in {**CANONICAL_ARCHETYPES, **RAW_ARCHETYPES}.items() if n == N_ROWS_HEAVY]
    groups: dict[str, list[Row]] = {}
    for r in rows:
        if r.label == 0:
            key = f"{r.split} normals" + ("" if r.keeps_hex else " (no `hex`)")
        elif r.archetype in heavy:
            key = f"heavy anomalies ({N_ROWS_HEAVY} per archetype and split: {', '.join(f'`{a}`' for a in heavy)})"
        elif r.archetype == "dust_fanout":
            key = "`dust_fanout` anomalies (100-1,000 outputs each)"
        elif r.archetype.startswith("historical_"):
            key = "`historical_*` rows (real oddities, the sweeps 40-80 kB each)"
        else:
            key = "other anomalies"
        groups.setdefault(key, []).append(r)
    lines = []
    for key, members in groups.items():
        body = b"".join(row_bytes(r, r.split[0]) + b"\n" for r in members)
        lines.append(f"| {key} | {len(members):,} | {len(gzip.compress(body, 9, mtime=0)):,} |")
    return "\n".join(lines)


def sources_md(s: Summary) -> str:
    rows = s.rows
    counts = Counter((r.split, r.archetype) for r in rows)
    blocks_of: dict[tuple[str, str], set[int]] = {}
    for r in rows:
        blocks_of.setdefault((r.split, r.archetype), set()).add(r.source_block or 0)

    def table(split: str, archetypes: dict[str, tuple[Recipe, int]] | None) -> str:
        names = ["normal", *(archetypes or {})]
        names += sorted(a for (sp, a) in counts if sp == split and a not in names)
        lines = ["| archetype | label | rows | source blocks |", "|---|---|---|---|"]
        for a in names:
            heights = sorted(blocks_of[(split, a)])
            shown = ", ".join(f"{h:,}" for h in heights) if len(heights) <= 6 else f"{len(heights)} blocks"
            lines.append(f"| `{a}` | {0 if a == 'normal' else 1} | {counts[(split, a)]:,} | {shown} |")
        return "\n".join(lines)

    def recipes(archetypes: dict[str, tuple[Recipe, int]]) -> str:
        return "\n".join(f"* **`{a}`** ({n} rows): {recipe_doc(fn)}" for a, (fn, n) in archetypes.items())

    held = Counter(r.source_block for r in rows if r.split == "canonical" and r.label == 0)
    canon_blocks = "\n".join(
        f"| {b.height:,} | `{b.hash}` | `{b.file}` | {len(b.txs):,} | {held[b.height]:,} | "
        f"{b.median_fee_rate:.2f} |"
        for b in s.blocks
    )
    picked = Counter(b.hash for b, _, _ in s.chosen)
    raw_blocks = "\n".join(
        f"| {b.height:,} | `{b.hash[:24]}…` | `{b.file}` | {len(b.txs) - 1:,} | {picked[b.hash]:,} |"
        for b in s.raw_blocks
    )
    historical = "\n".join(
        f"| `{r.split}` | `{r.archetype}` | `{r.source_txid}` | {r.source_block:,} | "
        f"{r.change.removeprefix('unmodified real transaction: ')} |"
        for r in rows
        if r.archetype.startswith("historical_")
    )
    excluded = "; ".join(f"{n} x {why}" for why, n in sorted(s.excluded.items())) or "none"
    inputs = "\n".join(
        f"| `{p.relative_to(s.shared)}` | {p.stat().st_size:,} | `{hashlib.sha256(p.read_bytes()).hexdigest()[:16]}` |"
        for p in s.inputs
    )
    m, rm = s.sample_max, s.raw_max
    return f"""# data/benchmark: the labelled detection benchmark

`src/btc_anomaly/resources/benchmark.jsonl.gz` (package data, so an installed wheel can evaluate a model)
holds real Bitcoin mainnet transactions, unmodified (label 0, and the `historical_*` rows) or modified one
documented way each (label 1). It is built by `scripts/build_benchmark.py --shared <shared data dir>` after
`scripts/build_sample.py`; gzip with mtime 0 and every random choice seeded, so a rerun is byte-identical.
The product and its tests read only the committed file, never the shared data.

- rows: {len(rows)}
- bytes: {len(s.data)}
- sha256: `{hashlib.sha256(s.data).hexdigest()}`

Each line is one JSON object: `id` (`c-NNNN` canonical, `r-NNNN` raw, file order), `split`, `label` (1 =
anomaly), `archetype`, `source_txid` (the real transaction it came from; its own hash when unmodified),
`source_block` (height), `change` (what was modified, with the numbers; empty for normals), `tx` (the
canonical `Transaction`, exactly `Transaction.to_json_bytes()`) and `hex` (the raw transaction, with
witness). `hex` is there where it is needed: every anomaly (label 1) and every row of the `raw` split. It is
empty (`""`) for the canonical normals: those are unmodified block transactions, `source_txid` names them,
their bytes are in the shared block file, and what is evaluated is their canonical `tx` (the block
decoder's output, as in `data/sample`; the script checks their serialization against `tx`'s hash, size and
weight before leaving it out). For every row with a `hex`, decoding it gives `tx`'s hash, size and weight
(checked by the script and by `tests/unit/test_benchmark_data.py`).

## Splits

* **`canonical`**: prevouts known, so `fee`, `input_value` and the inputs' addresses and script types are
  exact (`source = "block"`, `block_height` and `first_seen` of the source block, as in `data/sample`).
  Normals: every transaction `scripts/build_sample.py:held_out` keeps out of `data/sample` (a quarter of
  each block's non-coinbase transactions, ranked by sha256(`"holdout:" + txid`)), so a model trained on
  the sample has never seen them.
* **`raw`**: what `/predict/raw` sees without prevout lookups: `fee` and `input_value` null, input
  script types `unknown`, `source = "rawtx"`, `block_height` null (`source_block` still says where the
  transaction is from), `first_seen` the block time. Normals: the {len(s.chosen):,} non-coinbase
  transactions of the other shared blocks with the lowest sha256(`"{RAW_SALT}" + txid`), after taking out
  the oddities below and the transactions like them (left out: {excluded}).

### canonical

{table("canonical", CANONICAL_ARCHETYPES)}

### raw

{table("raw", RAW_ARCHETYPES)}

## How anomalies are made

Sources are normals of the same split, each used by one anomaly only. Per archetype, a generator seeded
with `"{SEED}:<split>:<archetype>"` shuffles each block's normals and takes them round-robin across blocks;
the first sources the recipe accepts (it skips those whose values cannot absorb the change) are used. The
modified transaction is built with python-bitcoinlib from the source's real inputs (outpoints,
scriptSig, witness, nSequence), version and locktime, serialized with witness, and decoded again by
`btc_anomaly.ingestion.decode.decode_transaction` with a prevout map holding the (possibly modified)
prevout values, so size, vsize, weight, hash, fee, input value, script types and addresses are all the
decoder's, never set by hand. Every modified transaction keeps fee >= 0, every value within 0-21M BTC and
weight <= 4,000,000; no signature would verify (nothing here signs), which the decoder does not check.

"Largest output" means the largest non-OP_RETURN output (the change, in most payments); an output it pays
from keeps >= 546 sat. The "maximum" of a `past_range_*` recipe is that quantity's maximum over
`data/sample` (canonical), or over the sample and the raw normals (raw); each such row exceeds it
(at least 1.5x, checked). Added inputs (`consolidation`, `past_range_input_count`) are real inputs of
other transactions of the same block: real outpoint, nSequence and prevout (value, script, hence address
and script type). Their unlocking data (scriptSig, witness) is replaced by that of an earlier added input
of exactly the same shape (scriptSig length and witness item lengths): size, weight and vsize are
byte-identical to the real inputs', and the repeats keep the file smaller.

### canonical recipes

{recipes(CANONICAL_ARCHETYPES)}

### raw recipes

{recipes(RAW_ARCHETYPES)}

### maxima used

| quantity | sample (canonical) | sample + raw normals (raw) |
|---|---|---|
| fee rate (sat/vB) | {m.fee_rate:,.2f} | n/a |
| fee (sat) | {m.fee:,} | n/a |
| output value (sat) | {m.output_value:,} | n/a |
| input count | {m.input_count:,} | {rm.input_count:,} |
| output count | {m.output_count:,} | {rm.output_count:,} |
| vsize (vB) | {m.vsize:,} | {rm.vsize:,} |
| dust outputs (< 546 sat, OP_RETURN excluded) | {m.dust_outputs:,} | {rm.dust_outputs:,} |
| size (bytes) | {m.size:,} | {rm.size:,} |

## Real oddities (`historical_*`, unmodified, label 1)

Canonical ones come from recorded API responses that carry every prevout (mempool.space transactions are
re-serialized from their fields and checked against their txid, size, weight and fee) and from rBTC's
authenticated transactions (prevouts from the raw parent transactions); none of them is in `data/sample`.
Raw ones are transactions of the raw blocks that match a rule (`RAW_ODDITIES`); all that match are kept
out of the raw normals.

| split | archetype | txid | block | why |
|---|---|---|---|---|
{historical}

## Blocks

Canonical (blocks with a prevout view; normals = held-out transactions; median fee rate of all the
block's non-coinbase transactions, used by `fee_overpayment`):

| height | block hash | shared file | txs | normals | median fee rate (sat/vB) |
|---|---|---|---|---|---|
{canon_blocks}

Raw (every other shared block; coinbases never used):

| height | block hash | shared file | non-coinbase txs | normals |
|---|---|---|---|---|
{raw_blocks}

## Inputs (read-only, from the shared data directory) and their upstream

{chr(10).join(f"* `{k}/`: {v}" for k, v in UPSTREAM.items())}

| shared file | bytes | sha256[:16] |
|---|---|---|
{inputs}

Also read: `data/sample/transactions.jsonl.gz` (maxima, and the check that no benchmark transaction is in
it) and `scripts/build_sample.py` (`held_out`).

## Size

The file is {len(s.data) / 1e6:.1f} MB ({sum(len(line) for line in gzip.decompress(s.data).splitlines()) / 1e6:.0f} MB uncompressed). Rows by weight (each group gzipped on its own):

| rows | count | gzip bytes |
|---|---|---|
{size_table(rows)}

The heavy rows carry hundreds to thousands of real inputs or outputs each (`consolidation`: 200-3,000
inputs; `past_range_input_count`: >= {math.ceil(1.5 * m.input_count):,} inputs; `past_range_output_count`: \
>= {math.ceil(1.5 * m.output_count):,} outputs), and the `dust_fanout` rows 100-1,000 outputs each: every real
outpoint or output script is 20-36 bytes that do not compress, in `hex` and again (as an address) in `tx`,
~50-80 bytes per input or output in the file. To limit it: the heavy archetypes have {N_ROWS_HEAVY} rows
instead of {N_ROWS} (`N_ROWS_HEAVY`), their count factors stay at 1.5-1.6x (`FACTORS`), added inputs reuse
unlocking data of the same shape, large OP_RETURN payloads are repetitive ASCII, and the canonical normals
carry no `hex`. No field repeats another in a way gzip does not already absorb (`source_txid` = `tx.hash`
of an unmodified row costs one back-reference).
"""


if __name__ == "__main__":
    main()
