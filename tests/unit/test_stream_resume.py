"""Where the deduplicating transactions query starts on a lake the MERGE design left a checkpoint in."""

from __future__ import annotations

import json
from pathlib import Path

from btc_anomaly.processing.stream import resume_offsets


def _batch(checkpoint: Path, n: int, offsets: dict[str, dict[str, int]], committed: bool) -> None:
    # Spark's layout: offsets/<n> = "v1", the batch metadata, one line per source; commits/<n> after it ran.
    (checkpoint / "offsets").mkdir(parents=True, exist_ok=True)
    (checkpoint / "commits").mkdir(parents=True, exist_ok=True)
    meta = {"batchWatermarkMs": 0, "batchTimestampMs": 1_700_000_000_000, "conf": {}}
    (checkpoint / "offsets" / str(n)).write_text(f"v1\n{json.dumps(meta)}\n{json.dumps(offsets)}")
    if committed:
        (checkpoint / "commits" / str(n)).write_text('v1\n{"nextBatchWatermarkMs":0}')


def test_starts_after_the_last_committed_batch(tmp_path: Path) -> None:
    _batch(tmp_path, 0, {"btc.transactions": {"0": 100, "1": 90}}, committed=True)
    _batch(tmp_path, 1, {"btc.transactions": {"0": 250, "1": 240}}, committed=True)
    # Started, never committed: read again by the new query.
    _batch(tmp_path, 2, {"btc.transactions": {"0": 400, "1": 380}}, committed=False)
    assert json.loads(resume_offsets(tmp_path) or "") == {"btc.transactions": {"0": 250, "1": 240}}


def test_nothing_to_resume_without_a_committed_batch(tmp_path: Path) -> None:
    assert resume_offsets(tmp_path / "missing") is None
    _batch(tmp_path, 0, {"btc.transactions": {"0": 10}}, committed=False)
    assert resume_offsets(tmp_path) is None
