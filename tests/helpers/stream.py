"""Helpers of the streaming tests and benchmark: publishing real sample data, bad records, expected stats."""

from __future__ import annotations

import contextlib
import gzip
import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from btc_anomaly.config import ENV_PREFIX, PROJECT_ROOT, Settings
from btc_anomaly.schema import Transaction

SAMPLE = PROJECT_ROOT / "data" / "sample" / "transactions.jsonl.gz"
Record = tuple[bytes | None, bytes | None]  # (key, value)


def kafka_frame(spark: Any, values: list[bytes | None]) -> Any:
    """A batch DataFrame with the Kafka source's columns (offset = position in ``values``, partition 0),
    for testing the stream's per-record logic without a broker."""
    from pyspark.sql import functions as F

    return spark.createDataFrame([(i, v) for i, v in enumerate(values)], "offset long, value binary").select(
        F.lit(None).cast("binary").alias("key"),
        "value",
        F.lit("t").alias("topic"),
        F.lit(0).alias("partition"),
        "offset",
        F.current_timestamp().alias("timestamp"),
    )


def sample_lines() -> list[bytes]:
    with gzip.open(SAMPLE, "rb") as fh:
        return [line.rstrip(b"\n") for line in fh if line.strip()]


def key_of(line: bytes) -> bytes:
    return orjson.loads(line)["hash"].encode()


def looped_records(n: int, partitions: int = 3) -> Iterator[tuple[str, bytes, int | None]]:
    """``n`` canonical records: the sample replayed in loops with fresh hashes (the producer's own replay)."""
    from btc_anomaly.ingestion.replay_source import ReplaySource

    source = ReplaySource([SAMPLE], loop=True, num_partitions=partitions)
    for item in itertools.islice(source, n):
        yield item.hash, item.value, item.partition  # type: ignore[union-attr]


def create_topic(bootstrap: str, topic: str, partitions: int = 3) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        admin.close()


def producer(bootstrap: str) -> KafkaProducer:
    return KafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        compression_type="lz4",
        linger_ms=20,
        batch_size=1 << 20,
        max_request_size=4 << 20,
    )


def publish(bootstrap: str, topic: str, records: Iterable[Record]) -> int:
    p = producer(bootstrap)
    n = 0
    try:
        for key, value in records:
            p.send(topic, key=key, value=value)
            n += 1
        p.flush()
    finally:
        p.close()
    return n


def malformed(good: bytes) -> list[tuple[str, bytes | None, str]]:
    """(label, value, expected reason substring) of records that are not valid canonical transactions."""
    tx = orjson.loads(good)

    def variant(**changes: object) -> bytes:
        d = dict(tx)
        for k, v in changes.items():
            if v is ...:
                d.pop(k)
            else:
                d[k] = v
        return orjson.dumps(d)

    first_output = tx["outputs"][0]
    return [
        ("bad json", b'{"hash": "abc", "size": ', "bad JSON"),
        ("not an object", b"[1, 2, 3]", "bad JSON"),
        ("empty", b"", "bad JSON"),
        ("tombstone", None, "bad JSON"),
        ("missing hash", variant(hash=...), "missing hash"),
        ("bad hash", variant(hash="XYZ"), "hash does not match"),
        ("negative value", variant(output_value=-1), "negative output_value"),
        (
            "negative output",
            variant(outputs=[{**first_output, "value": -5}, *tx["outputs"][1:]]),
            "outputs: negative value",
        ),
        ("negative fee", variant(fee=-10), "negative fee"),
        ("wrong type", variant(size="big"), "wrong type: size"),
        (
            "wrong nested type",
            variant(outputs=[{**first_output, "value": "x"}, *tx["outputs"][1:]]),
            "wrong type",
        ),
        ("inconsistent count", variant(input_count=tx["input_count"] + 1), "input_count != number of inputs"),
        (
            "inconsistent outputs",
            variant(output_count=tx["output_count"] + 3),
            "output_count != number of outputs",
        ),
        ("inconsistent sum", variant(output_value=tx["output_value"] + 1), "output_value != sum"),
        ("unknown source", variant(source="carrier-pigeon"), "source not one of"),
        # Would overflow a long when summed (Spark's ANSI mode raises on that): must not fail the batch.
        (
            "overflowing values",
            variant(
                outputs=[{**first_output, "value": 9_000_000_000_000_000_000}] * 2,
                output_count=2,
                output_value=9_000_000_000_000_000_000,
            ),
            "output_value != sum of output values",
        ),
    ]


