"""The bundled sample (data/sample/transactions.jsonl.gz) is real, valid and what SOURCES.md says."""

from __future__ import annotations

import gzip
import hashlib
import re
from collections import defaultdict
from functools import lru_cache

from btc_anomaly.config import PROJECT_ROOT
from btc_anomaly.model.reference import CANARIES
from btc_anomaly.schema import Transaction

SAMPLE_DIR = PROJECT_ROOT / "data" / "sample"
SAMPLE = SAMPLE_DIR / "transactions.jsonl.gz"


@lru_cache(maxsize=1)
def _transactions() -> tuple[Transaction, ...]:
    with gzip.open(SAMPLE, "rb") as f:
        return tuple(Transaction.from_json(line) for line in f)


def _sources_value(key: str) -> str:
    match = re.search(rf"^- {key}: `?([^`\n]+)`?$", (SAMPLE_DIR / "SOURCES.md").read_text(), re.MULTILINE)
    assert match, f"SOURCES.md has no '- {key}:' line"
    return match.group(1)


def test_sample_matches_sources_md() -> None:
    data = SAMPLE.read_bytes()
    assert hashlib.sha256(data).hexdigest() == _sources_value("sha256")
    assert len(data) == int(_sources_value("bytes"))
    txs = _transactions()
    assert len(txs) == int(_sources_value("transactions"))
    assert sum(t.fee is not None for t in txs) == int(_sources_value("with fee"))


def test_sample_is_gzip_without_timestamp() -> None:
    header = SAMPLE.read_bytes()[:10]
    assert header[:3] == b"\x1f\x8b\x08" and header[4:8] == b"\x00\x00\x00\x00"  # mtime 0: reproducible


def test_every_line_validates_and_hashes_are_unique() -> None:
    txs = _transactions()
    assert len(txs) > 5_000
    assert len({t.hash for t in txs}) == len(txs)
    assert all(t.schema_version == 1 for t in txs)
    # round trip: what we read is what to_json_bytes writes
    with gzip.open(SAMPLE, "rb") as f:
        first_line = f.readline().rstrip(b"\n")
    assert txs[0].to_json_bytes() == first_line


def test_ordered_by_first_seen() -> None:
    times = [t.first_seen for t in _transactions()]
    assert times == sorted(times)


def _block_table() -> dict[int, tuple[int, int, int, int, int]]:
    """height -> (txs in block, in sample, held out, fees of all txs, fees held out), from SOURCES.md."""
    rows = re.findall(
        r"^\| ([\d,]+) \| `[0-9a-f]{64}` \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \|$",
        (SAMPLE_DIR / "SOURCES.md").read_text(),
        re.MULTILINE,
    )
    table = {}
    for row in rows:
        height, *rest = (int(x.replace(",", "")) for x in row)
        table[height] = tuple(rest)
    return table


def test_block_transactions_have_exact_fees() -> None:
    by_height: dict[int, list[Transaction]] = defaultdict(list)
    for t in _transactions():
        if t.source == "block":
            assert t.fee is not None and t.block_height is not None
            by_height[t.block_height].append(t)
    assert sorted(by_height) == [388_381, 419_328, 481_824, 692_261]
    table = _block_table()
    assert sorted(table) == sorted(by_height)
    for height, txs in by_height.items():
        coinbase = [t for t in txs if t.is_coinbase]
        assert len(coinbase) == 1
        fees = sum(t.fee or 0 for t in txs if not t.is_coinbase)
        n_block, n_sample, n_held, fees_all, fees_held = table[height]
        # The held-out quarter is in the benchmark (data/benchmark), not here: the coinbase still pays
        # the subsidy plus every fee of the block, those in the sample plus those held out.
        assert len(txs) == n_sample == n_block - n_held
        assert fees + fees_held == fees_all
        assert coinbase[0].output_value == ((50 * 100_000_000) >> (height // 210_000)) + fees_all


def test_a_quarter_of_each_block_is_held_out_but_never_a_canary() -> None:
    for n_block, _, n_held, _, _ in _block_table().values():
        assert 0.24 <= n_held / (n_block - 1) <= 0.25  # non-coinbase txs, rounded down
    assert set(CANARIES) <= {t.hash for t in _transactions()}


def test_sample_has_variety() -> None:
    txs = _transactions()
    sources = {t.source for t in txs}
    assert sources == {"block", "rest"}
    script_types = {o.script_type for t in txs for o in t.outputs}
    assert {
        "pubkeyhash",
        "scripthash",
        "witness_v0_keyhash",
        "witness_v0_scripthash",
        "nulldata",
    } <= script_types
    assert any(t.rbf for t in txs) and any(t.is_segwit for t in txs) and any(t.has_op_return for t in txs)
