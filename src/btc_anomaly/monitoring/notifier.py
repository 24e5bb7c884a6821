"""Anomaly notifications to a Slack-compatible incoming webhook (Slack, Mattermost, Rocket.Chat, ...).

The scoring path (stream, API) calls::

    from btc_anomaly.monitoring.notifier import notify_anomaly
    notify_anomaly(tx_hash, score, model_kind="full", model_version="7", reasons=["..."])

or ``notify_anomalies(rows)`` with the scored rows (mappings with ``hash``, ``anomaly_score``, ...).

Guarantees for the caller:

* off when ``BTC_ANOMALY_NOTIFY_WEBHOOK_URL`` is unset: the call returns False, no thread, no socket;
* never blocks and never raises: the call only puts a small record on a bounded queue (a full queue
  drops it, counted in ``btc_notifier_dropped_total{reason="queue_full"}``); formatting and HTTP happen
  on one daemon thread per process;
* never floods the channel: a token bucket allows ``notify_burst`` messages back to back and
  ``notify_rate_per_min`` after that. Anomalies arriving while no token is left are folded into ONE
  summary message (count, time span, top scores), sent when the next token is available. A 429 from
  the receiver pauses sending for its Retry-After;
* failures are counted (``btc_notifier_failures_total{reason}``), logged at most once a minute, and
  never retried (a retry storm against a failing receiver helps nobody; the summary of the next burst
  still goes out).

Each process has its own queue and bucket: an API with N uvicorn workers may send N times the rate.
The webhook URL embeds a secret token and is never logged.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from btc_anomaly.monitoring import metrics as m

log = logging.getLogger(__name__)

SUMMARY_TOP = 5
_LOG_EVERY_S = 60.0
_STOP = object()


@dataclass(frozen=True)
class Anomaly:
    tx_hash: str
    score: float
    model_kind: str | None = None
    model_version: str | None = None
    reasons: tuple[str, ...] = ()
    source: str | None = None
    value_sat: int | None = None
    fee_sat: int | None = None
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class _Text:
    text: str
    kind: str = "alert"


class TokenBucket:
    """``burst`` tokens, refilled at ``rate_per_s``; ``pause`` empties it until a given time."""

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = max(rate_per_s, 1e-9)
        self.capacity = float(max(burst, 1))
        self.tokens = self.capacity
        self.clock = clock
        self.updated = clock()
        self.paused_until = 0.0

    def _refill(self) -> None:
        now = self.clock()
        if now < self.paused_until:
            self.updated = now
            return
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def take(self) -> bool:
        self._refill()
        if self.clock() >= self.paused_until and self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait_s(self) -> float:
        """Seconds until ``take`` can succeed."""
        self._refill()
        now = self.clock()
        if now < self.paused_until:
            return self.paused_until - now + max(0.0, 1.0 - self.tokens) / self.rate
        return max(0.0, 1.0 - self.tokens) / self.rate

    def pause(self, seconds: float) -> None:
        self.tokens = 0.0
        self.paused_until = self.clock() + seconds
        self.updated = self.clock()


class _Summary:
    """Anomalies held back by the rate limit: a count, a time span and the top scores."""

    def __init__(self, top: int = SUMMARY_TOP) -> None:
        self.top = top
        self.clear()

    def clear(self) -> None:
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None
        self.kinds: dict[str, int] = {}
        self._heap: list[tuple[float, int, Anomaly]] = []
        self._seq = 0

    def add(self, a: Anomaly) -> None:
        self.count += 1
        self.first = a.at if self.first is None else min(self.first, a.at)
        self.last = a.at if self.last is None else max(self.last, a.at)
        kind = a.model_kind or "unknown"
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        self._seq += 1
        entry = (a.score, self._seq, a)
        if len(self._heap) < self.top:
            heapq.heappush(self._heap, entry)
        elif entry[0] > self._heap[0][0]:
            heapq.heapreplace(self._heap, entry)

    def best(self) -> list[Anomaly]:
        return [a for _, _, a in sorted(self._heap, key=lambda e: (-e[0], e[1]))]


class Notifier:
    def __init__(
        self,
        url: str | None,
        *,
        rate_per_min: float = 6.0,
        burst: int = 3,
        queue_size: int = 1000,
        timeout_s: float = 5.0,
        explorer_url: str = "https://mempool.space/tx/{hash}",
        title: str = "btc-anomaly",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url or None
        self.rate_per_min = rate_per_min
        self.timeout_s = timeout_s
        self.explorer_url = explorer_url
        self.title = title
        self.bucket = TokenBucket(rate_per_min / 60.0, burst, clock)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(queue_size, 1))
        self._summary = _Summary()
        self._texts: deque[_Text] = deque(maxlen=100)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._inflight = 0  # queued or being handled; flush() waits for 0
        self._inflight_lock = threading.Lock()
        self._pid = os.getpid()
        self._last_log = 0.0
        self._closed = False

    @property
    def enabled(self) -> bool:
        return self.url is not None and not self._closed

    # --- the caller's side: cheap, non-blocking, never raises -------------------------------------------
    def notify_anomaly(
        self,
        tx_hash: str,
        score: float,
        *,
        model_kind: str | None = None,
        model_version: str | int | None = None,
        reasons: Sequence[Any] = (),
        source: str | None = None,
        value_sat: int | None = None,
        fee_sat: int | None = None,
    ) -> bool:
        """Queue one anomaly; True if queued, False if notifications are off or the queue is full."""
        if not self.enabled:
            return False
        try:
            item = Anomaly(
                tx_hash=str(tx_hash),
                score=float(score),
                model_kind=None if model_kind is None else str(model_kind),
                model_version=None if model_version is None else str(model_version),
                reasons=tuple(_reason_text(r) for r in (reasons or ())),
                source=source,
                value_sat=None if value_sat is None else int(value_sat),
                fee_sat=None if fee_sat is None else int(fee_sat),
            )
        except Exception:  # a malformed field must not hurt the scoring path
            log.debug("notify_anomaly: unusable arguments", exc_info=True)
            return False
        return self._put(item)

    def notify_text(self, text: str, kind: str = "alert") -> bool:
        """Queue a free-text message (Alertmanager relay); rate limited like anomalies, never summarised."""
        if not self.enabled:
            return False
        return self._put(_Text(text, kind))

    def _put(self, item: Any) -> bool:
        self._ensure_thread()
        with self._inflight_lock:
            self._inflight += 1
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._done()
            m.NOTIFIER_DROPPED.labels(reason="queue_full").inc()
            return False
        m.NOTIFIER_QUEUE.inc()
        return True

    def _ensure_thread(self) -> None:
        # After a fork (uvicorn workers, Spark python workers) the parent's thread does not exist here.
        if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
            return
        with self._start_lock:
            if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="anomaly-notifier", daemon=True)
            self._thread.start()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything queued was sent or summarised and sent; True if that happened in time."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self._inflight and not self._summary.count and not self._texts:
                return True
            time.sleep(0.02)
        return False

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop the sender; what is still held back is dropped (counted as ``shutdown``)."""
        self._closed = True
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        try:
            self._queue.put(_STOP, timeout=timeout_s)
        except queue.Full:
            return
        thread.join(timeout_s)

    # --- the sender thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            pending = bool(self._summary.count or self._texts)
            wait = min(max(self.bucket.wait_s(), 0.01), 1.0) if pending else 1.0
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                item = None
            if item is _STOP:
                held = self._summary.count + len(self._texts)
                if held:
                    m.NOTIFIER_DROPPED.labels(reason="shutdown").inc(held)
                return
            try:
                if item is not None:
                    m.NOTIFIER_QUEUE.dec()
                    self._accept(item)
                self._drain()
            except Exception:  # the thread must survive anything a message can do to it
                log.exception("anomaly notifier: unexpected error")
            finally:
                if item is not None:
                    self._done()

    def _done(self) -> None:
        with self._inflight_lock:
            self._inflight -= 1

    def _accept(self, item: Any) -> None:
        if isinstance(item, _Text):
            self._texts.append(item)
        elif not self._summary.count and not self._texts and self.bucket.take():
            self._send(self._anomaly_payload(item), "anomaly")
        else:
            # Keeps the channel's order: once something is held back, later anomalies join the summary.
            self._summary.add(item)
            m.NOTIFIER_SUMMARISED.inc()

    def _drain(self) -> None:
        while self._texts and self.bucket.take():
            t = self._texts.popleft()
            self._send({"text": t.text}, t.kind)
        if self._summary.count and not self._texts and self.bucket.take():
            payload = self._summary_payload()
            self._summary.clear()
            self._send(payload, "summary")

    # --- formatting (Slack mrkdwn; `text` alone is a complete message for receivers without blocks) ---
    def _link(self, tx_hash: str) -> str:
        short = f"{tx_hash[:16]}…" if len(tx_hash) > 16 else tx_hash
        if not self.explorer_url:
            return f"`{short}`"
        return f"<{self.explorer_url.replace('{hash}', tx_hash)}|{short}>"

    def _describe(self, a: Anomaly) -> str:
        parts = [f"{self._link(a.tx_hash)} score *{a.score:.3f}*"]
        model = ", ".join(x for x in (a.model_kind, f"v{a.model_version}" if a.model_version else None) if x)
        if model:
            parts.append(f"({model})")
        if a.value_sat is not None:
            parts.append(f"value {a.value_sat / 1e8:,.8f} BTC")
        if a.fee_sat is not None:
            parts.append(f"fee {a.fee_sat:,} sat")
        return " ".join(parts)

    def _anomaly_payload(self, a: Anomaly) -> dict[str, Any]:
        head = f":rotating_light: *{self.title}*: anomalous transaction" + (
            f" ({a.source})" if a.source else ""
        )
        body = self._describe(a)
        if a.reasons:
            body += "\n" + "\n".join(f"• {r}" for r in a.reasons[:3])
        text = f"{head}\n{body}"
        return {
            "text": text,
            "blocks": [
                {"type": "section", "text": {"type": "mrkdwn", "text": head}},
                {"type": "section", "text": {"type": "mrkdwn", "text": body}},
            ],
        }

    def _summary_payload(self) -> dict[str, Any]:
        s = self._summary
        span = (s.last or 0.0) - (s.first or 0.0)
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(s.kinds.items()))
        head = (
            f":warning: *{self.title}*: {s.count} more anomalies in {span:.0f} s ({kinds}), held back by "
            f"the rate limit ({self.rate_per_min:g} messages/min)"
        )
        top = "\n".join(f"• {self._describe(a)}" for a in s.best())
        text = f"{head}\nTop {len(s.best())} by score:\n{top}"
        return {
            "text": text,
            "blocks": [
                {"type": "section", "text": {"type": "mrkdwn", "text": head}},
                {"type": "section", "text": {"type": "mrkdwn", "text": f"Top by score:\n{top}"}},
            ],
        }

    # --- HTTP ----------------------------------------------------------------------------------------
    def _send(self, payload: Mapping[str, Any], kind: str) -> bool:
        assert self.url is not None
        data = json.dumps(payload).encode()
        req = urllib.request.Request(
            self.url, data=data, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 429:
                self.bucket.pause(_retry_after(exc.headers.get("Retry-After")))
                return self._failed("http_429", f"HTTP 429 (paused {self.bucket.wait_s():.0f} s)")
            return self._failed("http_5xx" if exc.code >= 500 else "http_4xx", f"HTTP {exc.code}")
        except TimeoutError:
            return self._failed("timeout", f"no answer in {self.timeout_s} s")
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, TimeoutError):
                return self._failed("timeout", f"no answer in {self.timeout_s} s")
            return self._failed("connect", str(reason))
        except (OSError, ValueError) as exc:
            return self._failed("error", type(exc).__name__)
        m.NOTIFIER_MESSAGES.labels(kind=kind).inc()
        return True

    def _failed(self, reason: str, detail: str) -> bool:
        m.NOTIFIER_FAILURES.labels(reason=reason).inc()
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            log.warning(
                "anomaly webhook post failed: %s (further failures counted, logged once a minute)", detail
            )
        return False