def with_changes(line: bytes, **changes: object) -> bytes:
    d = orjson.loads(line)
    d.update(changes)
    return Transaction.model_validate(d).to_json_bytes()


# --- expected window aggregates (pandas) -----------------------------------------------------------


def expected_stats(txs: Iterable[Transaction], seconds: int) -> pd.DataFrame:
    """What tx_stats_<n>m must hold for these distinct transactions, computed with pandas."""
    df = pd.DataFrame(
        [
            {
                "first_seen": t.first_seen,
                "output_value": t.output_value,
                "fee": t.fee,
                "vsize": t.vsize,
                "input_count": t.input_count,
                "output_count": t.output_count,
            }
            for t in txs
        ]
    )
    df["first_seen"] = pd.to_datetime(df["first_seen"], utc=True)
    df["fee"] = df["fee"].astype("float64")
    df["fee_rate"] = df["fee"].where(df["vsize"] > 0) / df["vsize"].where(df["vsize"] > 0)
    df["window_start"] = df["first_seen"].dt.floor(f"{seconds}s")
    g = df.groupby("window_start")
    out = pd.DataFrame(
        {
            "tx_count": g.size(),
            "total_value": g["output_value"].sum(),
            "median_value": g["output_value"].median(),
            "fan_in_count": g["input_count"].apply(lambda s: int((s >= 10).sum())),
            "fan_out_count": g["output_count"].apply(lambda s: int((s >= 10).sum())),
        }
    )
    for col in ("fee", "fee_rate"):
        for q in (0.5, 0.9, 0.99):
            out[f"{col}_p{int(q * 100)}"] = g[col].quantile(q)
    return out.reset_index()


# --- the stream as its own process ----------------------------------------------------------------


def stream_env(settings: Settings, **extra: object) -> dict[str, str]:
    """Environment for `btc-anomaly stream` with these settings (every knob through BTC_ANOMALY_*)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    values = settings.model_dump(mode="json", exclude_none=True)
    values.update(extra)
    for name, value in values.items():
        env[f"{ENV_PREFIX}{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def stream_process_settings(base: Settings, lake_root: Path, **changes: object) -> Settings:
    """``base`` for a `btc-anomaly stream` process of a test: its own lake, a small local Spark, batches
    back to back, windows every 2 s, its metrics on a free port; ``changes`` on top."""
    update: dict[str, object] = {
        "lake_root": lake_root,
        "spark_master": "local[2]",
        "spark_driver_memory": "1g",
        "stream_trigger_s": 0.0,
        "stream_stats_trigger_s": 2.0,
        "stream_metrics_port": 0,
    }
    return base.model_copy(update=update | changes)


def start_stream(settings: Settings, log: Path, *args: str, **extra: object) -> subprocess.Popen[bytes]:
    """`btc-anomaly stream` in its own process group (so kill -9 takes its JVM down with it)."""
    out = log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "btc_anomaly.cli", "stream", *args],
        env=stream_env(settings, **extra),
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=PROJECT_ROOT,
    )


def kill_stream(proc: subprocess.Popen[bytes]) -> None:
    """kill -9 of `btc-anomaly stream` and every process under it, at once, like a power cut (its JVM
    runs in a session of its own, see spark_session._own_session_gateway)."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()
    psutil.wait_procs(tree[1:], timeout=30)


def wait_for(
    predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.5, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what or predicate}")


def run_forever_in_thread(runner: Any) -> tuple[threading.Thread, list[BaseException]]:
    """``runner.run_forever()`` in a daemon thread; the list receives what it raised, if it ends."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            runner.run_forever()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run, name="stream-runner", daemon=True)
    thread.start()
    return thread, raised
