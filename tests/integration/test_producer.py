"""The producer against a real Kafka broker: round trip, dedup, DLQ, source faults, WS drops, signals."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka import KafkaConsumer
from kafka.consumer.fetcher import ConsumerRecord

from btc_anomaly.config import PROJECT_ROOT, Settings
from btc_anomaly.ingestion.partitioning import partitions_for
from btc_anomaly.ingestion.producer import ProducerStats, TxProducer, run_producer
from btc_anomaly.ingestion.replay_source import BlockFileSource, read_lines
from btc_anomaly.runtime.kafka_broker import free_port
from btc_anomaly.schema import Transaction, first_seen_too_late
from fakes.blockchain_com import FakeBlockchainCom, Fault, fake_blockchain, fake_settings, malformed_txs

pytestmark = pytest.mark.integration
__all__ = ["fake_blockchain"]  # the fixture is used by name

SAMPLE = PROJECT_ROOT / "data" / "sample" / "transactions.jsonl.gz"
BLOCKS = Path(__file__).resolve().parents[1] / "fixtures" / "blocks"


def consume(
    bootstrap: str, topic: str, expected: int | None = None, *, idle_s: float = 2.0
) -> list[ConsumerRecord]:
    """Every record of ``topic``: reads until ``expected`` arrived and then ``idle_s`` more without any."""
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=int(idle_s * 1000),
    )
    records: list[ConsumerRecord] = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            batch = list(consumer)  # returns after idle_s without records
            records.extend(batch)
            if expected is None or len(records) >= expected:
                break
    finally:
        consumer.close()
    return records


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Background:
    """run_producer in a thread, with a stop switch and the live producer for its stats."""

    def __init__(self, settings: Settings, source: str, **kwargs: Any) -> None:
        self.stop = threading.Event()
        self.producer = TxProducer(settings)
        self.error: BaseException | None = None
        self.stats: ProducerStats | None = None

        def run() -> None:
            try:
                self.stats = run_producer(settings, source, stop=self.stop, producer=self.producer, **kwargs)
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def finish(self, timeout: float = 60.0) -> ProducerStats:
        self.stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "producer did not stop"
        if self.error is not None:
            raise self.error
        self.producer.close()
        assert self.stats is not None
        return self.stats


def _without_restamped(tx: Transaction) -> dict[str, Any]:
    return tx.model_dump(exclude={"first_seen", "source"})


# --- replay ----------------------------------------------------------------------------------------


def test_sample_round_trip_field_by_field(kafka_settings: Settings) -> None:
    originals = [Transaction.from_json(line) for line in read_lines([SAMPLE])]
    started = dt.datetime.now(dt.UTC)
    stats = run_producer(kafka_settings, "replay")
    finished = dt.datetime.now(dt.UTC)
    assert stats.published == stats.sent == len(originals)
    assert stats.duplicates == stats.dlq == 0

    records = consume(kafka_settings.kafka_bootstrap, kafka_settings.topic, len(originals))
    assert len(records) == len(originals)
    by_hash = {r.key.decode(): r for r in records}
    assert len(by_hash) == len(originals)
    expected_partitions = partitions_for([t.hash.encode() for t in originals], 3)
    for original, partition in zip(originals, expected_partitions, strict=True):
        record = by_hash[original.hash]
        got = Transaction.from_json(record.value)
        assert _without_restamped(got) == _without_restamped(original)
        assert got.source == "replay"
        assert started <= got.first_seen <= finished  # re-stamped to publish time
        assert record.partition == partition  # Kafka's default (murmur2) placement of the key
        assert dict(record.headers or []) == {}


def test_rerun_in_the_same_process_does_not_republish(kafka_settings: Settings, tmp_path: Path) -> None:
    lines = list(read_lines([SAMPLE]))[:300]
    confirmed = tmp_path / "confirmed.jsonl"
    confirmed.write_bytes(b"\n".join(lines))
    unconfirmed = tmp_path / "unconfirmed.jsonl"
    mempool = [orjson.loads(line) | {"block_height": None} for line in lines[:100]]
    unconfirmed.write_bytes(b"\n".join(orjson.dumps(d) for d in mempool))

    producer = TxProducer(kafka_settings)
    try:
        first = run_producer(kafka_settings, "replay", paths=[str(unconfirmed)], producer=producer)
        assert (first.sent, first.duplicates) == (100, 0)
        run_producer(kafka_settings, "replay", paths=[str(confirmed)], producer=producer)
        assert (producer.stats.sent, producer.stats.duplicates) == (400, 0)  # confirmations published again
        run_producer(kafka_settings, "replay", paths=[str(confirmed), str(unconfirmed)], producer=producer)
        assert (producer.stats.sent, producer.stats.duplicates) == (400, 400)
    finally:
        producer.close()

    records = consume(kafka_settings.kafka_bootstrap, kafka_settings.topic, 400)
    states = Counter((r.key.decode(), Transaction.from_json(r.value).block_height is None) for r in records)
    assert len(records) == 400
    assert set(states.values()) == {1}
    assert sum(1 for _, unconf in states if unconf) == 100


def test_dead_letters_carry_raw_payload_and_reason(kafka_settings: Settings, tmp_path: Path) -> None:
    lines = list(read_lines([SAMPLE]))[:20]
    negative_fee = orjson.loads(lines[3]) | {"fee": -7}
    no_hash = {k: v for k, v in orjson.loads(lines[4]).items() if k != "hash"}
    bad = [b'{"hash": "1db6251a9a', orjson.dumps(negative_fee), orjson.dumps(no_hash), b"\xff\xfe not utf-8"]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join([*lines[:10], *bad, *lines[10:]]))

    started = dt.datetime.now(dt.UTC)
    stats = run_producer(kafka_settings, "replay", paths=[str(path)])
    assert (stats.sent, stats.dlq, stats.dlq_published) == (20, 4, 4)

    assert len(consume(kafka_settings.kafka_bootstrap, kafka_settings.topic, 20)) == 20
    dead = consume(kafka_settings.kafka_bootstrap, kafka_settings.dlq_topic, 4)
    envelopes = sorted((orjson.loads(r.value) for r in dead), key=lambda e: bad.index(_raw_bytes(e)))
    assert [_raw_bytes(e) for e in envelopes] == bad
    assert "JSON" in envelopes[0]["reason"]
    assert "fee" in envelopes[1]["reason"]
    assert "hash" in envelopes[2]["reason"]
    assert envelopes[3]["raw_encoding"] == "base64"
    for envelope in envelopes:
        assert envelope["source"] == "replay"
        assert dt.datetime.fromisoformat(envelope["time"]) >= started
        assert envelope["raw_truncated"] is False


def two_megabyte_tx() -> Transaction:
    """A real sample transaction with its outputs repeated until its record is over 2 MB (labelled
    synthetic size: real outputs, fresh hash via replay's loop_hash). Kafka's max.request.size is 1 MiB."""
    from btc_anomaly.ingestion.replay_source import loop_hash

    original = next(
        t
        for t in map(Transaction.from_json, read_lines([SAMPLE]))
        if t.fee is not None and t.input_value is not None and 0 < t.output_value < 10**9
    )
    copy_bytes = len(orjson.dumps([o.model_dump() for o in original.outputs]))
    outputs = list(original.outputs) * (int(2.1 * 1024 * 1024) // copy_bytes)  # a record just over 2 MiB
    output_value = sum(o.value for o in outputs)
    assert original.fee is not None
    return original.model_copy(
        update={
            "hash": loop_hash(original.hash, 2_000_000),
            "outputs": outputs,
            "output_count": len(outputs),
            "output_value": output_value,
            "input_value": output_value + original.fee,
        }
    )


def test_a_record_kafka_refuses_and_a_future_dated_one_go_to_the_dlq_and_the_rest_is_delivered(
    kafka_settings: Settings,
) -> None:
    """Issue #19 items 4 and 5: a 2 MB record used to be re-queued at the head of the retry queue and
    re-sent forever, so nothing behind it was ever delivered."""
    big = Transaction.model_validate(two_megabyte_tx().model_dump())  # validated like any source's tx
    assert len(big.to_json_bytes()) > 2 * 1024 * 1024
    sample = [Transaction.from_json(line) for line in list(read_lines([SAMPLE]))[:60]]
    future = sample[40].model_copy(
        update={"first_seen": dt.datetime.now(dt.UTC) + dt.timedelta(days=365), "hash": "f" * 64}
    )
    items = [*sample[:20], big, *sample[20:40], future, *sample[40:]]
    producer = TxProducer(kafka_settings)
    stop = threading.Event()
    done: list[ProducerStats] = []
    thread = threading.Thread(target=lambda: done.append(producer.publish(items, stop=stop)), daemon=True)
    thread.start()
    thread.join(60)
    stuck = thread.is_alive()
    stop.set()  # unblocks a producer stuck re-sending, so the failure is an assertion, not a hang
    thread.join(30)
    assert not stuck, "the producer never got past the 2 MB record"
    assert producer.flush(30)
    stats = done[0]
    producer.close()

    assert (stats.rejected, stats.out_of_range, stats.published) == (1, 1, len(sample))
    delivered = consume(kafka_settings.kafka_bootstrap, kafka_settings.topic, len(sample))
    assert sorted(r.key.decode() for r in delivered) == sorted(t.hash for t in sample)
    dead = {
        r.key.decode(): orjson.loads(r.value)
        for r in consume(kafka_settings.kafka_bootstrap, kafka_settings.dlq_topic, 2)
    }
    assert set(dead) == {big.hash, future.hash}
    refused = dead[big.hash]
    assert "MessageSizeTooLargeError" in refused["reason"] and refused["source"] == big.source
    assert refused["raw_truncated"] is True and big.to_json_bytes().startswith(refused["raw"].encode())
    assert dead[future.hash]["reason"] == first_seen_too_late(kafka_settings.first_seen_max_skew_s)
    assert Transaction.from_json(dead[future.hash]["raw"]) == future


def _raw_bytes(envelope: dict[str, Any]) -> bytes:
    import base64

    if envelope["raw_encoding"] == "base64":
        return base64.b64decode(envelope["raw"])
    return envelope["raw"].encode()


def test_block_files_are_published(kafka_settings: Settings) -> None:
    rbtc = BLOCKS / "rbtc"
    block = rbtc / "mainnet-000000000000000004c2b624ed5d7756c508d90fd0da2c7c679febfa6c4735f0.raw.gz"
    utxos = rbtc / "mainnet-000000000000000004c2b624ed5d7756c508d90fd0da2c7c679febfa6c4735f0.utxos.json.gz"
    expected = list(BlockFileSource([block], prevout_paths=[utxos]))
    stats = run_producer(kafka_settings, "blocks", paths=[str(block)], prevouts=[utxos])
    assert stats.published == len(expected) == 784
    got = {
        r.key.decode(): Transaction.from_json(r.value)
        for r in consume(kafka_settings.kafka_bootstrap, kafka_settings.topic, 784)
    }
    assert [got[t.hash] for t in expected] == expected  # type: ignore[union-attr]


# --- live sources against the fake Blockchain.com ------------------------------------------------------


def test_rest_survives_every_fault_and_publishes_each_tx_once(
    kafka_settings: Settings, fake_blockchain: FakeBlockchainCom
) -> None:
    fake = fake_blockchain
    good_unconfirmed = {t["hash"] for t in fake.unconfirmed_txs}
    block = fake.block
    broken = malformed_txs(fake.unconfirmed_txs[0])
    fake.unconfirmed_txs.extend(tx for tx, _ in broken)
    fake.script(
        "unconfirmed",
        Fault.rate_limit("1"),
        Fault.status_code(500),
        Fault.html(),
        Fault.truncated(),
        Fault.drop(),
        Fault.delay(0.6),
        *[Fault.status_code(503)] * 4,  # one poll that fails after all retries
    )
    fake.script("latestblock", Fault.status_code(502), Fault.html())
    fake.script("rawblock", Fault.truncated(), Fault.rate_limit("0"), Fault.status_code(500))
    settings = fake_settings(fake, base=kafka_settings, http_timeout_s=0.3)

    expected = {(h, True) for h in good_unconfirmed} | {(t["hash"], False) for t in block["tx"]}
    bg = Background(settings, "rest")
    wait_for(lambda: bg.producer.stats.published >= len(expected), 60, "all transactions acknowledged")
    polls_then = fake.count("/unconfirmed-transactions")
    wait_for(lambda: fake.count("/unconfirmed-transactions") >= polls_then + 5, 30, "more polls")
    stats = bg.finish()

    assert stats.published == len(expected)
    assert stats.duplicates > 0  # later polls saw the same transactions again
    records = consume(settings.kafka_bootstrap, settings.topic, len(expected))
    seen = Counter((r.key.decode(), Transaction.from_json(r.value).block_height is None) for r in records)
    assert set(seen) == expected
    assert set(seen.values()) == {1}  # exactly once per (hash, confirmed)

    dead = [orjson.loads(r.value) for r in consume(settings.kafka_bootstrap, settings.dlq_topic, len(broken))]
    assert len(dead) == len(broken)  # once each, although every poll returned them again
    for envelope in dead:
        raw = orjson.loads(envelope["raw"])
        word = next(w for tx, w in broken if tx == raw)
        assert word in envelope["reason"]
        assert envelope["source"] == "rest"
    served = Counter(status for path, status in fake.requests)
    assert served[429] == 2 and served[500] >= 2 and served[503] == 4 and served[0] == 1


def test_rest_one_shot_by_hash(kafka_settings: Settings, fake_blockchain: FakeBlockchainCom) -> None:
    hashes = list(fake_blockchain.rawtx)
    fake_blockchain.script("rawtx", Fault.html(), Fault.status_code(500))
    stats = run_producer(
        fake_settings(fake_blockchain, base=kafka_settings), "rest", paths=[*hashes, "00" * 32]
    )
    assert stats.published == len(hashes)
    records = consume(kafka_settings.kafka_bootstrap, kafka_settings.topic, len(hashes))
    assert sorted(r.key.decode() for r in records) == sorted(hashes)


def test_websocket_drops_reconnect_and_nothing_is_lost(
    kafka_settings: Settings, fake_blockchain: FakeBlockchainCom
) -> None:
    fake = fake_blockchain
    txs = fake.unconfirmed_txs[:25]
    fake.ws_drop_after = [7, 5]
    fake.ws_utx(txs[:12])
    settings = fake_settings(fake, base=kafka_settings, fetch_blocks=False)
    bg = Background(settings, "ws")
    wait_for(lambda: bg.producer.stats.published >= 12, 30, "first half")
    fake.ws_utx(txs[12:])  # the feed goes on after the reconnects
    wait_for(lambda: bg.producer.stats.published >= 25, 30, "second half")
    stats = bg.finish()
    assert stats.published == 25
    assert fake.ws_connections == 3
    records = consume(settings.kafka_bootstrap, settings.topic, 25)
    assert Counter(r.key.decode() for r in records) == Counter(t["hash"] for t in txs)
    assert all(Transaction.from_json(r.value).source == "ws" for r in records)


# --- process behaviour ---------------------------------------------------------------------------------


def test_sigterm_flushes_and_metrics_are_served(kafka_settings: Settings) -> None:
    port = free_port()
    env = {
        **os.environ,
        "BTC_ANOMALY_KAFKA_BOOTSTRAP": kafka_settings.kafka_bootstrap,
        "BTC_ANOMALY_TOPIC": kafka_settings.topic,
        "BTC_ANOMALY_DLQ_TOPIC": kafka_settings.dlq_topic,
        "BTC_ANOMALY_PRODUCER_METRICS_PORT": str(port),
    }
    cli = [sys.executable, "-m", "btc_anomaly.cli", "produce", "--source", "replay", "--speed", "1000"]
    started_at = time.time()
    proc = subprocess.Popen(cli, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:

        def metrics() -> dict[str, float]:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                return {}
            return {
                line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("btc_producer_")
            }

        wait_for(lambda: metrics().get("btc_producer_published_total", 0) > 1000, 60, "published metric")
        scraped = metrics()
        assert scraped['btc_producer_fetched_total{source="replay"}'] >= 1000
        assert scraped["btc_producer_last_publish_timestamp_seconds"] >= started_at
        assert scraped['btc_producer_errors_total{kind="http_429"}'] == 0
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()[-2000:]
    stats = orjson.loads(out.decode().strip().splitlines()[-1])
    assert 1000 < stats["sent"] < 5274  # stopped mid-replay
    assert stats["published"] == stats["sent"]  # everything handed over was flushed before exit
    records = consume(kafka_settings.kafka_bootstrap, kafka_settings.topic, stats["sent"])
    assert len(records) == stats["sent"]
