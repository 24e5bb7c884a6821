"""Spark-side validation (processing/parse.py) agrees with the pydantic model on what is a valid tx.

Records: every sample transaction, plus mutations of sample transactions (one field changed, removed or
retyped, nested values broken) generated systematically from the model's fields. The Spark verdict
must equal ``schema.parse_transaction``'s, except for the tolerances documented in parse.py, which
the second test pins down.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import orjson
import pytest

from btc_anomaly.config import Settings
from btc_anomaly.processing import delta_reader
from btc_anomaly.processing.parse import ERRORS, parse, transaction_columns
from btc_anomaly.processing.stream import StreamRunner
from btc_anomaly.schema import (
    FIRST_SEEN_TOO_EARLY,
    InvalidTransaction,
    Transaction,
    first_seen_too_late,
    parse_transaction,
)
from helpers.stream import (
    create_topic,
    expected_stats,
    kafka_frame,
    key_of,
    malformed,
    publish,
    sample_lines,
    with_changes,
)

pytestmark = pytest.mark.integration


def _mutations(line: bytes) -> list[bytes]:
    tx = orjson.loads(line)
    out: list[bytes] = []
    for name, value in tx.items():
        if name == "schema_version":
            continue
        removed = {k: v for k, v in tx.items() if k != name}
        out.append(orjson.dumps(removed))
        out.append(orjson.dumps({**tx, name: None}))
        if isinstance(value, bool):
            out.append(orjson.dumps({**tx, name: [1]}))
        elif isinstance(value, int):
            out += [
                orjson.dumps({**tx, name: -1}),
                orjson.dumps({**tx, name: 2.5}),
                orjson.dumps({**tx, name: [1]}),
            ]
        elif isinstance(value, str):
            out.append(orjson.dumps({**tx, name: "x"}))
        elif isinstance(value, list) and value:
            first = value[0]
            for field in first:
                without = {k: v for k, v in first.items() if k != field}
                out.append(orjson.dumps({**tx, name: [without, *value[1:]]}))
                if field == "value":  # strings take any JSON value in Spark (see the tolerances test)
                    out.append(orjson.dumps({**tx, name: [{**first, field: -3}, *value[1:]]}))
                    out.append(orjson.dumps({**tx, name: [{**first, field: 2.5}, *value[1:]]}))
            out.append(orjson.dumps({**tx, name: [None, *value[1:]]}))
            out.append(orjson.dumps({**tx, name: []}))
    return out


def _pydantic_valid(value: bytes | None) -> bool:
    if value is None:
        return False
    try:
        parse_transaction(value)
    except InvalidTransaction:
        return False
    return True


def _spark_verdicts(spark: Any, values: list[bytes | None]) -> list[dict[str, Any]]:
    rows = parse(kafka_frame(spark, values)).orderBy("offset").collect()
    return [r.asDict(recursive=True) for r in rows]


def test_spark_validation_agrees_with_pydantic(spark: Any) -> None:
    lines = sample_lines()
    values: list[bytes | None] = list(lines)
    for line in lines[:3]:
        values += _mutations(line)
    values += [v for _, v, _ in malformed(lines[0])]
    verdicts = _spark_verdicts(spark, values)
    disagree = []
    for value, row in zip(values, verdicts, strict=True):
        spark_valid = not row[ERRORS]
        if spark_valid != _pydantic_valid(value):
            disagree.append((value[:120] if value else value, row[ERRORS]))
    assert not disagree, f"{len(disagree)} disagreements, e.g. {disagree[:3]}"
    # Valid rows come out with exactly the model's values.
    for value, row in zip(values[: len(lines)], verdicts[: len(lines)], strict=True):
        tx = Transaction.from_json(value)
        got = {k: row[k] for k in transaction_columns()}
        got["first_seen"] = got["first_seen"].replace(tzinfo=dt.UTC)
        assert Transaction.model_validate(got) == tx


def test_documented_tolerances_and_defaults(spark: Any) -> None:
    tx = orjson.loads(sample_lines()[0])
    no_version = {k: v for k, v in tx.items() if k != "schema_version"}
    no_script = {**tx, "outputs": [{k: v for k, v in o.items() if k != "script_type"} for o in tx["outputs"]]}
    extra = {**tx, "added_in_a_newer_schema": 1}
    string_number = {**tx, "size": str(tx["size"])}
    string_bool = {**tx, "rbf": "yes"}
    number_string = {**tx, "outputs": [{**tx["outputs"][0], "address": 7}, *tx["outputs"][1:]]}
    docs = (no_version, no_script, extra, string_number, string_bool, number_string)
    rows = _spark_verdicts(spark, [orjson.dumps(d) for d in docs])
    assert (
        rows[0][ERRORS] == []
        and rows[0]["schema_version"] == Transaction.model_fields["schema_version"].default
    )
    assert rows[1][ERRORS] == [] and {o["script_type"] for o in rows[1]["outputs"]} == {"nonstandard"}
    assert rows[2][ERRORS] == []  # tolerant reader: pydantic forbids it, the stream ignores it
    assert rows[3][ERRORS] == ["wrong type: size"]  # pydantic's lax mode would coerce "234"
    assert rows[4][ERRORS] == ["wrong type: rbf"]  # ... and "yes"
    assert rows[5][ERRORS] == [] and rows[5]["outputs"][0]["address"] == "7"  # Spark reads a number as text


# --- event-time bounds (issue #19 item 5) -------------------------------------------------------------


def _dated(line: bytes, first_seen: dt.datetime, tag: int) -> bytes:
    """A real sample transaction re-dated (and re-hashed, so it is new data): only first_seen is synthetic."""
    from btc_anomaly.ingestion.replay_source import loop_hash

    tx = orjson.loads(line)
    return with_changes(line, hash=loop_hash(tx["hash"], tag), first_seen=first_seen.isoformat())


def test_first_seen_outside_genesis_and_now_plus_skew_is_invalid(spark: Any) -> None:
    now = dt.datetime.now(dt.UTC)
    line = sample_lines()[0]
    values = [
        _dated(line, now + dt.timedelta(days=365), 1),
        _dated(line, dt.datetime(2009, 1, 2, 23, 59, tzinfo=dt.UTC), 2),
        _dated(line, now + dt.timedelta(minutes=30), 3),  # within the 2 h default skew
        _dated(line, dt.datetime(2009, 1, 3, tzinfo=dt.UTC), 4),  # the first valid instant
    ]
    rows = _spark_verdicts(spark, values)
    assert [r[ERRORS] for r in rows] == [
        [first_seen_too_late(7200)],
        [FIRST_SEEN_TOO_EARLY],
        [],
        [],
    ]
    assert parse(kafka_frame(spark, values[2:3]), max_skew_s=60).first()[ERRORS] == [first_seen_too_late(60)]


def test_a_future_dated_record_is_quarantined_and_the_windows_keep_updating(
    spark: Any, kafka_settings: Settings, tmp_path: Path
) -> None:
    """Without the bound, the record dated next year moved the stats watermark a year ahead, and every
    later row was dropped as late: ``tx_stats_*`` stopped updating with no error."""
    settings = kafka_settings.model_copy(
        update={"lake_root": tmp_path / "lake", "stream_metrics_port": 0, "stream_watermark": "10 minutes"}
    )
    lines = sample_lines()
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    before = [_dated(line, now - dt.timedelta(minutes=5), 5000 + i) for i, line in enumerate(lines[:20])]
    future = _dated(lines[20], now + dt.timedelta(days=365), 5100)
    after = [_dated(line, now - dt.timedelta(minutes=1), 5200 + i) for i, line in enumerate(lines[21:41])]
    create_topic(settings.kafka_bootstrap, settings.topic)
    runner = StreamRunner(settings, spark)  # type: ignore[arg-type]

    publish(settings.kafka_bootstrap, settings.topic, [(key_of(v), v) for v in [*before, future]])
    runner.run_available_now()  # the stats query's watermark is checkpointed after this run
    publish(settings.kafka_bootstrap, settings.topic, [(key_of(v), v) for v in after])
    runner.run_available_now()

    quarantine = delta_reader.read_table(settings.lake_table("quarantine"))
    assert [bytes(v) for v in quarantine["value"]] == [future]
    assert list(quarantine["error"]) == [first_seen_too_late(settings.first_seen_max_skew_s)]
    stored = delta_reader.read_arrow(settings.lake_table("transactions"), columns=["hash"])["hash"]
    assert key_of(future).decode() not in stored.to_pylist()
    stats = delta_reader.read_table(settings.lake_table("tx_stats_1m")).set_index("window_start")
    want = expected_stats([Transaction.from_json(v) for v in [*before, *after]], 60).set_index("window_start")
    assert stats["tx_count"].astype("int64").to_dict() == want["tx_count"].astype("int64").to_dict()
