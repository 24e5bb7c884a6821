"""Build ``data/sample/transactions.jsonl.gz``: real mainnet transactions in the canonical schema.

    .venv/bin/python scripts/build_sample.py --shared /work/shared/data

Sources (read-only, never at product run time): the rBTC blocks that ship a prevout (UTXO) view, decoded
with exact fees, plus the recorded blockchain.info /rawtx, /multiaddr and /rawblock responses. The
output is deterministic (fixed input order, gzip mtime 0), so a rerun is byte-identical and a changed
sha256 in SOURCES.md means the data or the decoder changed.

A quarter of each block's non-coinbase transactions is held out (:func:`held_out`): they are the normal
rows of the detection benchmark (``scripts/build_benchmark.py``), so no model trained on the sample has
seen them. Coinbases, the model canaries and the transactions tests name by hash always stay.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from btc_anomaly.config import PROJECT_ROOT
from btc_anomaly.ingestion.blockchain_com import from_blockchain_tx
from btc_anomaly.ingestion.decode import decode_block, load_prevouts
from btc_anomaly.model.reference import CANARIES
from btc_anomaly.schema import InvalidTransaction, Transaction

RBTC_COMMIT = "09a78ebf0d48dffb0aac14116919d852b7995cd7"
ROTKI_COMMIT = "eb86a80c45cca5ded290ab53b8d517f5455e2b56"
MOCK_COMMIT = "730e03899cfe58115db19c7a9bc9cbe2870cfd41"

HOLDOUT_SALT = "holdout:"
# Never held out: the promotion gate's canaries, and block transactions the unit tests and the rules'
# documentation pick by hash (held out, those tests would lose them).
_NAMED_BY_TESTS = (
    "dbf58d5997f746c1b28d0466d0981d27d8dd1b3b75cc1fd64fa8803d3f94afe1",  # spends from an OFAC address
    "812089d53a80d9309a69f798d58dffa9ca7de465d24597d9a7b6fe11e56d4f3d",  # large consolidation
    "4e99434f63a13b659cd94f4eb3b3811f1d88eb2ef9080840549ec50a0641a422",  # 176 inputs into 11 outputs
    "cb17089d2451bd4f5121b782104dfeadf4f108d86b2eeac2930a51ad565158ba",  # fee > half its input
    "3a5adcc3b7e1a74416f1fdeef7a8b9358a1431328badd1389e498e28418e56f0",  # 600-999 sat/vB
    "c252a5368e7c78edaa082d9d23a97f0a79fce1158cc7838a7173e40c47013b62",  # P2PKH only
    "d81564dde50dbbc6fcd0194e8feac10311e4ccb2d4543666723b9e56c291f171",  # OP_RETURN payload
    "9e8530a3589b19e185dec8870b3fd8ad3110a63e4f00205ee80e9e400f943fe5",  # peel-chain step
    "1823999231ae138034c5ac1141defcaaa97a4e024ef3c8f52bfd4e7320618af9",  # near-miss peel
    "399ad0b7cba6d9bebd36ca2444d931478fcfc6cf9bb575fd0386702e135f268a",  # fee 20-50 % of the input
)
KEEP_IN_SAMPLE: frozenset[str] = frozenset(CANARIES) | frozenset(_NAMED_BY_TESTS)


def held_out(transactions: list[Transaction]) -> list[str]:
    """The hashes of one block's transactions that leave the sample for the benchmark, in rank order.

    Every non-coinbase transaction not in ``KEEP_IN_SAMPLE`` is ranked by sha256(``"holdout:" + hash``);
    the lowest quarter (rounded down) is held out. Deterministic and independent of block order.
    """
    candidates = [t.hash for t in transactions if not t.is_coinbase and t.hash not in KEEP_IN_SAMPLE]
    ranked = sorted(candidates, key=lambda h: hashlib.sha256((HOLDOUT_SALT + h).encode()).digest())
    return ranked[: len(candidates) // 4]


def subsidy(height: int) -> int:
    return (50 * 100_000_000) >> (height // 210_000)


@dataclass
class Sample:
    transactions: list[Transaction] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    # height, hash, txs in the block, held out, fees of all txs, fees of the held-out txs
    blocks: list[tuple[int, str, int, int, int, int]] = field(default_factory=list)
    api_counts: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # kept, duplicate, rejected
    rejected: list[tuple[str, str]] = field(default_factory=list)  # file, reason

    def add(self, tx: Transaction) -> bool:
        if tx.hash in self.seen:
            return False
        self.seen.add(tx.hash)
        self.transactions.append(tx)
        return True


def add_utxo_blocks(sample: Sample, shared: Path) -> None:
    for utxos in sorted((shared / "blocks" / "rbtc").glob("*.utxos.json")):
        raw = utxos.with_name(utxos.name.replace(".utxos.json", ".raw"))
        block = decode_block(raw.read_bytes(), prevouts=load_prevouts(utxos))
        assert block.height is not None, f"{raw.name}: no BIP34 height"
        assert all(t.fee is not None for t in block.transactions), f"{raw.name}: unresolved prevouts"
        fees = sum(t.fee or 0 for t in block.transactions[1:])
        coinbase = block.transactions[0]
        assert coinbase.is_coinbase
        assert coinbase.output_value == subsidy(block.height) + fees, (
            f"{raw.name}: coinbase {coinbase.output_value} != subsidy {subsidy(block.height)} + fees {fees}"
        )
        holdout = set(held_out(block.transactions))
        for tx in block.transactions:
            if tx.hash not in holdout:
                sample.add(tx)
        held_fees = sum(t.fee or 0 for t in block.transactions if t.hash in holdout)
        sample.blocks.append(
            (block.height, block.hash, len(block.transactions), len(holdout), fees, held_fees)
        )


def add_api(sample: Sample, shared: Path) -> None:
    api = shared / "api" / "blockchain_info"
    groups = {
        "rawtx": [(p, [orjson.loads(p.read_bytes())]) for p in sorted((api / "rawtx").glob("*.json"))],
        "multiaddr": [
            (p, orjson.loads(p.read_bytes())["txs"]) for p in sorted((api / "multiaddr").glob("*.json"))
        ],
        "rawblock": [
            (p, orjson.loads(p.read_bytes())["tx"]) for p in sorted((api / "rawblock").glob("*.json"))
        ],
    }
    for name, files in groups.items():
        kept = duplicate = rejected = 0
        for path, txs in files:
            for raw in txs:
                try:
                    tx = from_blockchain_tx(raw, source="rest")
                except InvalidTransaction as exc:
                    rejected += 1
                    sample.rejected.append((str(path.relative_to(shared)), exc.reason))
                    continue
                if sample.add(tx):
                    kept += 1
                else:
                    duplicate += 1
        sample.api_counts[name] = (kept, duplicate, rejected)


def write_jsonl_gz(transactions: list[Transaction], path: Path) -> bytes:
    buf = io.BytesIO()
    # filename="" and mtime=0 keep the gzip header free of anything that changes between runs.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        for tx in transactions:
            gz.write(tx.to_json_bytes() + b"\n")
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def sources_md(sample: Sample, data: bytes) -> str:
    txs = sample.transactions
    with_fee = sum(1 for t in txs if t.fee is not None)
    block_rows = "\n".join(
        f"| {h:,} | `{bh}` | {n:,} | {n - held:,} | {held:,} | {fees:,} | {held_fees:,} |"
        for h, bh, n, held, fees, held_fees in sorted(sample.blocks)
    )
    held_total = sum(b[3] for b in sample.blocks)
    api_rows = "\n".join(f"| {name} | {k} | {d} | {r} |" for name, (k, d, r) in sample.api_counts.items())
    reasons: dict[str, int] = {}
    for _, reason in sample.rejected:
        key = re.sub(r"\d+", "N", reason.split("…: ", 1)[-1])
        reasons[key] = reasons.get(key, 0) + 1
    reason_lines = "\n".join(f"  - {n} x {r}" for r, n in sorted(reasons.items())) or "  - none"
    first, last = min(t.first_seen for t in txs), max(t.first_seen for t in txs)
    return f"""# data/sample: where the sample transactions come from

