"""Publish canonical transactions to Kafka: dedup, dead-letter topic, outage-proof sends, metrics.

* Topic ``Settings.topic``, key = tx hash, value = canonical JSON; acks=all, idempotent, compressed.
  Both topics are created when missing.
* Dedup: a bounded LRU of ``(hash, unconfirmed)`` (see :mod:`~btc_anomaly.ingestion.dedup`).
* Dead letters: a :class:`~btc_anomaly.ingestion.records.Failure` goes to ``dlq_topic`` as a JSON envelope
  ``{"reason", "source", "time", "raw", "raw_encoding", "raw_truncated"}``; ``raw`` is the payload as
  received (JSON text for JSON objects, UTF-8 text, or base64 for binary with raw_encoding "base64").
  The same rejected payload seen again (a poll returns it every time) is sent once per run.
* Outages: kafka-python retries in-flight batches itself (idempotent, so without duplicates) until
  ``producer_delivery_timeout_ms``. A send that cannot even be enqueued because the broker is
  unreachable for ``producer_max_block_ms`` is queued again and re-sent before any new record, with
  backoff. A send that fails after being enqueued (expired) makes us replace the client and re-send
  everything it had not acknowledged (see :meth:`TxProducer._reset_client` for why). Nothing is dropped
  until the process is stopped; a record whose acknowledgement was lost can be written twice
  (at-least-once), which the MERGE-by-hash downstream absorbs.
* Records Kafka can never take (:data:`RECORD_ERRORS`: over ``max.request.size``, corrupt, invalid)
  go to the DLQ with the error as reason instead of being retried; the records behind them go on.
  Retriable errors (broker or partition away, timeouts) and topic-wide ones (authorization, a bad
  topic name) are retried with backoff, oldest first: they hold every record alike, so waiting is all
  there is to do, and it is counted (``btc_producer_errors_total{kind="kafka_send"}``) and alerted.
* Event time: a transaction whose ``first_seen`` is outside [2009-01-03, now + ``first_seen_max_skew_s``]
  goes to the DLQ (schema.first_seen_error); the stream applies the same bound. Replayed records are
  stamped with the wall clock when sent, so only sources that carry their own time are checked.
* Memory: live sources hand items over through a queue of ``producer_source_queue_max`` items
  (:func:`iterate_async`); while Kafka is away the publish loop waits in the retries, the queue fills
  and the source is held (REST polls later; the WebSocket drops pushes with a count, see ws_source.py).
* Delivery is tracked by sweeping the futures in batches rather than per-message callbacks, which cost
  a quarter of the throughput in measurements (bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import gc
import hashlib
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import (
    CorruptRecordError,
    InvalidRecordError,
    InvalidTimestampError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    TopicAlreadyExistsError,
)

from btc_anomaly.config import Settings
from btc_anomaly.ingestion.dedup import Dedup
from btc_anomaly.ingestion.records import Encoded, Failure, Item
from btc_anomaly.monitoring import metrics
from btc_anomaly.monitoring.kafka_logging import waiting_for_kafka
from btc_anomaly.schema import Transaction, first_seen_error

log = logging.getLogger(__name__)

# Errors about one record itself (its size or content): re-sending it can never succeed. Raised by
# send() (kafka-python's size check) or set on its future by the broker.
RECORD_ERRORS: tuple[type[KafkaError], ...] = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    CorruptRecordError,
    InvalidRecordError,
    InvalidTimestampError,
)


T = TypeVar("T")

DLQ_RAW_MAX = 256 * 1024  # characters of raw payload kept in a DLQ envelope; Kafka's message limit is 1 MiB
_SWEEP_EVERY = 8192  # sends between delivery sweeps
_SWEEP_INTERVAL_S = 0.5


@dataclass
class ProducerStats:
    fetched: Counter[str] = field(default_factory=Counter)
    sent: int = 0  # handed to Kafka (first attempt)
    published: int = 0  # acknowledged on the transactions topic
    duplicates: int = 0
    dlq: int = 0  # handed to the DLQ
    dlq_published: int = 0  # acknowledged on the DLQ
    dlq_duplicates: int = 0  # the same rejected payload again (e.g. every poll): not re-sent
    requeued: int = 0
    rejected: int = 0  # refused by Kafka for good (RECORD_ERRORS): sent to the DLQ instead
    out_of_range: int = 0  # first_seen outside [2009-01-03, now + skew]: sent to the DLQ
    client_resets: int = 0  # Kafka client replaced after a delivery failure

    def as_dict(self) -> dict[str, Any]:
        return {
            "fetched": dict(self.fetched),
            "sent": self.sent,
            "published": self.published,
            "duplicates": self.duplicates,
            "dlq": self.dlq,
            "dlq_published": self.dlq_published,
            "dlq_duplicates": self.dlq_duplicates,
            "requeued": self.requeued,
            "rejected": self.rejected,
            "out_of_range": self.out_of_range,
            "client_resets": self.client_resets,
        }


def raw_text(raw: object) -> tuple[str | None, str]:
    """A rejected payload as text for the DLQ envelope, and how it is encoded."""
    if raw is None:
        return None, "utf-8"
    if isinstance(raw, bytes | bytearray):
        try:
            return bytes(raw).decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            return base64.b64encode(bytes(raw[: DLQ_RAW_MAX * 3 // 4])).decode("ascii"), "base64"
    if isinstance(raw, str):
        return raw, "utf-8"
    return orjson.dumps(raw, default=str).decode("utf-8"), "json"


def dlq_envelope(failure: Failure, *, now: dt.datetime | None = None) -> bytes:
    text, encoding = raw_text(failure.raw)
    truncated = text is not None and len(text) > DLQ_RAW_MAX
    envelope = {
        "reason": failure.reason,
        "source": failure.source,
        "time": (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "raw": text[:DLQ_RAW_MAX] if text is not None and truncated else text,
        "raw_encoding": encoding,
        "raw_truncated": truncated,
    }
    return orjson.dumps(envelope)


def _failure_digest(failure: Failure) -> str:
    text, _ = raw_text(failure.raw)
    data = f"{failure.source}\0{failure.reason}\0{text}".encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _record_source(value: bytes) -> str:
    """The ``source`` field of a canonical record (for the DLQ envelope of a record Kafka refused)."""
    try:
        source = orjson.loads(value).get("source")
    except (orjson.JSONDecodeError, AttributeError):
        return "unknown"
    return source if isinstance(source, str) else "unknown"


def _failure_key(failure: Failure) -> bytes | None:
    """The tx hash of a rejected JSON object (also inside a WebSocket ``{"op":"utx","x":{...}}``), if any."""
    raw = failure.raw
    if isinstance(raw, dict):
        inner = raw["x"] if isinstance(raw.get("x"), dict) else raw
        h = inner.get("hash")
        if isinstance(h, str) and 0 < len(h) <= 128:
            return h.encode()
    return None


class TxProducer:
    """Sends items from any source to Kafka; one instance per process."""

    def __init__(self, settings: Settings, *, client_id: str = "btc-anomaly-producer") -> None:
        self.settings = settings
        self.topic = settings.topic
        self.dlq_topic = settings.dlq_topic
        self.client_id = client_id
        self.dedup = Dedup(settings.dedup_capacity)
        # Polls return the same broken record again and again; one dead letter per distinct payload is enough.
        self._dlq_seen = Dedup(max(1, min(settings.dedup_capacity, 100_000)))
        self.stats = ProducerStats()
        self.num_partitions: int | None = None
        self._producer: KafkaProducer | None = None
        # (future, topic, key, value, partition): sends whose acknowledgement has not been seen yet
        self._pending: list[tuple[Any, str, bytes | None, bytes, int | None]] = []
        self._retry: deque[tuple[str, bytes | None, bytes, int | None]] = deque()
        self._last_sweep = time.monotonic()
        self._sweep_at = _SWEEP_EVERY  # pending size that triggers the next sweep
        self._exported: dict[str, int] = {}

    # --- lifecycle ---------------------------------------------------------------------------------

    def connect(self, stop: threading.Event | None = None) -> None:
        """Create the topics when missing and open the producer, waiting for the broker if it is down.

        Waiting is normal at start-up (the demo starts the broker and the producer together): it is logged
        at INFO, and kafka-python's own "Connection failed" errors are silenced until the broker answered
        once (monitoring/kafka_logging.py). Later failures are logged as the errors they are.
        """
        stop = stop or threading.Event()
        delay = 0.5
        started = time.monotonic()
        log.info("connecting to kafka at %s (waits until the broker answers)", self.settings.kafka_bootstrap)
        with waiting_for_kafka():
            while True:
                try:
                    self._ensure_topics()
                    break
                except KafkaError as exc:
                    if stop.is_set():
                        raise
                    log.info(
                        "waiting for kafka at %s (%s); retrying in %.1fs",
                        self.settings.kafka_bootstrap,
                        type(exc).__name__ if not str(exc) else exc,
                        delay,
                    )
                    if stop.wait(delay):
                        raise
                    delay = min(delay * 2, 10.0)
        log.info("kafka is up at %s (%.1f s)", self.settings.kafka_bootstrap, time.monotonic() - started)
        self._producer = self._new_client()
        partitions = self._producer.partitions_for(self.topic)
        self.num_partitions = len(partitions) if partitions else None

    def _new_client(self) -> KafkaProducer:
        s = self.settings
        return KafkaProducer(
            bootstrap_servers=s.kafka_bootstrap,
            client_id=self.client_id,
            acks="all",
            enable_idempotence=True,
            compression_type=None if s.producer_compression == "none" else s.producer_compression,
            linger_ms=s.producer_linger_ms,
            batch_size=s.producer_batch_size,
            delivery_timeout_ms=s.producer_delivery_timeout_ms,
            max_block_ms=s.producer_max_block_ms,
            # kafka-python expects delivery timeout >= linger + request timeout
            request_timeout_ms=max(1_000, min(30_000, s.producer_delivery_timeout_ms // 2)),
            max_in_flight_requests_per_connection=5,  # the most idempotence allows while keeping order
            reconnect_backoff_max_ms=2_000,  # after a broker restart, find it again within seconds
        )

    def _ensure_topics(self) -> None:
        admin = KafkaAdminClient(
            bootstrap_servers=self.settings.kafka_bootstrap,
            client_id=f"{self.client_id}-admin",
            request_timeout_ms=10_000,
        )
        try:
            existing = set(admin.list_topics())
            missing = [
                NewTopic(name, num_partitions=self.settings.topic_partitions, replication_factor=1)
                for name in (self.topic, self.dlq_topic)
                if name not in existing
            ]
            if missing:
                try:
                    admin.create_topics(missing)
                    log.info("created topics %s", [t.name for t in missing])
                except TopicAlreadyExistsError:
                    pass  # another producer won the race
        finally:
            admin.close()

    def close(self, timeout_s: float = 30.0) -> None:
        """Deliver everything queued (waiting up to ``timeout_s``), then close the client."""
        if self._producer is None:
            return
        try:
            self.flush(timeout_s)
        finally:
            undelivered = len(self._retry) + len(self._pending)
            if undelivered:
                log.error("closing with %d records not acknowledged by kafka", undelivered)
            if undelivered:
                _abandon(self._producer)
            else:
                try:
                    self._producer.close(timeout=5)
                except KafkaError as exc:  # its final flush timing out must not turn shutdown into a crash
                    log.warning("kafka client close: %s", exc)
                    _abandon(self._producer)
            self._producer = None
            self._export_metrics()

    def __enter__(self) -> TxProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- sending -----------------------------------------------------------------------------------

    def publish(
        self, items: Iterable[Item | None], *, limit: int | None = None, stop: threading.Event | None = None
    ) -> ProducerStats:
        """Send items until the source ends, ``limit`` transactions were sent, or ``stop`` is set.

        A ``None`` item is an idle tick from a live source (see :func:`iterate_async`): it lets delivery
        tracking, metrics and the stop check run while no transaction arrives.
        """
        if self._producer is None:
            self.connect(stop)
        with _relaxed_gc():
            return self._publish(items, limit, stop or threading.Event())

    def _publish(
        self, items: Iterable[Item | None], limit: int | None, stop: threading.Event
    ) -> ProducerStats:
        stats = self.stats
        fetched = stats.fetched
        seen = self.dedup.seen
        topic = self.topic
        send = self._send
        max_skew_s = self.settings.first_seen_max_skew_s
        sent_here = 0
        n = 0
        for item in items:
            n += 1
            if n & 255 == 0:
                if stop.is_set():
                    break
                self._maybe_sweep()
            if item is None:
                self._maybe_sweep()
                if stop.is_set():
                    break
                continue
            if type(item) is Encoded:
                tx_hash, unconfirmed, value, partition, source = (
                    item.hash,
                    item.unconfirmed,
                    item.value,
                    item.partition,
                    item.source,
                )
            elif isinstance(item, Transaction):
                tx_hash, unconfirmed, value, partition, source = (
                    item.hash,
                    item.block_height is None,
                    item.to_json_bytes(),
                    None,
                    item.source,
                )
                # Live sources are slow: keep delivery tracking and metrics current per item (time-gated).
                self._maybe_sweep()
                if (reason := first_seen_error(item.first_seen, max_skew_s=max_skew_s)) is not None:
                    fetched[source] += 1
                    stats.out_of_range += 1
                    self._send_dlq(Failure(raw=value, reason=reason, source=source), key=tx_hash.encode())
                    continue
            else:
                fetched[item.source] += 1
                self._send_dlq(item)
                continue
            fetched[source] += 1
            if seen((tx_hash, unconfirmed)):
                stats.duplicates += 1
                continue
            if self._retry:
                self._drain_retries(stop)
            send(topic, tx_hash.encode(), value, partition)
            stats.sent += 1
            sent_here += 1
            if limit is not None and sent_here >= limit:
                break
        self._maybe_sweep(force=True)
        return stats

    def _send(
        self, topic: str, key: bytes | None, value: bytes, partition: int | None, *, requeue: bool = True
    ) -> bool:
        """Hand one record to the client; False when it must be sent again (queued again unless the
        caller does that). A record Kafka can never take is dead-lettered: that counts as handled."""
        assert self._producer is not None
        try:
            future = self._producer.send(topic, value=value, key=key, partition=partition)
        except RECORD_ERRORS as exc:
            self._reject(topic, key, value, exc)
            return True
        except KafkaError as exc:  # no metadata or buffer space within max_block_ms: broker unreachable
            if requeue:
                self._requeue(topic, key, value, partition, exc)
            else:
                self._count_send_error(exc)
            return False
        self._pending.append((future, topic, key, value, partition))
        if len(self._pending) >= self._sweep_at:
            self._maybe_sweep(force=True)
        return True

    def _send_dlq(self, failure: Failure, *, key: bytes | None = None) -> None:
        if self._dlq_seen.seen((_failure_digest(failure), False)):
            self.stats.dlq_duplicates += 1
            return
        self.stats.dlq += 1
        metrics.PRODUCER_DLQ.labels(source=failure.source).inc()
        log.info("dead letter from %s: %s", failure.source, failure.reason)
        self._send(self.dlq_topic, key or _failure_key(failure), dlq_envelope(failure), None)

    def _reject(self, topic: str, key: bytes | None, value: bytes, exc: BaseException) -> None:
        """A record Kafka refused for good: to the DLQ with the error, never retried."""
        metrics.producer_error("kafka_rejected")
        if topic == self.dlq_topic:
            # A dead letter cannot go to the dead-letter topic: say so loudly, it is counted above.
            log.error("kafka refused a dead letter (%d bytes, key %r): %s; dropped", len(value), key, exc)
            return
        self.stats.rejected += 1
        reason = f"kafka refused the record ({len(value)} bytes): {type(exc).__name__}: {exc}"
        log.warning("%s; key %r sent to the DLQ", reason, key)
        self._send_dlq(Failure(raw=value, reason=reason, source=_record_source(value)), key=key)

    def _requeue(
        self, topic: str, key: bytes | None, value: bytes, partition: int | None, exc: BaseException | None
    ) -> None:
        self._retry.append((topic, key, value, partition))
        self._count_send_error(exc)

    def _count_send_error(self, exc: BaseException | None) -> None:
        self.stats.requeued += 1
        metrics.PRODUCER_REQUEUED.inc()
        metrics.producer_error("kafka_send")
        if self.stats.requeued == 1 or self.stats.requeued % 10_000 == 0:
            log.warning("kafka send failed (%s); %d records queued for resend", exc, len(self._retry) or 1)

    def _drain_retries(self, stop: threading.Event, deadline: float | None = None) -> None:
        """Re-send queued records, oldest first, before anything new; back off while the broker is away."""
        delay = 0.2
        while self._retry:
            if stop.is_set() or (deadline is not None and time.monotonic() > deadline):
                return
            record = self._retry.popleft()
            if self._send(*record, requeue=False):
                delay = 0.2
            else:  # still no broker: put it back in front, wait, go on
                self._retry.appendleft(record)
                stop.wait(delay)
                delay = min(delay * 2, 5.0)
                self._maybe_sweep(force=True)

    def _maybe_sweep(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_sweep < _SWEEP_INTERVAL_S:
            return
        self._last_sweep = now
        still: list[tuple[Any, str, bytes | None, bytes, int | None]] = []
        acked = dlq_acked = failed = 0
        rejected: list[tuple[Any, str, bytes | None, bytes, int | None]] = []
        for entry in self._pending:
            future = entry[0]
            if not future.is_done:
                still.append(entry)
            elif future.exception is None:
                if entry[1] == self.topic:
                    acked += 1
                else:
                    dlq_acked += 1
            elif isinstance(future.exception, RECORD_ERRORS):
                rejected.append(entry)
            else:
                failed += 1
                self._requeue(entry[1], entry[2], entry[3], entry[4], future.exception)
        self._pending = still
        metrics.PRODUCER_QUEUE_DEPTH.labels(queue="retry").set(len(self._retry))
        for done, topic, key, value, _ in rejected:  # after the swap: dead-lettering appends to _pending
            self._reject(topic, key, value, done.exception)
        # In-flight sends stay pending; sweeping again only after _SWEEP_EVERY more keeps sweeps O(n) overall.
        self._sweep_at = len(still) + _SWEEP_EVERY
        if acked:
            self.stats.published += acked
            metrics.PRODUCER_LAST_PUBLISH.set(time.time())
        self.stats.dlq_published += dlq_acked
        self._export_metrics()
        if failed:
            self._reset_client()

    def _reset_client(self) -> None:
        """Replace the Kafka client after a delivery failure and re-send all it had not acknowledged.

        kafka-python 3.0's idempotent producer does not recover from a batch that expired
        (delivery.timeout.ms) during an outage: the other in-flight batches then never complete, even
        after the broker is back (reproduced with a broker stop/start; the Java client resets its
        producer id here instead). A fresh client gets a fresh producer id. Records the old client
        delivered without us seeing the acknowledgement are sent twice: at-least-once, absorbed by the
        MERGE by hash downstream.
        """
        old, self._producer = self._producer, self._new_client()
        self.stats.client_resets += 1
        metrics.PRODUCER_CLIENT_RESETS.inc()
        if old is not None:
            _abandon(old)
        pending, self._pending = self._pending, []
        acked = 0
        for future, topic, key, value, partition in pending:
            if future.is_done and future.exception is None:
                acked += topic == self.topic
            elif future.is_done and isinstance(future.exception, RECORD_ERRORS):
                self._reject(topic, key, value, future.exception)
            else:
                self._retry.append((topic, key, value, partition))
        self.stats.published += acked
        self._sweep_at = _SWEEP_EVERY
        log.warning(
            "kafka delivery failed: new client, %d unacknowledged records queued again", len(self._retry)
        )

    def flush(self, timeout_s: float = 30.0, stop: threading.Event | None = None) -> bool:
        """Wait until every record handed over so far is acknowledged; False if ``timeout_s`` ran out."""
        assert self._producer is not None
        deadline = time.monotonic() + timeout_s
        stop = stop or threading.Event()
        while True:
            self._drain_retries(stop, deadline)
            remaining = deadline - time.monotonic()
            try:
                self._producer.flush(timeout=max(0.1, remaining))
            except KafkaError as exc:
                log.warning("flush: %s", exc)
            self._maybe_sweep(force=True)
            if not self._retry and not self._pending:
                return True
            if time.monotonic() >= deadline or stop.is_set():
                return False

    def _export_metrics(self) -> None:
        s = self.stats
        current = {"published": s.published, "duplicates": s.duplicates}
        prev = self._exported
        if (d := current["published"] - prev.get("published", 0)) > 0:
            metrics.PRODUCER_PUBLISHED.inc(d)
        if (d := current["duplicates"] - prev.get("duplicates", 0)) > 0:
            metrics.PRODUCER_DUPLICATES.inc(d)
        for source, count in s.fetched.items():
            key = f"fetched:{source}"
            if (d := count - prev.get(key, 0)) > 0:
                metrics.PRODUCER_FETCHED.labels(source=source).inc(d)
            current[key] = count
        self._exported = current


@contextlib.contextmanager
def _relaxed_gc() -> Iterator[None]:
    """Collect young garbage less often while publishing.

    Every send allocates a handful of container objects (futures, batches, tuples) that are freed by
    reference counting, yet each 700 allocations trigger a generation-0 collection and, as the dedup
    memory and in-flight list grow, full collections that walk everything. With a 100k threshold and
    the start-up objects frozen, replay throughput rose from ~25k to ~37k tx/s (bench/RESULTS.md).
    Cyclic garbage is still collected, only in larger steps.
    """
    old = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(100_000, old[1], old[2])
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()


def _abandon(client: KafkaProducer) -> None:
    """Close a client without delivering what it still holds.

    KafkaProducer.close() flushes first and, when that times out, raises before stopping its sender
    thread, so a client that cannot deliver would live on. Skipping the flush makes close() force-close.
    """
    client.flush = lambda timeout=None: None  # type: ignore[method-assign]
    try:
        client.close(timeout=0)
    except KafkaError as exc:
        log.debug("closing an abandoned kafka client: %s", exc)


# --- async sources in a thread ---------------------------------------------------------------------


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_END = object()


def iterate_async(
    make: Callable[[], AsyncIterator[T]],
    stop: threading.Event,
    *,
    maxsize: int,
    on_depth: Callable[[int], object] | None = None,
) -> Iterator[T | None]:
    """Run an async source in its own thread and event loop; yield its items here, ``None`` when idle.

    The producer's Kafka calls can block (broker away); keeping the event loop in another thread means
    WebSocket pings and reconnects go on meanwhile. The hand-over queue holds at most ``maxsize`` items:
    when it is full the source is not read (its next item waits), so an outage longer than the queue
    costs no memory; each source decides what waiting means for it (REST polls later, the WebSocket
    drops pushes with a count). ``on_depth`` is told the queue's length as it changes. Stops when
    ``stop`` is set or the consumer leaves.
    """
    q: queue.Queue[Any] = queue.Queue(maxsize=max(1, maxsize))
    leave = threading.Event()
    depth = on_depth or (lambda _: None)

    async def pump() -> None:
        agen = make()
        try:
            async for item in agen:
                while True:
                    try:
                        q.put_nowait(item)
                        break
                    except queue.Full:
                        depth(q.qsize())
                        await asyncio.sleep(0.05)  # polling keeps the loop free; cancelled on stop
        finally:
            await agen.aclose()  # type: ignore[attr-defined]

    async def main() -> None:
        task = asyncio.create_task(pump())
        while not task.done():
            if stop.is_set() or leave.is_set():
                task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        if not task.cancelled():
            task.result()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:
            _put_final(q, _Raised(exc), leave)
        finally:
            _put_final(q, _END, leave)

    thread = threading.Thread(target=run, name="btc-source", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = q.get(timeout=0.2)
            except queue.Empty:
                depth(0)
                yield None  # idle tick: the consumer can flush bookkeeping and check its stop flag
                continue
            depth(q.qsize())
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        leave.set()
        thread.join(timeout=10)


def _put_final(q: queue.Queue[Any], item: object, leave: threading.Event) -> None:
    """Hand over the source's end (or its error) even when the queue is full, unless nobody reads."""
    while not leave.is_set():
        try:
            q.put(item, timeout=0.2)
            return
        except queue.Full:
            continue


