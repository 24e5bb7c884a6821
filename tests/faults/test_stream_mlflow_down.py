"""`btc-anomaly stream` while the model registry is down, and a 1 MB record end to end (issue #19).

One stream process for both (each start costs a JVM): it scores a first replay with the session's
champion; then MLflow goes away for the stream only (a TCP proxy between them is cut, tests/helpers/
tcp_proxy.py) while the producer's own client (TxProducer) publishes a second replay and a transaction
of about 1 MB. Records keep being stored; the outage is a metric; after MLflow is back every published
hash is in ``scored_transactions`` exactly once, and the API answers for the big one with its score.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from prometheus_client import REGISTRY

from btc_anomaly.config import PROJECT_ROOT, Settings
from btc_anomaly.ingestion.producer import TxProducer
from btc_anomaly.ingestion.records import Encoded
from btc_anomaly.ingestion.replay_source import ReplaySource, loop_hash
from btc_anomaly.processing import delta_reader
from btc_anomaly.processing.scoring_query import champion_exists
from btc_anomaly.runtime.kafka_broker import free_port
from btc_anomaly.schema import Transaction
from helpers.api_server import in_process_api
from helpers.stream import SAMPLE, kill_stream, start_stream, stream_process_settings, wait_for
from helpers.tcp_proxy import proxy_to

pytestmark = pytest.mark.integration

BEFORE, DURING = 500, 500  # replayed transactions published before and during the outage
BIG_RECORD_BYTES = 1_000_000  # under the producer's max.request.size (1 MiB)
SCORED = "scored_transactions"
REGISTRY_FAILURES = "btc_stream_registry_consecutive_failures"
SCORING_FAILURES = 'btc_stream_query_failures_total{query="scoring"}'
ALERTS = PROJECT_ROOT / "monitoring" / "prometheus" / "alerts.yml"


def big_transaction() -> Transaction:
    """A real sample transaction MODIFIED: its outputs repeated until its record is about 1 MB, with a
    fresh hash (replay's loop_hash), consistent counts and values, sizes grown by 34 bytes per added
    output (a P2PKH output), first seen now."""
    original = next(
        t
        for t in map(Transaction.from_json, _sample_lines())
        if t.fee is not None and t.input_value is not None and 0 < t.output_value < 10**9 and not t.is_segwit
    )
    per_output = len(orjson.dumps([o.model_dump() for o in original.outputs])) / original.output_count
    n = int((BIG_RECORD_BYTES - len(original.to_json_bytes())) / per_output) + original.output_count
    outputs = [original.outputs[i % original.output_count] for i in range(n)]
    output_value = sum(o.value for o in outputs)
    assert original.fee is not None
    size = original.size + 34 * (n - original.output_count)
    return Transaction.model_validate(
        original.model_copy(
            update={
                "hash": loop_hash(original.hash, 1_000_000),
                "first_seen": dt.datetime.now(dt.UTC),
                "outputs": outputs,
                "output_count": n,
                "output_value": output_value,
                "input_value": output_value + original.fee,
                "size": size,
                "vsize": size,
                "weight": 4 * size,
            }
        ).model_dump()
    )


def _sample_lines() -> list[bytes]:
    from btc_anomaly.ingestion.replay_source import read_lines

    return list(read_lines([SAMPLE]))


def _hashes(settings: Settings, table: str) -> list[str]:
    path = settings.lake_table(table)
    if delta_reader.table_version(path) is None:
        return []
    return delta_reader.read_arrow(path, columns=["hash"])["hash"].to_pylist()


def _metrics(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _publish(producer: TxProducer, items: list[Any]) -> None:
    stats = producer.publish(items)
    assert producer.flush(60)
    assert (stats.rejected, stats.out_of_range) == (0, 0)


def _registry_alert() -> dict[str, Any]:
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    return next(r for r in rules if REGISTRY_FAILURES in r["expr"])


@pytest.mark.timeout(1200)  # one stream start, two replays scored, an outage
def test_mlflow_down_while_scoring_and_a_1mb_record_end_to_end(
    kafka_settings: Settings, champion_settings: Settings, tmp_path: Path
) -> None:
    replay = [i for i in itertools.islice(ReplaySource([SAMPLE], loop=True), BEFORE + DURING)]
    assert all(isinstance(i, Encoded) for i in replay)
    first, second = replay[:BEFORE], replay[BEFORE:]
    big = big_transaction()
    assert 0.95 * BIG_RECORD_BYTES < len(big.to_json_bytes()) < 1 << 20
    expected = {i.hash for i in replay} | {big.hash}
    assert len(expected) == BEFORE + DURING + 1
    port = free_port()
    log = tmp_path / "stream.log"
    with proxy_to(champion_settings.mlflow_tracking_uri) as proxy:
        s = stream_process_settings(
            kafka_settings,
            tmp_path / "lake",
            stream_score_trigger_s=0.0,
            stream_metrics_port=port,
            mlflow_tracking_uri=proxy.url,
            model_name=champion_settings.model_name,
            model_reload_s=1.0,
        )
        producer = TxProducer(s)  # the producer's own client: the 1 MB record takes the product's path
        proc = start_stream(s, log)
        alive = lambda: proc.poll() is None  # noqa: E731
        try:
            _publish(producer, first)
            wait_for(
                lambda: len(set(_hashes(s, SCORED))) >= BEFORE or not alive(),
                600,
                interval_s=2,
                what="the first replay scored",
            )
            assert alive(), f"stream exited with {proc.returncode}; see {log}"
            assert proxy.connections > 0, "the stream did not reach MLflow through the proxy"

            proxy.cut()  # MLflow is down, for the stream only
            _publish(producer, [*second, big])
            wait_for(
                lambda: expected <= set(_hashes(s, "transactions")) or not alive(),
                300,
                interval_s=2,
                what="the second replay and the 1 MB record stored while MLflow is down",
            )
            assert alive(), f"stream exited with {proc.returncode}; see {log}"
            # The outage is a metric, and scoring either goes on with the loaded champion or fails its
            # batches (a query failure, restarted with backoff) until MLflow is back: it never hangs.
            wait_for(
                lambda: (_metrics(port).get(REGISTRY_FAILURES) or 0) >= 1 or not alive(),
                120,
                what=f"{REGISTRY_FAILURES} >= 1",
            )
            wait_for(
                lambda: (
                    expected <= set(_hashes(s, SCORED))
                    or _metrics(port).get(SCORING_FAILURES, 0) >= 1
                    or not alive()
                ),
                180,  # under MLflow's default retries one re-check of a worker alone took about 250 s
                interval_s=2,
                what="scoring going on with the loaded champion, or failing, while MLflow is down",
            )
            assert alive(), f"stream exited with {proc.returncode}; see {log}"
            scored_while_down = expected <= set(_hashes(s, SCORED))
            print(f"MLflow down: {'scored with the loaded champion' if scored_while_down else 'paused'}")
            assert not proxy.is_up

            proxy.restore()
            wait_for(
                lambda: expected <= set(_hashes(s, SCORED)) or not alive(),
                600,
                interval_s=2,
                what="every transaction scored after MLflow is back",
            )
            wait_for(lambda: _metrics(port).get(REGISTRY_FAILURES) == 0, 120, what="the registry check ok")
            assert alive(), f"stream exited with {proc.returncode}; see {log}"
        finally:
            producer.close()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(120)
                except subprocess.TimeoutExpired:
                    kill_stream(proc)

    for table in ("transactions", SCORED):
        hashes = _hashes(s, table)
        assert len(hashes) == len(set(hashes)), f"{len(hashes) - len(set(hashes))} duplicates in {table}"
        assert set(hashes) == expected, f"{len(expected - set(hashes))} published transactions not in {table}"
    assert "model registry unreachable" in log.read_text()
    alert = _registry_alert()
    assert alert["labels"]["service"] == "stream"

    with in_process_api(s.lake_root, tmp_path / "api-state") as api:
        row = api.get(f"/transactions/{big.hash}")
        assert row.status_code == 200, row.text
        tx = row.json()
        assert tx["hash"] == big.hash and tx["output_count"] == big.output_count
        assert tx["is_anomaly"] is True and 0.0 <= tx["anomaly_score"] <= 1.0
        assert tx["model_name"] == champion_settings.model_name  # the champion loaded before the outage
        page = api.get("/anomalies", params={"limit": 10})
        assert page.status_code == 200, page.text
        scores = {item["hash"]: item["anomaly_score"] for item in page.json()["items"]}
        assert scores.get(big.hash) == tx["anomaly_score"]


def test_a_stream_waiting_for_a_champion_counts_registry_failures(
    champion_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before its scoring query runs, the stream asks for a champion every model_reload_s
    (``champion_exists``): an unreachable registry counts in the same gauge as the query's checks."""
    # The stream's fail-fast MLflow client limits (stream.registry_fails_fast), for this test only.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

    def failures() -> float | None:
        return REGISTRY.get_sample_value(REGISTRY_FAILURES)

    with proxy_to(champion_settings.mlflow_tracking_uri) as proxy:
        s = champion_settings.model_copy(update={"mlflow_tracking_uri": proxy.url})
        assert champion_exists(s) and failures() == 0
        proxy.cut()
        assert not champion_exists(s) and not champion_exists(s)
        assert failures() == 2
        proxy.restore()
        assert champion_exists(s) and failures() == 0