`transactions.jsonl.gz` holds real Bitcoin mainnet transactions, one canonical `Transaction` JSON per line
(`Transaction.to_json_bytes()`, schema version {txs[0].schema_version}), gzip with mtime 0. It is built by
`scripts/build_sample.py --shared <shared data dir>`; a rerun is byte-identical. Nothing here is synthetic.

- transactions: {len(txs)}
- with fee: {with_fee}
- first_seen range: {first.isoformat()} … {last.isoformat()}
- bytes: {len(data)}
- sha256: `{hashlib.sha256(data).hexdigest()}`

Order: by `first_seen`, ties kept in block order. Duplicate hashes are dropped; the first source
listed below wins.

## 1. Blocks with their prevout (UTXO) view: `source = "block"`, exact fees

* **Upstream:** github `n42blockchain/rBTC`, commit `{RBTC_COMMIT}`,
  directory `tests/data/bitcoin-core-26/` (repository license GPL-3.0-only; its README says the blocks
  were retrieved from public Esplora APIs, Blockstream and mempool.space). Upstream files are
  `mainnet-<hash>.raw.zst` and `mainnet-<hash>.utxos.json.zst`; the shared copy was decompressed with
  `zstd -d`.
* **Transformation:** each block decoded with
  `btc_anomaly.ingestion.decode.decode_block(raw, prevouts=load_prevouts(utxos))`; `first_seen` is the
  block time and `block_height` the BIP34 coinbase height.
