"""Coalescing concurrent requests: one scoring call, and every request gets exactly its own answer."""

from __future__ import annotations

import asyncio

from btc_anomaly.api import inference
from btc_anomaly.api.batcher import Coalescer
from btc_anomaly.api.schemas import ITEM_ADAPTER, SummaryTransaction
from helpers.api_server import sample_records, served_sample_model, summary_body

RECORDS = sample_records(300)


def test_concurrent_jobs_share_one_call_and_keep_their_options() -> None:
    served = served_sample_model()
    canonical = [ITEM_ADAPTER.validate_python(r) for r in RECORDS[:40]]
    summary = [SummaryTransaction.model_validate(summary_body(r)) for r in RECORDS[40:60]]
    jobs = [
        inference.Job(canonical[:1], None, "all"),
        inference.Job(canonical[1:11], 0.4, "anomalies"),
        inference.Job([summary[0], canonical[11], summary[1]], None, "none"),
        inference.Job(canonical[12:40], 0.0, "anomalies"),
        inference.Job(summary[2:], None, "all"),
    ]
    coalescer = Coalescer()

    async def run() -> list[list[dict]]:
        return list(await asyncio.gather(*(coalescer.submit(served, job) for job in jobs)))

    together = asyncio.run(run())
    assert coalescer.calls == 1 and coalescer.jobs == len(jobs)
    alone = [inference.predict(served, j.items, threshold=j.threshold, explain=j.explain) for j in jobs]
    assert together == alone


def test_models_are_never_mixed_in_one_call() -> None:
    v1, v2 = served_sample_model(version="1"), served_sample_model(version="2")
    item = [ITEM_ADAPTER.validate_python(RECORDS[0])]
    coalescer = Coalescer()

    async def run() -> list[list[dict]]:
        return list(
            await asyncio.gather(
                coalescer.submit(v1, inference.Job(item)),
                coalescer.submit(v2, inference.Job(item)),
                coalescer.submit(v1, inference.Job(item)),
            )
        )

    out = asyncio.run(run())
    assert [o[0]["model"]["version"] for o in out] == ["1", "2", "1"]
    assert coalescer.calls == 2


def test_large_bursts_are_split() -> None:
    served = served_sample_model()
    items = [ITEM_ADAPTER.validate_python(r) for r in RECORDS[:30]]
    coalescer = Coalescer(max_rows=64)

    async def run() -> list[list[dict]]:
        return list(await asyncio.gather(*(coalescer.submit(served, inference.Job(items)) for _ in range(5))))

    out = asyncio.run(run())
    assert coalescer.calls == 3  # 30 + 30 rows per call at most 64
    assert all(o == out[0] for o in out)


def test_bursts_are_split_by_inputs_and_outputs_too() -> None:
    """Five concurrent jobs of the sample's biggest transaction (650 inputs + outputs each), with room for
    2.5 of them per call: two per call, whatever the row count allows."""
    served = served_sample_model()
    biggest = max(sample_records(), key=lambda r: r["input_count"] + r["output_count"])
    item = [ITEM_ADAPTER.validate_python(biggest)]
    ios = inference.count_ios(item)
    coalescer = Coalescer(max_ios=ios * 2 + ios // 2)

    async def run() -> list[list[dict]]:
        return list(await asyncio.gather(*(coalescer.submit(served, inference.Job(item)) for _ in range(5))))

    out = asyncio.run(run())
    assert coalescer.calls == 3 and coalescer.jobs == 5
    assert all(o == out[0] for o in out)
