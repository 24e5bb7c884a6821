"""The stream end to end, for real: kafka-python → local broker → Spark's Kafka source → Delta tables.

The bundled real sample is published with duplicates, malformed records and unconfirmed copies; the
stream drains the topic (trigger availableNow) and the tables are read back JVM-free (delta_reader).
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pytest
from deltalake import DeltaTable

from btc_anomaly.config import Settings
from btc_anomaly.ingestion.replay_source import loop_hash
from btc_anomaly.processing import delta_reader
from btc_anomaly.processing.sinks import BatchResult
from btc_anomaly.processing.stream import StreamRunner
from btc_anomaly.schema import Transaction
from helpers.stream import (
    create_topic,
    expected_stats,
    kafka_frame,
    key_of,
    malformed,
    publish,
    sample_lines,
    wait_for,
    with_changes,
)

pytestmark = pytest.mark.integration

UNCONFIRMED = 40  # new txs first seen unconfirmed, confirmed in the second run
DUPLICATES = 500


def _canonical(row: dict[str, object]) -> Transaction:
    return Transaction.model_validate({k: v for k, v in row.items() if k in Transaction.model_fields})


def _stored(settings: Settings) -> dict[str, Transaction]:
    rows = delta_reader.read_arrow(settings.lake_table("transactions")).to_pylist()
    hashes = [r["hash"] for r in rows]
    assert len(hashes) == len(set(hashes)), "a hash is stored twice"
    return {r["hash"]: _canonical(r) for r in rows}


@pytest.fixture
def settings(kafka_settings: Settings, tmp_path: Path) -> Settings:
    return kafka_settings.model_copy(
        update={
            "lake_root": tmp_path / "lake",
            # Several batches, and a compaction every two: the windows (read from the change feed)
            # and the stored rows must not notice it.
            "stream_max_offsets_per_trigger": 1_500,
            "stream_compact_every": 2,
            "stream_metrics_port": 0,
            # The sample spans 2011-2025; nothing in it may count as late.
            "stream_watermark": "3650 days",
        }
    )


def test_stream_sample_duplicates_quarantine_confirmation_and_windows(
    spark: object, settings: Settings
) -> None:
    lines = sample_lines()
    sample = [Transaction.from_json(line) for line in lines]
    bad = malformed(lines[0])
    # Unconfirmed transactions not in the sample (fresh hashes), confirmed in the second run.
    pending = [
        with_changes(line, hash=loop_hash(tx.hash, 1000), block_height=None)
        for line, tx in zip(lines[:UNCONFIRMED], sample[:UNCONFIRMED], strict=True)
    ]
    create_topic(settings.kafka_bootstrap, settings.topic)
    records = [(key_of(line), line) for line in lines]
    records += [(key_of(line), line) for line in lines[:DUPLICATES]]  # sent twice
    records += [(f"bad:{label}".encode(), value) for label, value, _ in bad]
    records += [(key_of(line), line) for line in pending]
    # An unconfirmed copy of a confirmed sample tx, later in the topic: must not erase its height.
    late_unconfirmed = with_changes(lines[1], block_height=None)
    records.append((key_of(late_unconfirmed), late_unconfirmed))
    publish(settings.kafka_bootstrap, settings.topic, records)

    batches: list[BatchResult] = []
    runner = StreamRunner(settings, spark, on_batch=lambda _id, r: batches.append(r))  # type: ignore[arg-type]
    runner.run_available_now()

    stored = _stored(settings)
    expected = {tx.hash: tx for tx in sample} | {
        h: Transaction.from_json(line) for line in pending for h in [orjson.loads(line)["hash"]]
    }
    assert set(stored) == set(expected)
    mismatched = [h for h, tx in expected.items() if stored[h] != tx]
    assert not mismatched, f"{len(mismatched)} stored rows differ from the source, e.g. {mismatched[:3]}"
    assert stored[sample[1].hash].block_height == sample[1].block_height
    assert sum(b.inserted for b in batches) == len(expected)

    quarantine = delta_reader.read_table(settings.lake_table("quarantine")).sort_values("offset")
    assert len(quarantine) == len(bad)
    sent = {f"bad:{label}".encode(): (value, reason) for label, value, reason in bad}
    for row in quarantine.itertuples():
        value, reason = sent[bytes(row.key)]
        assert (None if row.value is None else bytes(row.value)) == value, "raw bytes not kept"
        assert reason in row.error, f"{row.key!r}: {row.error!r} lacks {reason!r}"
        assert row.topic == settings.topic and row.partition >= 0 and row.offset >= 0
        assert not pd.isna(row.kafka_timestamp)
    assert {bytes(k) for k in quarantine["key"]} == set(sent)
    assert sum(b.quarantined for b in batches) == len(bad)

    _assert_window_stats(settings, list(expected.values()))
    compactions = [
        h
        for h in DeltaTable(str(settings.lake_table("transactions"))).history()
        if h["operation"] == "OPTIMIZE"
    ]
    assert len(compactions) == len(batches) // 2 and len(batches) >= 4

    # Second run, from the checkpoint: confirmations arrive, plus more copies of stored txs.
    heights = {orjson.loads(line)["hash"]: 900_000 + i for i, line in enumerate(pending)}
    confirmed = [with_changes(line, block_height=heights[orjson.loads(line)["hash"]]) for line in pending]
    again = [(key_of(line), line) for line in confirmed]
    again += [(key_of(line), line) for line in lines[DUPLICATES : DUPLICATES + 100]]
    again += [(key_of(line), line) for line in pending[:5]]  # an unconfirmed copy after the confirmation
    publish(settings.kafka_bootstrap, settings.topic, again)
    batches.clear()
    runner.run_available_now()

    after = _stored(settings)
    assert set(after) == set(expected)
    for h, height in heights.items():
        assert after[h].block_height == height, f"{h}: block_height {after[h].block_height} != {height}"
        assert after[h].model_copy(update={"block_height": None}) == expected[h]
    assert sum(b.inserted for b in batches) == 0
    assert sum(b.updated for b in batches) == UNCONFIRMED
    # Updates are not new transactions: the windows are unchanged.
    _assert_window_stats(settings, list(expected.values()))


def _assert_window_stats(settings: Settings, txs: list[Transaction]) -> None:
    for seconds, table in ((60, "tx_stats_1m"), (300, "tx_stats_5m")):
        want = expected_stats(txs, seconds).set_index("window_start").sort_index()
        got = delta_reader.read_table(settings.lake_table(table)).set_index("window_start").sort_index()
        assert list(got.index) == list(want.index), f"{table}: windows differ"
        for col in ("tx_count", "total_value", "fan_in_count", "fan_out_count"):
            assert got[col].astype("int64").tolist() == want[col].astype("int64").tolist(), f"{table}.{col}"
        for col in (
            "median_value",
            "fee_p50",
            "fee_p90",
            "fee_p99",
            "fee_rate_p50",
            "fee_rate_p90",
            "fee_rate_p99",
        ):
            for g, w in zip(got[col].tolist(), want[col].tolist(), strict=True):
                assert (pd.isna(g) and pd.isna(w)) or math.isclose(g, w, rel_tol=1e-9), (
                    f"{table}.{col}: {g} != {w}"
                )
        ends = (got["window_end"] - got.index.to_series()).dt.total_seconds()
        assert set(ends) == {seconds}


def test_an_unconfirmed_copy_and_its_confirmation_in_one_batch(spark: object, settings: Settings) -> None:
    """Both copies of a transaction in the same micro-batch, in either order: one row is stored,
    confirmed (the in-batch dedup keeps the earliest copy and the largest block height)."""
    lines = sample_lines()[:60]
    fresh = [with_changes(line, hash=loop_hash(orjson.loads(line)["hash"], 3000)) for line in lines]
    want = {tx.hash: tx for tx in map(Transaction.from_json, fresh)}
    assert all(tx.block_height is not None for tx in want.values())
    records = []
    for i, line in enumerate(fresh):
        copies = [with_changes(line, block_height=None), line]
        records += [(key_of(c), c) for c in (copies if i % 2 == 0 else copies[::-1])]
    create_topic(settings.kafka_bootstrap, settings.topic)
    publish(settings.kafka_bootstrap, settings.topic, records)

    batches: list[BatchResult] = []
    StreamRunner(settings, spark, on_batch=lambda _id, r: batches.append(r)).run_available_now(stats=False)  # type: ignore[arg-type]

    assert [b.inserted for b in batches] == [len(want)]
    assert _stored(settings) == want


def test_a_replayed_batch_writes_nothing_twice(spark: Any, tmp_path: Path) -> None:
    """Spark runs the batch a crash cut off again, with the same batch id, in a new query run: the
    run's index, loaded from the table, routes every stored row to the MERGE, which inserts nothing,
    and the quarantine append finds itself committed."""
    from btc_anomaly.processing.parse import parse
    from btc_anomaly.processing.sinks import Lake, ensure_tables, write_batch
    from btc_anomaly.processing.stored_hashes import StoredHashes

    lake = Lake(tmp_path / "lake", tmp_path / "checkpoints")
    ensure_tables(spark, lake)
    lines = sample_lines()[:50]
    parsed = parse(kafka_frame(spark, [*lines, b"{not json"]))
    first = write_batch(parsed, lake, 7, "query-a", StoredHashes(), 30)
    replay = write_batch(parsed, lake, 7, "query-a", StoredHashes(), 30)

    assert (first.inserted, replay.inserted) == (len(lines), 0)
    stored = delta_reader.read_arrow(lake.table("transactions"), columns=["hash"])["hash"].to_pylist()
    assert sorted(stored) == sorted(Transaction.from_json(line).hash for line in lines)
    assert len(delta_reader.read_table(lake.table("quarantine"))) == 1


def test_one_batch_of_new_hashes_and_stored_ones(spark: Any, tmp_path: Path) -> None:
    """In one query run: stored hashes of a batch (here confirmations of stored unconfirmed txs) take
    the MERGE, which confirms them; its new hashes are appended; each hash stays one row."""
    from btc_anomaly.processing.parse import parse
    from btc_anomaly.processing.sinks import Lake, ensure_tables, write_batch
    from btc_anomaly.processing.stored_hashes import StoredHashes

    lake = Lake(tmp_path / "lake", tmp_path / "checkpoints")
    ensure_tables(spark, lake)
    lines = [line for line in sample_lines() if orjson.loads(line)["block_height"] is not None][:50]
    assert len(lines) == 50
    stored = StoredHashes()
    first = write_batch(
        parse(kafka_frame(spark, [with_changes(line, block_height=None) for line in lines[:30]])),
        lake,
        0,
        "query-a",
        stored,
        30,
    )
    second = write_batch(parse(kafka_frame(spark, lines)), lake, 1, "query-a", stored, 30)

    assert (first.inserted, second.inserted, second.updated) == (30, 20, 30)
    assert {"append", "insert_merge", "update_merge"} <= set(second.seconds)
    rows = delta_reader.read_arrow(lake.table("transactions"), columns=["hash", "block_height"]).to_pylist()
    want = {tx.hash: tx.block_height for tx in map(Transaction.from_json, lines)}
    assert len(rows) == len(want)
    assert {r["hash"]: r["block_height"] for r in rows} == want


def _late_rows_dropped() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("btc_stream_late_rows_dropped_total", {"query": "tx_stats"}) or 0.0


def test_rows_behind_the_watermark_are_stored_but_not_counted_in_windows(
    spark: Any, settings: Settings
) -> None:
    """A real watermark (10 minutes): after the stream has seen event times up to T0 + 30 min, rows of
    windows that ended before T0 + 20 min are late — kept in ``transactions``, left out of the window
    aggregates and counted in ``btc_stream_late_rows_dropped_total``; a row 5 minutes behind is on time."""
    from btc_anomaly.processing.metrics_listener import install_listener

    s = settings.model_copy(update={"stream_watermark": "10 minutes"})
    t0 = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.UTC)
    lines = sample_lines()

    def at(i: int, first_seen: dt.datetime) -> bytes:
        tx = orjson.loads(lines[i])
        return with_changes(lines[i], hash=loop_hash(tx["hash"], 7000), first_seen=first_seen.isoformat())

    on_time = [at(i, t0 + dt.timedelta(seconds=30 * i)) for i in range(60)]  # T0 .. T0 + 29.5 min
    # Each late row alone in its 1 and 5 minute windows, all ended long before the watermark: Spark
    # drops late rows after the partial aggregation, so each one is 2 dropped rows (one per granularity).
    late = [at(60 + k, t0 - dt.timedelta(hours=1, minutes=5 * k)) for k in range(7)]
    behind = [at(70 + k, t0 + dt.timedelta(minutes=25, seconds=10 * k)) for k in range(3)]  # window ends > wm
    create_topic(s.kafka_bootstrap, s.topic)
    listener = install_listener(spark, 0)
    try:
        publish(s.kafka_bootstrap, s.topic, [(key_of(line), line) for line in on_time])
        runner = StreamRunner(s, spark)
        runner.run_available_now()
        dropped_before = _late_rows_dropped()
        publish(s.kafka_bootstrap, s.topic, [(key_of(line), line) for line in late + behind])
        runner.run_available_now()
        # The listener hears of the batch on Spark's listener bus, after the query returned.
        wait_for(lambda: _late_rows_dropped() - dropped_before >= 2 * len(late), 60, what="late rows metric")
        assert _late_rows_dropped() - dropped_before == 2 * len(late)
    finally:
        spark.streams.removeListener(listener)

    everything = [Transaction.from_json(line) for line in on_time + late + behind]
    assert set(_stored(s)) == {tx.hash for tx in everything}, "late rows must still be stored"
    counted = [Transaction.from_json(line) for line in on_time + behind]
    _assert_window_stats(s, counted)