def _retry_after(value: str | None) -> float:
    try:
        return min(max(float(value or 1.0), 1.0), 3600.0)
    except ValueError:
        return 30.0


def _reason_text(reason: Any) -> str:
    if isinstance(reason, Mapping):
        return str(reason.get("text") or reason.get("label") or reason.get("feature") or reason)
    return str(reason)


# --- the process-wide notifier ------------------------------------------------------------------------

_default: Notifier | None = None
_default_lock = threading.Lock()


def from_settings(settings: Any) -> Notifier:
    url = settings.notify_webhook_url
    return Notifier(
        url.get_secret_value() if url is not None else None,
        rate_per_min=settings.notify_rate_per_min,
        burst=settings.notify_burst,
        queue_size=settings.notify_queue_size,
        timeout_s=settings.notify_timeout_s,
        explorer_url=settings.dashboard_explorer_url,
    )


def get_notifier() -> Notifier:
    """The process's notifier, built from ``get_settings()`` on first use."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                from btc_anomaly.config import get_settings

                _default = from_settings(get_settings())
    return _default


def set_notifier(notifier: Notifier | None) -> None:
    """Replace the process's notifier (tests, or a service that builds one from its own Settings)."""
    global _default
    with _default_lock:
        old, _default = _default, notifier
    if old is not None and old is not notifier:
        old.close(0.5)