* **Checks (asserted by the script):** every prevout resolved, every fee non-null, and for each block
  the coinbase output equals the subsidy plus the sum of fees (of all its transactions, held out or not).
* **Held out ({held_total:,} transactions):** a quarter of each block's non-coinbase transactions is *not*
  in this sample. `scripts/build_sample.py:held_out` ranks them by sha256(`"holdout:" + txid`) and takes the
  lowest quarter (rounded down); coinbases, the five model canaries (`btc_anomaly.model.reference.CANARIES`)
  and {len(_NAMED_BY_TESTS)} block transactions the unit tests pick by hash are never held out. The held-out transactions
  are the normal rows of the detection benchmark (`data/benchmark/SOURCES.md`), so a model trained on
  this sample never sees them.

| height | block hash | txs in block | in sample | held out | fees of all txs (sat) | fees held out (sat) |
|---|---|---|---|---|---|---|
{block_rows}

## 2. Recorded blockchain.info responses: `source = "rest"`

* **`rawtx/`, `multiaddr/`:** github `rotki/test-caching`, branch `develop`, commit
  `{ROTKI_COMMIT}`: VCR.py cassettes recorded by rotki's test suite against the live
  API (no LICENSE file in that repository; rotki itself is AGPL-3.0). The shared copy holds each
  interaction's `response.body.string` verbatim as compact JSON.
* **`rawblock/rawblock_603966_partial.json`:** github `wasswarichard/Express-Graphql-React-Mswjs-Blocks`,
  commit `{MOCK_COMMIT}`, `backend/src/mocks/blockDetails.ts` (no license file
  visible), converted from a TypeScript literal to JSON without value changes. Only the first 10 of the
  block's 3,503 txs were kept by that mock's author, and the response says `main_chain: false`.
* **Transformation:** `btc_anomaly.ingestion.blockchain_com.from_blockchain_tx(tx, source="rest")`;
  `first_seen` is the response's `time`. Script types and addresses come from the hex scripts; every fee
  computed from `prev_out` values equals the recorded `fee`.
* `/multiaddr` lists only the outputs that touch the queried wallet; such txs (`vout_sz` larger than
  `out`) are rejected as incomplete instead of being stored with a wrong output value.

| endpoint | kept | duplicate hash | rejected |
|---|---|---|---|
{api_rows}

Rejected:
{reason_lines}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shared", type=Path, required=True, help="the shared real-data directory (read-only)"
    )
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "data" / "sample")
    args = parser.parse_args()

    sample = Sample()
    add_utxo_blocks(sample, args.shared)
    add_api(sample, args.shared)
    order = {id(t): i for i, t in enumerate(sample.transactions)}
    sample.transactions.sort(key=lambda t: (t.first_seen, order[id(t)]))

    data = write_jsonl_gz(sample.transactions, args.out / "transactions.jsonl.gz")
    (args.out / "SOURCES.md").write_text(sources_md(sample, data), encoding="utf-8")
    with_fee = sum(1 for t in sample.transactions if t.fee is not None)
    print(
        f"{len(sample.transactions)} transactions ({with_fee} with fee), {len(data):,} bytes, "
        f"sha256 {hashlib.sha256(data).hexdigest()}"
    )


if __name__ == "__main__":
    main()
