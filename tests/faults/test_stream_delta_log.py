"""A lake table whose ``_delta_log`` is missing or corrupt under `btc-anomaly stream`.

The stream must refuse to start with an ERROR naming the table and what to do (the CLI exits 2), and
must not paper over it: no new empty table over the old data files, no restart loop.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from btc_anomaly.config import Settings
from btc_anomaly.processing.stream import StreamFailed, StreamRunner
from helpers.stream import create_topic, looped_records, publish

pytestmark = pytest.mark.integration


def _remove_log(table: Path) -> None:
    shutil.rmtree(table / "_delta_log")


def _corrupt_last_commit(table: Path) -> None:
    last = sorted((table / "_delta_log").glob("*.json"))[-1]
    last.write_bytes(last.read_bytes()[: len(last.read_bytes()) // 2])  # a torn write


@pytest.mark.parametrize("damage", [_remove_log, _corrupt_last_commit], ids=["missing", "corrupt"])
def test_a_damaged_delta_log_stops_the_stream_with_a_clear_error(
    spark: Any,
    kafka_settings: Settings,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[Path], None],
) -> None:
    s = kafka_settings.model_copy(update={"lake_root": tmp_path / "lake", "stream_metrics_port": 0})
    create_topic(s.kafka_bootstrap, s.topic)
    publish(s.kafka_bootstrap, s.topic, [(h.encode(), v) for h, v, _ in looped_records(200)])
    StreamRunner(s, spark).run_available_now(stats=False)
    table = Path(s.lake_table("transactions"))
    files = sorted(p.relative_to(table) for p in table.rglob("*.parquet"))
    assert files

    damage(table)
    # What a new process would see: the JVM's cache of table snapshots starts empty.
    spark.sparkContext._jvm.org.apache.spark.sql.delta.DeltaLog.clearCache()
    caplog.set_level(logging.ERROR, logger="btc_anomaly.processing.stream")
    with pytest.raises(StreamFailed) as failed:
        StreamRunner(s, spark)

    message = str(failed.value)
    assert str(table) in message and "_delta_log" in message, message
    assert any(r.levelno == logging.ERROR and str(table) in r.getMessage() for r in caplog.records)
    # Nothing was written over the damaged table: its data files are all there, no new log was begun.
    assert sorted(p.relative_to(table) for p in table.rglob("*.parquet")) == files
    if damage is _remove_log:
        assert not (table / "_delta_log").exists()
