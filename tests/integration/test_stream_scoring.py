"""Streaming scoring for real: broker → Spark → Delta → champion from a real MLflow → scored_transactions.

Every distinct transaction is scored exactly once with the scores `POST /predict` gives;
a promotion reaches the running stream without a restart; anomalies reach the webhook notifier; and
features computed in Spark's Python workers equal the trainer's and the API's (the third feature path).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest
from deltalake import DeltaTable

from btc_anomaly.config import Settings
from btc_anomaly.features import compute_features
from btc_anomaly.model.promotion import promote
from btc_anomaly.model.registry import load_version
from btc_anomaly.model.scoring import ChampionModel
from btc_anomaly.model.train import train
from btc_anomaly.monitoring.notifier import Notifier, set_notifier
from btc_anomaly.processing import delta_reader, tables
from btc_anomaly.processing.stream import StreamRunner
from btc_anomaly.schema import Transaction
from helpers.stream import create_topic, key_of, publish, sample_lines, wait_for

pytestmark = pytest.mark.integration

FIRST = 3_500  # sample lines scored by v1; the rest after v2 is promoted


class _Hooks(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[list[dict[str, Any]]]:
    received: ClassVar[list[dict[str, Any]]] = []
    handler = type("Handler", (_Hooks,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    set_notifier(Notifier(f"http://127.0.0.1:{server.server_port}/hook", rate_per_min=600, burst=5))
    try:
        yield received
    finally:
        set_notifier(None)
        server.shutdown()


def _scored(settings: Settings) -> pd.DataFrame:
    return delta_reader.read_arrow(settings.lake_table("scored_transactions")).to_pandas()


def _frame(lines: list[bytes]) -> pd.DataFrame:
    return pd.DataFrame([Transaction.from_json(line).model_dump() for line in lines])


def _api_predictions(model: ChampionModel, lines: list[bytes], tmp_path: Path) -> pd.DataFrame:
    """`POST /predict` answers for these canonical transactions, served ``model`` (indexed by hash)."""
    from btc_anomaly.api.model_holder import Served
    from helpers.api_server import in_process_api

    rows: list[dict[str, Any]] = []
    with in_process_api(tmp_path / "api-lake", tmp_path / "api-state") as client:
        client.app.state.ctx.holder.install(Served(model))
        for start in range(0, len(lines), 500):
            body = b"[" + b",".join(lines[start : start + 500]) + b"]"
            answer = client.post("/predict", content=body, headers={"Content-Type": "application/json"})
            assert answer.status_code == 200, answer.text
            rows.extend(answer.json())
    assert {r["model"]["version"] for r in rows} == {model.version}
    return pd.DataFrame(rows).set_index("hash")


def test_stream_scores_every_transaction_once_and_follows_the_champion(
    spark: Any,
    kafka_settings: Settings,
    champion_settings: Settings,
    webhook: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    # A model of its own: this test moves the champion alias.
    own = champion_settings.model_copy(update={"model_name": f"btc-anomaly-stream-{uuid.uuid4().hex[:8]}"})
    first = train(own, decided_by="pytest", progress=False)
    assert first.decision is not None and first.decision.promoted
    v1 = str(first.version)

    settings = kafka_settings.model_copy(
        update={
            "lake_root": tmp_path / "lake",
            "mlflow_tracking_uri": own.mlflow_tracking_uri,
            "model_name": own.model_name,
            "model_reload_s": 1.0,
            "stream_trigger_s": 0.5,
            "stream_score_trigger_s": 0.5,
            "stream_stats_trigger_s": 30.0,
            "stream_watermark": "3650 days",
            "stream_metrics_port": 0,
            "stream_notify": True,
        }
    )
    lines = sample_lines()
    create_topic(settings.kafka_bootstrap, settings.topic)
    publish(settings.kafka_bootstrap, settings.topic, [(key_of(x), x) for x in lines[:FIRST]])
    publish(settings.kafka_bootstrap, settings.topic, [(key_of(x), x) for x in lines[:200]])  # twice

    stop = threading.Event()
    runner = StreamRunner(settings, spark, stop_event=stop)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            runner.run_forever()
        except BaseException as exc:  # surfaced by the assertions below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(_scored(settings)) >= FIRST, 240, what="first half scored")
        # Promote v2 (forced: the gate's verdict is not what this test is about), then send the rest.
        second = train(own, decided_by="pytest", progress=False, promote=False)
        v2 = str(second.version)
        assert promote(own, v2, decided_by="pytest", force=True).promoted
        time.sleep(2 * settings.model_reload_s)  # every worker's alias check has expired
        publish(settings.kafka_bootstrap, settings.topic, [(key_of(x), x) for x in lines[FIRST:]])
        wait_for(lambda: len(_scored(settings)) >= len(lines), 240, what="all scored")
        time.sleep(2)  # a duplicate score would land in the next batches
    finally:
        stop.set()
        thread.join(120)
    assert not errors, errors

    scored = _scored(settings)
    assert len(scored) == len(lines) and scored["hash"].is_unique
    # Partitioned like `transactions`: by first_seen's UTC date (the API's window reads prune by it).
    table = DeltaTable(str(settings.lake_table(tables.SCORED)))
    assert table.metadata().partition_columns == [tables.DATE_COLUMN]
    dates = pd.to_datetime(scored["first_seen"], utc=True).dt.date
    assert (scored[tables.DATE_COLUMN] == dates).all()
    by_hash = scored.set_index("hash")
    hashes = [Transaction.from_json(x).hash for x in lines]
    assert set(by_hash.loc[hashes[:FIRST], "model_version"]) == {v1}
    assert set(by_hash.loc[hashes[FIRST:], "model_version"]) == {v2}

    # The stream's scores are those `POST /predict` gives for the same transactions and version: the API
    # parses JSON into its own columnar batch and calls the scoring core itself, without ``score_frame``.
    for version, part in ((v1, lines[:FIRST]), (v2, lines[FIRST:])):
        loaded = load_version(settings, version)
        model = ChampionModel(loaded.bundle, loaded.name, loaded.version, loaded.run_id)
        expected = _api_predictions(model, part, tmp_path)
        got = by_hash.loc[expected.index]
        np.testing.assert_allclose(got["anomaly_score"], expected["anomaly_score"], rtol=0, atol=1e-12)
        assert (got["is_anomaly"] == expected["is_anomaly"]).all()
        anomalous = expected.index[expected["is_anomaly"]]
        assert len(anomalous) > 0
        assert [list(r) for r in got.loc[anomalous, "top_features"]] == [
            [r["feature"] for r in reasons] for reasons in expected.loc[anomalous, "reasons"]
        ]
    assert by_hash["is_anomaly"].any()

    # Anomalies reached the webhook (rate limited; the notifier summarises the rest).
    wait_for(lambda: len(webhook) > 0, 30, what="a webhook message")
    assert any("stream" in json.dumps(m) for m in webhook)


def test_spark_workers_compute_the_same_features(spark: Any, tmp_path: Path) -> None:
    """The Spark path of the one feature function: mapInPandas over the Delta table."""
    import pyarrow as pa
    from deltalake import write_deltalake
    from pyspark.sql import types as T

    from btc_anomaly.schema import arrow_schema

    lines = sample_lines()
    txs = [Transaction.from_json(x) for x in lines]
    path = str(tmp_path / "transactions")
    write_deltalake(path, pa.Table.from_pylist([t.model_dump() for t in txs], schema=arrow_schema()))
    api_path = compute_features(_frame(lines))
    trainer_path = compute_features(delta_reader.read_arrow(path).to_pandas())
    schema = T.StructType(
        [T.StructField("hash", T.StringType())] + [T.StructField(c, T.DoubleType()) for c in api_path.columns]
    )

    def features(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            out = compute_features(pdf)
            out.insert(0, "hash", pdf["hash"].to_numpy())
            yield out

    spark_path = (
        spark.read.format("delta")
        .load(path)
        .mapInPandas(features, schema=schema)
        .toPandas()
        .set_index("hash")
    )
    api_path.index = [t.hash for t in txs]
    trainer_path.index = delta_reader.read_arrow(path, columns=["hash"]).column("hash").to_pylist()
    for other in (trainer_path, spark_path):
        pd.testing.assert_frame_equal(
            other.loc[api_path.index], api_path, check_exact=True, check_names=False, check_dtype=True
        )
