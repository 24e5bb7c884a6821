"""Stream throughput and latency: Kafka → Spark Structured Streaming → Delta, against a plain Delta append.

A single-node broker is started on free ports in a temporary folder and the stream runs in this process
(local[2], the same SparkSession for every case). Rows:

* ``backfill: index + append`` — ``messages`` records (the bundled sample looped with fresh hashes, as
  the producer's replay makes them) pre-published to a 3-partition topic, then drained by the
  transactions query exactly as ``btc-anomaly stream`` runs it (parse + validate, in-batch dedup, the
  lookup in the query's index of stored hashes, append of the new ones, MERGE of the others,
  quarantine), trigger availableNow, ``max_offsets`` per batch.
* ``backfill: every row through the MERGE`` — the same with the design of sessions 1-6 (an index that
  rules nothing out: update check + insert-only MERGE for every batch), for the same-run ratio.
* ``backfill: the same records again`` — ours over the same topic into the same table with a new
  checkpoint: every hash is stored, every row takes the MERGE (a replayed or re-sent topic).
* ``backfill: plain append`` — the same records, same parse and validation, written with Spark's own
  Delta streaming sink (no dedup, no MERGE) into a table of the same layout: the baseline.
* ``backfill: state-store dedup`` — the same with the state-store design of the latency case below.
* ``backfill: window aggregates`` — the tx_stats query draining the change feed of ours' table.
* ``latency: 1 s trigger`` — both queries running (as in production), a publisher sending unconfirmed
  transactions (as the WebSocket feed does) at ``rate`` tx/s for ``seconds`` (after at least 30 s of
  warm-up traffic that is not measured, until the stats query has written once), and a delta-rs
  reader polling the table every 50 ms: latency = first time a hash is readable in Delta minus its
  send time. Then the same with every row through the MERGE (sessions 1-6); with the baseline:
  Spark's Delta sink appending (1 s trigger) instead of the transactions query, the tx_stats query
  beside it; and with the state-store design measured in sessions 5-6: dedup by hash in Spark's
  state store (``dropDuplicatesWithinWatermark`` on the Kafka timestamp) in front of the same sink.

Every backfill case runs once untimed on a topic of the same size first, so none pays the JVM's
warm-up: with 20,000 warm-up records the first timed case still ran ~25 % slower than a second run.

    python -m bench.bench_stream [--messages N] [--max-offsets N] [--rate R] [--seconds S] [--only PART]
        [--bootstrap HOST:PORT] [--no-warmup]
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from btc_anomaly.config import PROJECT_ROOT, Settings
from btc_anomaly.ingestion.replay_source import ReplaySource, loop_hash, read_lines
from btc_anomaly.runtime.kafka_broker import KafkaBroker, free_port
from btc_anomaly.schema import Transaction

PARTITIONS = 3
WARMUP_S = 30.0  # latency case: seconds of unmeasured traffic at the measured rate first
SAMPLE = PROJECT_ROOT / "data" / "sample" / "transactions.jsonl.gz"
log = logging.getLogger("bench.stream")


def _producer(bootstrap: str) -> KafkaProducer:
    return KafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        compression_type="lz4",
        linger_ms=5,
        batch_size=1 << 20,
        max_request_size=4 << 20,
    )


def _topic(bootstrap: str, name: str) -> str:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(name, num_partitions=PARTITIONS, replication_factor=1)])
    finally:
        admin.close()
    return name


def _publish_looped(bootstrap: str, topic: str, n: int) -> float:
    source = ReplaySource([SAMPLE], loop=True, num_partitions=PARTITIONS)
    p = _producer(bootstrap)
    started = time.perf_counter()
    for item in itertools.islice(source, n):
        p.send(topic, key=item.hash.encode(), value=item.value, partition=item.partition)  # type: ignore[union-attr]
    p.flush()
    p.close()
    return time.perf_counter() - started


def _settings(base: Settings, topic: str, name: str, **changes: Any) -> Settings:
    return base.model_copy(update={"topic": topic, "lake_root": base.state_dir / name, **changes})


def _merge_backfill(
    spark: Any, settings: Settings, sink: str = "ours"
) -> tuple[float, dict[str, float], int]:
    from btc_anomaly.processing.stream import StreamRunner

    phases: dict[str, float] = {}
    batches = 0

    def on_batch(_batch_id: int, result: Any) -> None:
        nonlocal batches
        batches += 1
        for k, v in result.seconds.items():
            phases[k] = phases.get(k, 0.0) + v

    runner = StreamRunner(settings, spark, on_batch=on_batch)
    started = time.perf_counter()
    _merging_everything(lambda: runner.run_available_now(stats=False), sink)()
    return time.perf_counter() - started, phases, batches


def _merging_everything(run: Callable[[], Any], sink: str) -> Callable[[], Any]:
    """``run`` as the design of sessions 1-6 when ``sink`` is "merge-only": every row through the
    insert MERGE, as with an index of stored hashes that never rules a hash out."""
    from btc_anomaly.processing.stored_hashes import StoredHashes

    if sink != "merge-only":
        return run

    def merging() -> Any:
        original = StoredHashes.contains
        StoredHashes.contains = lambda _self, keys, _since: np.ones(len(keys), dtype=bool)  # type: ignore[method-assign]
        try:
            return run()
        finally:
            StoredHashes.contains = original  # type: ignore[method-assign]

    return merging


def _append_query(spark: Any, settings: Settings, available_now: bool, dedup: bool = False) -> Any:
    """The baseline: same source and parse, Spark's Delta sink appending (no dedup, no MERGE). With
    ``dedup``, the state-store design of sessions 5-6, for measurement only: dedup by hash in Spark's
    state store (RocksDB, as configured) within a watermark on the Kafka timestamp, before the same sink."""
    from pyspark.sql import functions as F

    from btc_anomaly.processing.parse import is_valid, parse, transaction_columns
    from btc_anomaly.processing.sinks import TRANSACTIONS, Lake, ensure_tables
    from btc_anomaly.processing.stream import kafka_source, trigger_options

    lake = Lake.from_settings(settings)
    ensure_tables(spark, lake)
    rows = parse(kafka_source(spark, settings)).where(is_valid())
    if dedup:
        rows = rows.withWatermark(
            "timestamp", f"{settings.stream_dedup_lookback_days} days"
        ).dropDuplicatesWithinWatermark(["hash"])
    return (
        rows.select(*transaction_columns(), F.current_timestamp().alias("ingested_at"))
        .writeStream.format("delta")
        .option("checkpointLocation", lake.checkpoint("state-dedup" if dedup else "append"))
        .trigger(**trigger_options(settings.stream_trigger_s, available_now))
        .start(lake.table(TRANSACTIONS))
    )


# The latency cases: the production runner, the old design (the runner with every row through the
# MERGE), and two designs with Spark's Delta sink in place of the transactions query.
SINKS = {
    "ours": "index + append, MERGE for stored hashes (ours)",
    "merge-only": "every row through the MERGE (sessions 1-6)",
    "append": "plain Delta append (baseline)",
    "state-dedup": "state-store dedup + Delta append (sessions 5-6 design)",
}


def _append_backfill(spark: Any, settings: Settings, dedup: bool = False) -> float:
    started = time.perf_counter()
    _append_query(spark, settings, available_now=True, dedup=dedup).awaitTermination()
    return time.perf_counter() - started


def _stats_backfill(spark: Any, settings: Settings) -> float:
    from btc_anomaly.processing.sinks import Lake
    from btc_anomaly.processing.stream import start_stats_query

    started = time.perf_counter()
    start_stats_query(spark, settings, Lake.from_settings(settings), available_now=True).awaitTermination()
    return time.perf_counter() - started


def _count(path: Path) -> int:
    from btc_anomaly.processing.delta_reader import count_rows

    return count_rows(path)


# --- latency -----------------------------------------------------------------------------------------


class _Visibility(threading.Thread):
    """Polls the Delta table's log (delta-rs) and notes when each hash first becomes readable."""

    def __init__(self, path: Path, interval_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.path, self.interval_s = path, interval_s
        self.seen: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        from deltalake import DeltaTable

        files: set[str] = set()
        version = -1
        table = None
        while not self.stop.is_set():
            try:
                # One table object brought up to date with the new commits only: reloading the whole
                # log 20 times a second took a good part of a core from the stream it measures.
                if table is None:
                    table = DeltaTable(str(self.path))
                else:
                    table.update_incremental()
                if table.version() != version:
                    now = time.time()
                    version = table.version()
                    current = set(table.file_uris())
                    for uri in current - files:
                        for h in pq.read_table(uri.removeprefix("file://"), columns=["hash"])[
                            "hash"
                        ].to_pylist():
                            self.seen.setdefault(h, now)
                    files = current
            except Exception:  # the table may be mid-creation; poll again
                log.debug("visibility poll failed", exc_info=True)
            self.stop.wait(self.interval_s)


def _latency(
    spark: Any, settings: Settings, rate: float, seconds: float, sink: str = "ours"
) -> dict[str, float]:
    """``sink`` (``SINKS``): ``btc-anomaly stream``'s runner, or a design with Spark's Delta sink instead
    of the transactions query, the stats query running beside it as in production."""
    from btc_anomaly.processing.sinks import Lake
    from btc_anomaly.processing.stream import StreamRunner, start_stats_query, stop_gracefully

    runner: StreamRunner | None = None
    baseline: list[Any] = []
    if sink not in ("ours", "merge-only"):
        baseline = [
            _append_query(spark, settings, available_now=False, dedup=sink == "state-dedup"),
            start_stats_query(spark, settings, Lake.from_settings(settings)),
        ]
    else:
        runner = StreamRunner(settings, spark)
        stream = threading.Thread(target=_merging_everything(runner.run_forever, sink), daemon=True)
        stream.start()
    watcher = _Visibility(settings.lake_table("transactions"))
    watcher.start()
    templates = [Transaction.from_json(line) for line in read_lines([SAMPLE])]
    p = _producer(settings.kafka_bootstrap)

    def send(i: int, sent: dict[str, float]) -> None:
        tx = templates[i % len(templates)]
        h = loop_hash(tx.hash, 10_000 + i // len(templates))
        value = tx.model_copy(
            update={"hash": h, "block_height": None, "first_seen": dt.datetime.now(dt.UTC), "source": "ws"}
        ).to_json_bytes()
        sent[h] = time.time()
        p.send(settings.topic, key=h.encode(), value=value)

    def wait_visible(sent: dict[str, float], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not set(sent) <= set(watcher.seen):
            time.sleep(0.2)

    # Warm-up, not measured: the JVM compiles the MERGE path during the first few hundred batches
    # (after 10 s of it, the first measured batches still took 2.9-4.5 s, later ones 1.2-1.8 s), and
    # the stats query's first MERGEs — once a minute — took 4.4-5.1 s cold, about twice a warm one:
    # the warm-up lasts until the stats query has written once, as in any stream running a minute.
    from btc_anomaly.processing.delta_reader import table_version

    interval = 1.0 / rate
    stats = settings.lake_table("tx_stats_1m")
    warm: dict[str, float] = {}
    started = time.perf_counter()
    i, stats_written = 0, False
    while time.perf_counter() - started < WARMUP_S or not stats_written:
        if i % int(max(rate, 1)) == 0:  # about once a second
            stats_written = (table_version(stats) or 0) >= 1
        delay = started + i * interval - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        send(i, warm)
        i += 1
    warmup = i
    p.flush()
    wait_visible(warm, 120)
    sent: dict[str, float] = {}
    started = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = started + i * interval - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        send(warmup + i, sent)
    p.flush()
    p.close()
    wait_visible(sent, 60)
    watcher.stop.set()
    if runner is not None:
        runner.stop_event.set()
        stream.join(timeout=120)
    for query in baseline:
        stop_gracefully(query)
    latencies = np.array([watcher.seen[h] - t for h, t in sent.items() if h in watcher.seen])
    return {
        "sent": len(sent),
        "visible": len(latencies),
        "p50_s": float(np.percentile(latencies, 50)),
        "p95_s": float(np.percentile(latencies, 95)),
        "max_s": float(latencies.max()),
    }


def _backfill_rows(
    spark: Any, base: Settings, bootstrap: str, suffix: str, messages: int, warmup: bool = True
) -> list[dict[str, Any]]:
    big = _topic(bootstrap, f"bench.backfill.{suffix}")
    publish_s = _publish_looped(bootstrap, big, messages)
    log.warning("published %d messages in %.1f s", messages, publish_s)
    if warmup:
        warm = _topic(bootstrap, f"bench.warm.{suffix}")
        _publish_looped(bootstrap, warm, messages)
        _merge_backfill(spark, _settings(base, warm, "warm-merge"))
        _merge_backfill(spark, _settings(base, warm, "warm-merge-only"), "merge-only")
        _append_backfill(spark, _settings(base, warm, "warm-append"))
        _append_backfill(spark, _settings(base, warm, "warm-state-dedup"), dedup=True)
    rows: list[dict[str, Any]] = []
    load = os.getloadavg()[0]

    def ours(case: str, settings: Settings, sink: str = "ours") -> None:
        seconds, phases, batches = _merge_backfill(spark, settings, sink)
        rows.append(
            {
                "case": case,
                "messages": messages,
                "rows stored": _count(settings.lake_table("transactions")),
                "batches": batches,
                "seconds": seconds,
                "tx/s": messages / seconds,
                "notes": ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()),
            }
        )

    merge_settings = _settings(base, big, "merge")
    ours(f"backfill: {SINKS['ours']}", merge_settings)
    ours(f"backfill: {SINKS['merge-only']}", _settings(base, big, "merge-only"), "merge-only")
    # The same records again into the same table (a new checkpoint: a replay from the earliest
    # offsets): every hash is stored, so every row takes the MERGE — the cost of a re-sent topic.
    ours(
        "backfill: ours, the same records again (every hash stored)",
        merge_settings.model_copy(update={"checkpoint_dir": merge_settings.lake_dir / "_checkpoints_again"}),
    )
    append_settings = _settings(base, big, "append")
    append_s = _append_backfill(spark, append_settings)
    rows.append(
        {
            "case": "backfill: plain Delta append (baseline)",
            "messages": messages,
            "rows stored": _count(append_settings.lake_table("transactions")),
            "seconds": append_s,
            "tx/s": messages / append_s,
            "notes": "Spark's Delta streaming sink, no dedup / MERGE",
        }
    )
    dedup_settings = _settings(base, big, "state-dedup")
    dedup_s = _append_backfill(spark, dedup_settings, dedup=True)
    rows.append(
        {
            "case": "backfill: state-store dedup + Delta append (sessions 5-6 design)",
            "messages": messages,
            "rows stored": _count(dedup_settings.lake_table("transactions")),
            "seconds": dedup_s,
            "tx/s": messages / dedup_s,
            "notes": "dropDuplicatesWithinWatermark(hash) in RocksDB, then Spark's Delta streaming sink",
        }
    )
    stats_s = _stats_backfill(spark, merge_settings)
    stored = _count(merge_settings.lake_table("transactions"))
    rows.append(
        {
            "case": "backfill: window aggregates (1m + 5m)",
            "messages": stored,
            "seconds": stats_s,
            "tx/s": stored / stats_s,
            "notes": "change feed of transactions → tx_stats_1m / tx_stats_5m",
        }
    )
    load = max(load, os.getloadavg()[0])
    for row in rows:
        row["load avg"] = load
    return rows


# --- main ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument(
        "--max-offsets", type=int, default=200_000, help="maxOffsetsPerTrigger of the backfill"
    )
    parser.add_argument("--rate", type=float, default=20.0, help="latency case: tx/s sent")
    parser.add_argument("--seconds", type=float, default=60.0, help="latency case: how long to send")
    parser.add_argument("--only", choices=("backfill", "latency"), help="run one part only")
    parser.add_argument("--trigger", type=float, default=1.0, help="latency case: trigger interval, s")
    parser.add_argument(
        "--sinks", default=",".join(SINKS), help=f"latency cases to run, of {', '.join(SINKS)}"
    )
    parser.add_argument("--bootstrap", help="use this running broker instead of starting one")
    parser.add_argument(
        "--no-warmup", action="store_true", help="skip the untimed warm-up backfills (smoke test only)"
    )
    args = parser.parse_args(argv or [])
    logging.basicConfig(level=logging.WARNING)

    from btc_anomaly.processing.spark_session import build_session

    workdir = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    broker = None
    if args.bootstrap is None:
        broker = KafkaBroker(
            data_dir=workdir / "kafka",
            jars_root=PROJECT_ROOT / ".jars",
            port=free_port(),
            controller_port=free_port(),
            heap="512m",
        )
        broker.start(timeout_s=120)
    bootstrap = args.bootstrap or broker.bootstrap  # type: ignore[union-attr]
    rows: list[dict[str, Any]] = []
    try:
        base = Settings(
            state_dir=workdir / "state",
            kafka_bootstrap=bootstrap,
            spark_master="local[2]",
            spark_shuffle_partitions=4,
            stream_max_offsets_per_trigger=args.max_offsets,
            stream_metrics_port=0,
        )
        suffix = uuid.uuid4().hex[:6]
        spark = build_session(base, app_name="bench-stream")
        if args.only != "latency":
            rows += _backfill_rows(spark, base, bootstrap, suffix, args.messages, not args.no_warmup)
        for sink in () if args.only == "backfill" else args.sinks.split(","):
            name = f"latency-{sink}"
            latency_settings = _settings(
                base,
                _topic(bootstrap, f"bench.{name}.{suffix}"),
                name,
                stream_trigger_s=args.trigger,
                stream_max_offsets_per_trigger=200_000,
                stream_scoring=False,  # no registry here: publish → transactions is what is measured
            )
            load = os.getloadavg()[0]
            lat = _latency(spark, latency_settings, args.rate, args.seconds, sink=sink)
            rows.append(
                {
                    "case": f"latency, {SINKS[sink]}: {args.trigger:g} s trigger, {args.rate:g} tx/s for "
                    f"{args.seconds:g} s",
                    "messages": lat["sent"],
                    "rows stored": lat["visible"],
                    "p50 s": lat["p50_s"],
                    "p95 s": lat["p95_s"],
                    "max s": lat["max_s"],
                    "notes": "with the tx_stats query; delta-rs poll every 50 ms",
                    "load avg": max(load, os.getloadavg()[0]),
                }
            )
        spark.stop()
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


if __name__ == "__main__":
    import sys

    from bench.run_all import format_table

    print(format_table(main(sys.argv[1:])))
