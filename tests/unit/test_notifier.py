"""The Slack-compatible anomaly notifier against a real local HTTP receiver."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY

from btc_anomaly.config import Settings
from btc_anomaly.monitoring import notifier as nt
from btc_anomaly.monitoring.alert_relay import format_alerts, make_server
from btc_anomaly.monitoring.notifier import Notifier, TokenBucket


@dataclass
class Receiver:
    url: str
    posts: list[dict[str, Any]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    status: int = 200
    delay_s: float = 0.0
    retry_after: str | None = None
    # Closed: every request is held (up to 10 s) before it is recorded and answered, so a caller that
    # waited for HTTP would find its post recorded when it returns.
    gate: threading.Event = field(default_factory=lambda: _opened(threading.Event()))

    def texts(self) -> list[str]:
        return [p["text"] for p in self.posts]


def _opened(event: threading.Event) -> threading.Event:
    event.set()
    return event


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.gate.wait(10)
            if state.delay_s:
                time.sleep(state.delay_s)
            state.posts.append(json.loads(body))
            state.times.append(time.monotonic())
            state.headers.append(dict(self.headers))
            self.send_response(state.status)
            if state.retry_after:
                self.send_header("Retry-After", state.retry_after)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/services/T000/B000/XXXX"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.gate.set()
        server.shutdown()
        server.server_close()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def make(url: str | None, **kw: Any) -> Notifier:
    kw.setdefault("rate_per_min", 60.0)
    kw.setdefault("burst", 3)
    return Notifier(url, explorer_url="https://mempool.space/tx/{hash}", **kw)


HASH = "15e10745f15593a899cef391191bdd3d7c12412cc4696b7bcb669d0feadc8521"


def test_one_anomaly_is_one_slack_message(receiver: Receiver) -> None:
    n = make(receiver.url)
    before = sample("btc_notifier_messages_total", kind="anomaly")
    assert n.notify_anomaly(
        HASH,
        0.8123,
        model_kind="full",
        model_version=7,
        reasons=["fee rate 950 sat/vB: above 99.9 % of the window", {"text": "42 outputs"}],
        source="stream",
        value_sat=250_000_000,
        fee_sat=12_345,
    )
    assert n.flush(5)
    n.close()
    assert len(receiver.posts) == 1
    payload = receiver.posts[0]
    assert receiver.headers[0]["Content-Type"] == "application/json"
    # Slack incoming-webhook format: a complete `text` (also the notification fallback) plus mrkdwn blocks.
    assert set(payload) == {"text", "blocks"}
    assert all(b["type"] == "section" and b["text"]["type"] == "mrkdwn" for b in payload["blocks"])
    text = payload["text"]
    assert f"<https://mempool.space/tx/{HASH}|{HASH[:16]}…>" in text
    assert "score *0.812*" in text and "(full, v7)" in text and "(stream)" in text
    assert "value 2.50000000 BTC" in text and "fee 12,345 sat" in text
    assert "• fee rate 950 sat/vB" in text and "• 42 outputs" in text
    assert sample("btc_notifier_messages_total", kind="anomaly") == before + 1


def test_a_burst_becomes_three_messages_and_one_summary(receiver: Receiver) -> None:
    n = make(receiver.url, rate_per_min=60.0, burst=3)
    summarised = sample("btc_notifier_summarised_total")
    receiver.gate.clear()
    for i in range(50):
        assert n.notify_anomaly(f"{i:064x}", 0.5 + i / 1000, model_kind="full" if i % 2 else "structural")
    # Every call returned while the receiver still held the first request: none waited for HTTP.
    assert receiver.posts == [], "notify_anomaly must not wait for HTTP"
    receiver.gate.set()
    assert n.flush(10)
    n.close()
    assert len(receiver.posts) == 4, receiver.texts()
    singles, summary = receiver.texts()[:3], receiver.texts()[3]
    assert all("anomalous transaction" in t for t in singles)
    assert "47 more anomalies" in summary and "24 full, 23 structural" in summary
    assert "(60 messages/min)" in summary
    # The top 5 of the held-back anomalies, best first.
    top = [line for line in summary.splitlines() if line.startswith("• ")]
    assert len(top) == 5
    assert all(f"score *{0.5 + i / 1000:.3f}*" in top[k] for k, i in enumerate(range(49, 44, -1)))
    assert sample("btc_notifier_summarised_total") == summarised + 47
    # The summary waited for a token: one second after the burst at 60/min.
    assert receiver.times[3] - receiver.times[2] >= 0.8


def test_the_rate_limit_holds_under_a_steady_stream(receiver: Receiver) -> None:
    n = make(receiver.url, rate_per_min=120.0, burst=1)  # one message every 0.5 s
    for i in range(20):
        n.notify_anomaly(f"{i:064x}", 0.7)
        time.sleep(0.1)
    assert n.flush(10)
    n.close()
    gaps = np.diff(receiver.times)
    assert len(receiver.posts) <= 6, receiver.texts()
    assert (gaps >= 0.4).all(), gaps
    # Nothing lost: every anomaly is in a message of its own or counted in a summary.
    singles = sum("anomalous transaction" in t for t in receiver.texts())
    held = sum(
        int(t.split(" more anomalies")[0].rsplit(" ", 1)[1])
        for t in receiver.texts()
        if "more anomalies" in t
    )
    assert singles + held == 20


def test_no_url_means_no_thread_and_no_call(receiver: Receiver) -> None:
    n = make(None)
    assert not n.enabled
    assert n.notify_anomaly(HASH, 0.9) is False
    assert n.notify_text("hello") is False
    assert n._thread is None
    nt.set_notifier(nt.from_settings(Settings.model_construct(notify_webhook_url=None)))
    try:
        assert nt.notify_anomaly(HASH, 0.9) is False
        assert nt.notify_anomalies([{"hash": HASH, "anomaly_score": 0.9}]) == 0
    finally:
        nt.set_notifier(None)
    time.sleep(0.2)
    assert receiver.posts == []


def test_module_level_api_uses_the_settings(receiver: Receiver) -> None:
    settings = Settings.model_construct(
        notify_webhook_url=__import__("pydantic").SecretStr(receiver.url),
        notify_rate_per_min=600.0,
        notify_burst=10,
        notify_queue_size=100,
        notify_timeout_s=2.0,
        dashboard_explorer_url="https://example.org/tx/{hash}",
    )
    nt.set_notifier(nt.from_settings(settings))
    try:
        rows = [
            {
                "hash": HASH,
                "anomaly_score": np.float64(0.77),
                "model_kind": "structural",
                "model_version": "3",
                "reasons": np.array(["many outputs", "tiny fee"], dtype=object),
                "output_value": np.int64(1000),
                "fee": float("nan"),
            }
        ]
        assert nt.notify_anomalies(rows, source="api") == 1
        assert nt.notify_anomaly("ab" * 32, 0.66)
        assert nt.get_notifier().flush(5)
    finally:
        nt.set_notifier(None)
    texts = receiver.texts()
    assert len(texts) == 2
    assert "https://example.org/tx/" + HASH in texts[0]
    assert "• many outputs" in texts[0] and "fee" not in texts[0].split("\n")[1]


def test_failures_are_counted_and_never_reach_the_caller(receiver: Receiver) -> None:
    receiver.status = 500
    n = make(receiver.url, burst=5)
    before = sample("btc_notifier_failures_total", reason="http_5xx")
    assert n.notify_anomaly(HASH, 0.9)
    assert n.flush(5)
    assert sample("btc_notifier_failures_total", reason="http_5xx") == before + 1

    receiver.status = 404
    before = sample("btc_notifier_failures_total", reason="http_4xx")
    n.notify_anomaly(HASH, 0.9)
    assert n.flush(5)
    assert sample("btc_notifier_failures_total", reason="http_4xx") == before + 1
    n.close()

    # Nothing listens on this port.
    dead = make("http://127.0.0.1:9/hook")
    before = sample("btc_notifier_failures_total", reason="connect")
    dead.notify_anomaly(HASH, 0.9)
    assert dead.flush(5)
    dead.close()
    assert sample("btc_notifier_failures_total", reason="connect") == before + 1


def test_a_slow_receiver_times_out_and_never_blocks_the_caller(receiver: Receiver) -> None:
    receiver.gate.clear()  # answers nothing until the end of the test
    n = make(receiver.url, timeout_s=0.3, burst=5)
    before = sample("btc_notifier_failures_total", reason="timeout")
    for i in range(5):
        n.notify_anomaly(f"{i:064x}", 0.9)
    assert receiver.posts == []  # every call returned with the receiver still silent
    assert n.flush(10)
    n.close()
    assert sample("btc_notifier_failures_total", reason="timeout") >= before + 1


def test_429_pauses_sending_for_retry_after(receiver: Receiver) -> None:
    receiver.status = 429
    receiver.retry_after = "1"
    n = make(receiver.url, rate_per_min=600.0, burst=5)
    before = sample("btc_notifier_failures_total", reason="http_429")
    n.notify_anomaly("aa" * 32, 0.9)
    time.sleep(0.3)
    receiver.status, receiver.retry_after = 200, None
    for i in range(3):
        n.notify_anomaly(f"{i:064x}", 0.8)
    assert n.flush(10)
    n.close()
    assert sample("btc_notifier_failures_total", reason="http_429") == before + 1
    # After the 429 nothing was posted for a second; the three waiting anomalies went out as one summary.
    assert receiver.times[1] - receiver.times[0] >= 0.9
    assert len(receiver.posts) == 2 and "3 more anomalies" in receiver.texts()[1]


def test_a_full_queue_drops_and_counts(receiver: Receiver) -> None:
    receiver.delay_s = 0.5
    n = make(receiver.url, queue_size=2, burst=1)
    before = sample("btc_notifier_dropped_total", reason="queue_full")
    results = [n.notify_anomaly(f"{i:064x}", 0.9) for i in range(20)]
    assert not all(results)
    assert sample("btc_notifier_dropped_total", reason="queue_full") == before + results.count(False)
    n.close(timeout_s=0.1)


def test_token_bucket() -> None:
    now = [0.0]
    bucket = TokenBucket(rate_per_s=0.5, burst=2, clock=lambda: now[0])
    assert bucket.take() and bucket.take() and not bucket.take()
    assert bucket.wait_s() == pytest.approx(2.0)
    now[0] = 2.0
    assert bucket.take() and not bucket.take()
    now[0] = 100.0
    assert bucket.take() and bucket.take() and not bucket.take()  # never more than the burst
    bucket.pause(10.0)
    now[0] = 105.0
    assert not bucket.take()
    now[0] = 112.0
    assert bucket.take()


ALERTMANAGER_BODY = {
    "version": "4",
    "status": "firing",
    "receiver": "btc-anomaly-relay",
    "groupLabels": {"alertname": "BtcProducerStalled"},
    "commonLabels": {"alertname": "BtcProducerStalled", "severity": "critical", "service": "producer"},
    "commonAnnotations": {},
    "externalURL": "http://alertmanager:9093",
    "alerts": [
        {
            "status": "firing",
            "labels": {"alertname": "BtcProducerStalled", "severity": "critical", "service": "producer"},
            "annotations": {
                "summary": "No transaction published to Kafka for 7m 0s",
                "description": "The producer has had no Kafka acknowledgement for more than 5 minutes.",
            },
            "startsAt": "2026-11-21T10:00:00Z",
        }
    ],
}


def test_alert_relay_forwards_alertmanager_webhooks(receiver: Receiver) -> None:
    n = make(receiver.url)
    server = make_server(n, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/alertmanager"
        req = urllib.request.Request(
            url, data=json.dumps(ALERTMANAGER_BODY).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200
        bad = urllib.request.Request(url, data=b"[1, 2", headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(bad, timeout=5)
        assert err.value.code == 400
        assert n.flush(5)
    finally:
        server.shutdown()
        server.server_close()
        n.close()
    assert receiver.posts == [{"text": format_alerts(ALERTMANAGER_BODY)}]
    text = receiver.texts()[0]
    assert text.startswith(":fire: *[FIRING:1] BtcProducerStalled*")
    assert "• No transaction published to Kafka for 7m 0s" in text
    resolved = format_alerts({**ALERTMANAGER_BODY, "status": "resolved"})
    assert resolved.startswith(":white_check_mark: *[RESOLVED:1]")