def notify_anomaly(tx_hash: str, score: float, **fields: Any) -> bool:
    """Queue one anomaly on the process's notifier (see ``Notifier.notify_anomaly``). Never raises."""
    try:
        return get_notifier().notify_anomaly(tx_hash, score, **fields)
    except Exception:
        log.debug("notify_anomaly failed", exc_info=True)
        return False


def notify_anomalies(rows: Iterable[Mapping[str, Any]], *, source: str | None = None) -> int:
    """Queue scored rows (``hash``, ``anomaly_score`` and optionally ``model_kind``, ``model_version``,
    ``reasons``, ``output_value``/``value``, ``fee``); returns how many were queued. Never raises."""
    try:
        notifier = get_notifier()
        if not notifier.enabled:
            return 0
        queued = 0
        for row in rows:
            queued += notifier.notify_anomaly(
                row["hash"],
                row["anomaly_score"],
                model_kind=row.get("model_kind"),
                model_version=row.get("model_version"),
                reasons=_sequence(row.get("reasons")),
                source=source or row.get("source"),
                value_sat=_int_or_none(row.get("output_value", row.get("value"))),
                fee_sat=_int_or_none(row.get("fee")),
            )
        return queued
    except Exception:
        log.debug("notify_anomalies failed", exc_info=True)
        return 0


def _sequence(value: Any) -> Sequence[Any]:
    # Scored frames hold reasons as lists or NumPy arrays (whose truth value raises).
    return () if value is None else list(value)


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None or value != value else int(value)  # value != value: NaN
    except (TypeError, ValueError):
        return None
