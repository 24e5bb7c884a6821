"""Producer throughput: our replay → TxProducer path vs a bare kafka-python loop, same broker, same run.

A single-node broker is started on free ports in a temporary folder (runtime/kafka_broker.py). Each case
sends ``messages`` records (the bundled sample, looped) to its own fresh 3-partition topic with the same
client settings (acks=all, idempotent, lz4, linger/batch from Settings) and is timed until every record
is acknowledged (flush). Cases run interleaved ``repeats`` times; the best run of each is reported.

* ``ours``: ReplaySource(loop=True) → TxProducer.publish: restamped first_seen, fresh loop hashes, dedup,
  delivery tracking, metrics: everything the real ``btc-anomaly produce --source replay`` does.
* ``bare``: ``producer.send(topic, value, key=key)`` over the sample's pre-serialized lines.
* ``bare+partition``: the same with the partition computed up front (what ``ours`` does with murmur2
  in numpy), to show how much of the gap is kafka-python's pure-Python partitioner.

Micro rows: per-record cost of producing the value bytes — our byte splice vs re-serializing.

    python -m bench.bench_producer [--messages N] [--repeats R] [--bootstrap HOST:PORT]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from btc_anomaly.config import PROJECT_ROOT, Settings
from btc_anomaly.ingestion.partitioning import partitions_for
from btc_anomaly.ingestion.producer import TxProducer
from btc_anomaly.ingestion.replay_source import IsoStamper, ReplaySource, read_lines
from btc_anomaly.runtime.kafka_broker import KafkaBroker, free_port
from btc_anomaly.schema import Transaction

PARTITIONS = 3


def _client_config(s: Settings) -> dict[str, Any]:
    return {
        "bootstrap_servers": s.kafka_bootstrap,
        "acks": "all",
        "enable_idempotence": True,
        "compression_type": s.producer_compression,
        "linger_ms": s.producer_linger_ms,
        "batch_size": s.producer_batch_size,
    }


def _topic(admin: KafkaAdminClient, prefix: str) -> str:
    name = f"bench.{prefix}.{uuid.uuid4().hex[:8]}"
    admin.create_topics([NewTopic(name, num_partitions=PARTITIONS, replication_factor=1)])
    return name


def run_ours(s: Settings, topic: str, sample: Path, messages: int) -> float:
    settings = s.model_copy(update={"topic": topic, "dlq_topic": f"{topic}.dlq"})
    producer = TxProducer(settings)
    producer.connect()
    source = ReplaySource([sample], loop=True, num_partitions=producer.num_partitions)
    started = time.perf_counter()
    stats = producer.publish(source, limit=messages)
    producer.flush(timeout_s=120)
    elapsed = time.perf_counter() - started
    producer.close()
    if stats.published != messages:
        raise RuntimeError(f"ours: {stats.published} of {messages} acknowledged")
    return elapsed


def run_bare(
    s: Settings, topic: str, keys: list[bytes], values: list[bytes], messages: int, *, partition: bool
) -> float:
    producer = KafkaProducer(**_client_config(s))
    producer.send(topic, b"warm-up", key=b"warm-up").get(timeout=30)  # metadata + connection, as ours has
    parts = partitions_for(keys, PARTITIONS) if partition else None
    n = len(keys)
    send = producer.send
    started = time.perf_counter()
    if parts is None:
        for i in range(messages):
            j = i % n
            send(topic, values[j], key=keys[j])
    else:
        for i in range(messages):
            j = i % n
            send(topic, values[j], key=keys[j], partition=parts[j])
    producer.flush(timeout=120)
    elapsed = time.perf_counter() - started
    producer.close()
    return elapsed


def micro_rows(sample: Path) -> list[dict[str, Any]]:
    """µs per record to build the value bytes of a restamped transaction, three ways."""
    lines = list(read_lines([sample]))
    rows = []
    source = ReplaySource([sample])
    it = iter(source)
    started = time.perf_counter()
    for _ in range(len(source)):
        next(it)
    rows.append(("replay splice (ours)", (time.perf_counter() - started) / len(source)))

    stamp = IsoStamper()
    started = time.perf_counter()
    for line in lines:
        d = orjson.loads(line)
        d["first_seen"] = stamp(time.time()).decode()
        d["source"] = "replay"
        orjson.dumps(d)
    rows.append(("orjson loads + restamp + dumps", (time.perf_counter() - started) / len(lines)))

    subset = lines[:2000]
    started = time.perf_counter()
    for line in subset:
        Transaction.from_json(line).model_copy(update={"source": "replay"}).to_json_bytes()
    rows.append(("pydantic parse + to_json_bytes", (time.perf_counter() - started) / len(subset)))
    return [{"case": f"value bytes: {name}", "us_per_tx": us * 1e6} for name, us in rows]


def _timings(
    bootstrap: str, sample: Path, keys: list[bytes], lines: list[bytes], messages: int, repeats: int
) -> dict[str, float]:
    s = Settings(kafka_bootstrap=bootstrap, producer_metrics_port=0, topic_partitions=PARTITIONS)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    best: dict[str, float] = {}
    try:
        for _ in range(repeats):
            timings = {
                "bare": run_bare(s, _topic(admin, "bare"), keys, lines, messages, partition=False),
                "bare+partition": run_bare(s, _topic(admin, "barep"), keys, lines, messages, partition=True),
                "ours": run_ours(s, _topic(admin, "ours"), sample, messages),  # 3 partitions on any broker
            }
            for case, seconds in timings.items():
                best[case] = min(best.get(case, float("inf")), seconds)
    finally:
        admin.close()
    return best


def main(messages: int = 100_000, repeats: int = 2, bootstrap: str | None = None) -> list[dict[str, Any]]:
    """``bootstrap``: a running broker to use (the smoke test passes the test session's) instead of
    starting one; every case still gets its own fresh topic."""
    logging.getLogger("kafka").setLevel(logging.ERROR)
    sample = Settings().replay_path
    lines = list(read_lines([sample]))
    keys = [orjson.loads(line)["hash"].encode() for line in lines]
    if bootstrap is not None:
        best = _timings(bootstrap, sample, keys, lines, messages, repeats)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-kafka-") as tmp:
            broker = KafkaBroker(
                data_dir=Path(tmp),
                jars_root=PROJECT_ROOT / ".jars",
                port=free_port(),
                controller_port=free_port(),
                heap="512m",
                num_partitions=PARTITIONS,
            )
            broker.start(timeout_s=120)
            try:
                best = _timings(broker.bootstrap, sample, keys, lines, messages, repeats)
            finally:
                broker.stop()
    bare_rate = messages / best["bare"]
    rows: list[dict[str, Any]] = []
    for case in ("ours", "bare", "bare+partition"):
        rate = messages / best[case]
        rows.append(
            {
                "case": case,
                "messages": messages,
                "seconds": best[case],
                "tx_per_s": rate,
                "vs_bare": rate / bare_rate,
            }
        )
    rows.extend(micro_rows(sample))
    return rows


if __name__ == "__main__":
    from bench.run_all import format_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bootstrap", default=None, help="use this running broker instead of starting one")
    args = parser.parse_args()
    print(format_table(main(args.messages, args.repeats, args.bootstrap)))
