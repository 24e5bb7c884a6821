"""How `btc-anomaly stream` stops on a signal: honcho's SIGTERM and a terminal's Ctrl-C (SIGINT)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from btc_anomaly.config import Settings
from btc_anomaly.processing import delta_reader
from btc_anomaly.processing.stream import STATS_QUERY, TX_QUERY, StreamRunner
from helpers.stream import (
    create_topic,
    kill_stream,
    looped_records,
    publish,
    start_stream,
    stream_process_settings,
    wait_for,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def fault_settings(kafka_settings: Settings, tmp_path: Path) -> Settings:
    return stream_process_settings(kafka_settings, tmp_path / "lake")


def _version(settings: Settings) -> int:
    return delta_reader.table_version(settings.lake_table("transactions")) or 0


def test_ctrl_c_then_sigterm_stops_the_stream_cleanly(fault_settings: Settings, tmp_path: Path) -> None:
    """What Ctrl-C on `make demo` does to the stream, and what a terminal's Ctrl-C does to it alone: SIGINT
    to its whole process group, then (honcho's follow-up, 0.5 s later) SIGTERM to the group. PySpark's own
    SIGINT handler (cancel every job, raise KeyboardInterrupt) must not replace the stream's: the stream
    stops its queries itself, exits 0 and prints no Java or Python stack trace; the second signal changes
    nothing. SIGTERM alone is the same path (the handler is one function for both)."""
    s = fault_settings
    create_topic(s.kafka_bootstrap, s.topic)
    publish(s.kafka_bootstrap, s.topic, [(h.encode(), v) for h, v, _ in looped_records(10_000)])
    log = tmp_path / "stream.log"
    proc = start_stream(s, log, stream_max_offsets_per_trigger=1_000, stream_scoring=False)
    try:
        # Signalled while it still works through the topic: a micro-batch is likely running.
        wait_for(lambda: _version(s) > 0 or proc.poll() is not None, 600, what="a commit")
        assert proc.poll() is None, f"stream exited with {proc.returncode}:\n{log.read_text()}"
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)  # honcho's SIGTERM: must not cut the shutdown short
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            kill_stream(proc)
    text = log.read_text()
    traces = [line for line in text.splitlines() if "Traceback" in line or "Exception" in line]
    assert code == 0, f"exit code {code}:\n{text[-5000:]}"
    assert not traces, "stack traces in the stream's output:\n" + "\n".join(traces[:20])
    assert "signal 2: stopping the queries" in text
    # The second signal is logged when it comes during the stop, ignored when the stop was quicker.
    assert "signal 15: already stopping" in text or "queries stopped" in text


def test_a_stop_during_start_up_starts_no_query(spark: object, fault_settings: Settings) -> None:
    """Ctrl-C while the stream still starts (its JVM, its tables: a minute on a busy machine): it starts
    no query, so it needs nothing of Kafka, which stops at the same time, and exits (it did start them,
    and hung on the gone broker until SIGKILLed). The session's Spark, no stream process of its own."""
    stop = threading.Event()
    stop.set()
    runner = StreamRunner(fault_settings, spark, stop_event=stop)  # type: ignore[arg-type]
    runner.run_forever()
    started = [q for q in (TX_QUERY, STATS_QUERY) if Path(runner.lake.checkpoint(q)).exists()]
    assert not started, f"queries started after the stop: {started}"