# --- wiring used by the CLI and the tests -----------------------------------------------------------


def build_source(
    settings: Settings,
    source: str,
    *,
    paths: list[str] | None = None,
    speed: float | None = None,
    loop: bool | None = None,
    prevouts: list[Path] | None = None,
    num_partitions: int | None = None,
    stop: threading.Event,
) -> Iterable[Item | None]:
    """The items of one ``produce --source`` choice (``None`` = idle tick of a live source)."""
    paths = paths or []
    source_depth = metrics.PRODUCER_QUEUE_DEPTH.labels(queue="source").set
    if source == "replay":
        from btc_anomaly.ingestion.replay_source import ReplaySource

        return ReplaySource(
            [Path(p) for p in paths] or [settings.replay_path],
            speed=settings.replay_speed if speed is None else speed,
            loop=settings.replay_loop if loop is None else loop,
            num_partitions=num_partitions,
            stop=stop,
        )
    if source == "blocks":
        from btc_anomaly.ingestion.replay_source import BlockFileSource

        if not paths:
            raise ValueError("--source blocks needs one or more block files")
        return BlockFileSource([Path(p) for p in paths], prevout_paths=prevouts or [], stop=stop)
    if source == "rest":
        from btc_anomaly.ingestion.rest_source import BlockchainClient, RestSource, fetch_tx_items

        if paths:
            return iterate_async(
                lambda: fetch_tx_items(settings, paths),
                stop,
                maxsize=settings.producer_source_queue_max,
                on_depth=source_depth,
            )

        async def rest() -> AsyncIterator[Item]:
            async with BlockchainClient(settings) as client:
                async for item in RestSource(settings, client):
                    yield item

        return iterate_async(rest, stop, maxsize=settings.producer_source_queue_max, on_depth=source_depth)
    if source == "ws":
        from btc_anomaly.ingestion.rest_source import BlockchainClient
        from btc_anomaly.ingestion.ws_source import WsSource

        if paths:
            raise ValueError("--source ws takes no paths")

        async def ws() -> AsyncIterator[Item]:
            async with BlockchainClient(settings) as client:
                async for item in WsSource(settings, client):
                    yield item

        return iterate_async(ws, stop, maxsize=settings.producer_source_queue_max, on_depth=source_depth)
    raise ValueError(f"unknown source {source!r}: expected rest, ws, replay or blocks")


def run_producer(
    settings: Settings,
    source: str,
    *,
    paths: list[str] | None = None,
    speed: float | None = None,
    loop: bool | None = None,
    limit: int | None = None,
    prevouts: list[Path] | None = None,
    stop: threading.Event | None = None,
    producer: TxProducer | None = None,
) -> ProducerStats:
    """Connect, publish one source until it ends (or limit/stop), flush, close."""
    stop = stop or threading.Event()
    own = producer is None
    producer = producer or TxProducer(settings)
    if producer.num_partitions is None:
        producer.connect(stop)
    items = build_source(
        settings,
        source,
        paths=paths,
        speed=speed,
        loop=loop,
        prevouts=prevouts,
        num_partitions=producer.num_partitions,
        stop=stop,
    )
    try:
        producer.publish(items, limit=limit, stop=stop)
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()  # ends iterate_async's thread when we stop early
        if own:
            producer.close()
        else:
            producer.flush()
    return producer.stats
