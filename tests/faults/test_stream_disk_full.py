"""The lake's disk fills up under a running stream, then space comes back.

The lake (tables and checkpoints) lives on a 2 MB tmpfs that the replay overflows. The transactions query
fails on the full disk; the runner says so at ERROR, counts it (btc_stream_query_failures_total, alert
BtcStreamQueryFailing) and restarts it from its checkpoint with backoff instead of dying. Once the
filesystem is grown, it resumes: every published transaction stored exactly once.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from btc_anomaly.config import Settings
from btc_anomaly.processing import delta_reader
from btc_anomaly.processing.stream import StreamRunner
from helpers.stream import create_topic, looped_records, publish, run_forever_in_thread, wait_for

pytestmark = pytest.mark.integration

RECORDS = 20_000  # about 5 MB of Delta files


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {exc}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _failures() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("btc_stream_query_failures_total", {"query": "transactions"}) or 0.0


def test_disk_full_then_space_back_resumes_exactly_once(
    spark: Any, kafka_settings: Settings, small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from btc_anomaly.processing.metrics_listener import install_listener

    s = kafka_settings.model_copy(
        update={
            "lake_root": small_disk / "lake",
            "stream_trigger_s": 0.5,
            "stream_max_offsets_per_trigger": 4_000,
            "stream_stats_trigger_s": 5.0,
            "stream_scoring": False,
            "stream_metrics_port": 0,
            "stream_watermark": "3650 days",
        }
    )
    records = [(h.encode(), v) for h, v, _ in looped_records(RECORDS)]
    create_topic(s.kafka_bootstrap, s.topic)
    publish(s.kafka_bootstrap, s.topic, records)
    caplog.set_level(logging.ERROR, logger="btc_anomaly.processing.stream")
    listener = install_listener(spark, 0)
    failures_before = _failures()
    runner = StreamRunner(s, spark)
    thread, errors = run_forever_in_thread(runner)
    try:
        wait_for(
            lambda: (
                any("No space left on device" in r.getMessage() for r in caplog.records)
                or not thread.is_alive()
            ),
            300,
            what="the runner's ERROR on the full disk",
        )
        assert thread.is_alive(), f"the stream died instead of retrying: {errors}"
        wait_for(lambda: _failures() > failures_before, 60, what="btc_stream_query_failures_total")
        subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True)
        table = s.lake_table("transactions")
        wait_for(
            lambda: len(delta_reader.read_arrow(table, columns=["hash"])) >= RECORDS or not thread.is_alive(),
            300,
            interval_s=2,
            what="every record in the lake",
        )
    finally:
        runner.stop_event.set()
        thread.join(180)
        spark.streams.removeListener(listener)
    assert not errors, errors
    hashes = delta_reader.read_arrow(s.lake_table("transactions"), columns=["hash"])["hash"].to_pylist()
    assert len(hashes) == len(set(hashes)), f"{len(hashes) - len(set(hashes))} stored twice"
    assert set(hashes) == {k.decode() for k, _ in records}
