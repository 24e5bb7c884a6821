"""Fixed real transactions the promotion gate scores every challenger on.

* ``model_reference_transactions.jsonl.gz``: ``REFERENCE_SIZE`` transactions drawn at random (seed 0)
  from ``data/sample/transactions.jsonl.gz``, canaries excluded. Used for score stability (how many get
  flagged) and for rank agreement with the champion.
* ``model_canary_transactions.jsonl.gz``: real transactions from the same sample that are extreme on
  their own terms (listed in ``CANARIES`` with the reason), which any sane model should flag.

The highest fee-rate transaction of the sample (450c309b…, 3,891 sat/vB) is deliberately *not* a canary:
the sample spans 2011-2025 fee markets, so on the log scale it sits only ~1.5 units above the 99.9th
percentile and an isolation forest over 28 features flags it in none of 18 retrains we tried; a canary
that fails at random would make the gate flaky. The five below were flagged in 10/10 retrains on random
halves of the sample (the fan-out in 7/10, which the 0.8 default share tolerates).

Both files are package data (``btc_anomaly/resources``) so the gate works from an installed wheel.
Rebuild with ``python -m btc_anomaly.model.reference`` (deterministic).
"""

from __future__ import annotations

import gzip
import random
from functools import lru_cache
from importlib import resources
from pathlib import Path

import orjson
import pandas as pd

REFERENCE_FILE = "model_reference_transactions.jsonl.gz"
CANARY_FILE = "model_canary_transactions.jsonl.gz"
REFERENCE_SIZE = 500

CANARIES: dict[str, str] = {
    "b7014aae1ccf2e1226e9e3550045fd03700168fe831a68da214fe07d1e72a645": "pays 97% of its input as fee",
    "1a37b544476a1928356e20a35156a1ff0c105e9218abb301431ebe31630d5286": "fan-out to 1,109 outputs",
    "eeddf45d97155e07a4bab4ca38f61f405c3b1063ff3328c786ac9d786efab1e7": "consolidates 649 inputs (95,762 vB)",
    "51a6eade290ed13345f75cf7be1b69aa1ad6f52b85178f170912aff5f0e233d9": "176-input, 39-output batch at 608 sat/vB",
    "eb4d2def800c4993928a6f8cc3dd350933a1fb71e6706902025f29a061e5547f": "OP_RETURN-only: burns its whole input as fee",
}


def _resources() -> Path:
    return Path(str(resources.files("btc_anomaly") / "resources"))


def _read(name: str) -> pd.DataFrame:
    data = (_resources() / name).read_bytes()
    if name.endswith(".gz"):
        data = gzip.decompress(data)
    return pd.DataFrame([orjson.loads(line) for line in data.splitlines() if line.strip()])


@lru_cache(maxsize=1)
def reference_transactions() -> pd.DataFrame:
    return _read(REFERENCE_FILE)


@lru_cache(maxsize=1)
def canary_transactions() -> pd.DataFrame:
    return _read(CANARY_FILE)


def build(sample: Path, out_dir: Path | None = None) -> tuple[int, int]:
    """Write both files from the sample; every canary must be found in it."""
    out_dir = out_dir or _resources()
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [line for line in gzip.decompress(sample.read_bytes()).splitlines() if line.strip()]
    canaries: list[bytes] = []
    rest: list[bytes] = []
    for line in lines:
        h = orjson.loads(line)["hash"]
        (canaries if h in CANARIES else rest).append(line)
    found = {orjson.loads(c)["hash"] for c in canaries}
    missing = [h for h in CANARIES if h not in found]
    if missing:
        raise ValueError(f"canaries not in the sample: {missing}")
    reference = random.Random(0).sample(rest, REFERENCE_SIZE)
    for name, rows in ((REFERENCE_FILE, reference), (CANARY_FILE, canaries)):
        # mtime=0 keeps the gzip byte-identical across rebuilds.
        with gzip.GzipFile(out_dir / name, "wb", mtime=0) as fh:
            fh.write(b"\n".join(rows) + b"\n")
    return len(reference), len(canaries)


if __name__ == "__main__":
    from btc_anomaly.config import PROJECT_ROOT

    n_ref, n_can = build(PROJECT_ROOT / "data" / "sample" / "transactions.jsonl.gz")
    print(f"wrote {n_ref} reference and {n_can} canary transactions to {_resources()}")
