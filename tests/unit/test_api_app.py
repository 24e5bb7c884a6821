"""The FastAPI app in-process (TestClient): routes, error paths, lake reads, prevout lookups, metrics.

The model is the real sample bundle installed into the holder (no registry); HTTP-level behaviour with a
real MLflow champion and uvicorn is in tests/integration/test_api*.py.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import orjson
import pandas as pd
import pyarrow as pa
import pytest
from deltalake import write_deltalake
from fastapi.testclient import TestClient

from btc_anomaly.api.app import create_app
from btc_anomaly.config import Settings
from btc_anomaly.features import FEATURES_PREVOUT
from btc_anomaly.model.scoring import score_frame, scored_arrow_schema
from fakes.blockchain_com import FakeBlockchainCom
from helpers.api_server import (
    coinbase_hex,
    historical_cases,
    rawtx_object,
    sample_records,
    served_sample_model,
    summary_body,
)

RECORDS = sample_records()
TX_HEX = (Path(__file__).resolve().parents[1] / "fixtures" / "example_tx_15e10745.hex").read_text().strip()


@pytest.fixture(scope="module")
def blockchain() -> Iterator[FakeBlockchainCom]:
    with FakeBlockchainCom() as fake:
        for case in historical_cases():
            for prev in case["prev_transactions"]:
                obj = rawtx_object(prev["transaction"])
                fake.rawtx[obj["hash"]] = obj
        yield fake


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lake")
    served = served_sample_model()
    frame = pd.DataFrame(RECORDS)
    scored = score_frame(frame, served.model, settings=Settings())
    write_deltalake(
        str(root / "scored_transactions"),
        pa.Table.from_pandas(scored, schema=scored_arrow_schema(), preserve_index=False),
    )
    return root


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "state_dir": tmp_path / "state",
        "lake_root": tmp_path / "lake",
        "mlflow_tracking_uri": "http://127.0.0.1:9",  # nothing listens: the registry is down
        "model_name": "unit-model",
        "api_key": "k3y",
        "api_max_batch": 50,
        "api_max_body_bytes": 300_000,
        "blockchain_base_url": "http://127.0.0.1:9",
        "api_prevout_timeout_s": 1.0,
        # The sample spans 2011-2025: the lake reads cover it whole (their bounds have tests of their own).
        "api_lake_window_h": 131_400,
        "api_lake_max_window_h": 131_400,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def _client(settings: Settings, *, model: bool = True) -> TestClient:
    app = create_app(settings, watch_model=False)
    if model:
        app.state.ctx.holder.install(served_sample_model())
    return TestClient(app, base_url="http://localhost")  # a Host in the default allowed_hosts


@pytest.fixture
def client(tmp_path: Path, lake: Path, blockchain: FakeBlockchainCom) -> Iterator[TestClient]:
    settings = _settings(tmp_path, lake_root=lake, blockchain_base_url=blockchain.base_url)
    with _client(settings) as c:
        yield c


# --- predict ----------------------------------------------------------------------------------------------


def test_single_and_batch_shapes(client: TestClient) -> None:
    one = client.post("/predict", json=RECORDS[100])
    assert one.status_code == 200
    body = one.json()
    assert body["hash"] == RECORDS[100]["hash"] and body["model"] == {
        "name": "unit-model",
        "version": "1",
        "alias": "champion",
    }
    assert body["reasons"], "a single transaction is explained by default"
    batch = client.post("/predict", json=[*RECORDS[:20], summary_body(RECORDS[20])])
    assert batch.status_code == 200
    assert [p["hash"] for p in batch.json()] == [r["hash"] for r in RECORDS[:21]]
    assert "output_hhi" in batch.json()[-1]["missing_features"]


def test_threshold_query(client: TestClient) -> None:
    low = client.post("/predict?threshold=0&explain=none", json=RECORDS[:10]).json()
    assert all(p["is_anomaly"] and p["threshold"] == 0 for p in low)
    for bad in ("1.5", "-0.1", "nan", "abc"):
        r = client.post(f"/predict?threshold={bad}", json=RECORDS[0])
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "threshold"]
    assert client.post("/predict?explain=sometimes", json=RECORDS[0]).status_code == 422


def test_validation_errors_are_field_level(client: TestClient) -> None:
    bad = dict(RECORDS[0], size="huge")
    r = client.post("/predict", json=[RECORDS[1], bad])
    assert r.status_code == 422
    assert ["body", 1, "canonical", "size"] in [e["loc"] for e in r.json()["detail"]]
    r = client.post("/predict", json=summary_body(RECORDS[0]) | {"weight": 1})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][:2] == ["body", "summary"]
    assert (
        client.post("/predict", content=b"{oops", headers={"content-type": "application/json"}).status_code
        == 422
    )
    assert client.post("/predict", content=b"").status_code == 422


def test_batch_and_body_limits(client: TestClient) -> None:
    r = client.post("/predict", json=[summary_body(RECORDS[0])] * 51)
    assert r.status_code == 413 and "51" in r.json()["detail"]
    big = RECORDS[:49]
    assert len(orjson.dumps(big)) > 30_000
    with _client(
        _settings(Path(client.app.state.ctx.settings.state_dir), api_max_body_bytes=30_000)
    ) as small:
        r = small.post("/predict", json=big)
        assert r.status_code == 413 and "bytes" in r.json()["detail"]
        assert r.headers["connection"] == "close"

    def chunks() -> Iterator[bytes]:  # no Content-Length: only counting the streamed bytes can stop it
        yield b"["
        for _ in range(2000):
            yield b'{"hash": "' + b"a" * 200 + b'"},'
        yield b"{}]"

    r = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_no_model_is_503(tmp_path: Path) -> None:
    with _client(_settings(tmp_path), model=False) as c:
        r = c.post("/predict", json=RECORDS[0])
        assert r.status_code == 503
        assert r.json()["detail"].startswith("model not loaded")
        assert c.get("/model").status_code == 503
        ready = c.get("/ready")
        assert ready.status_code == 503 and not ready.json()["ready"]
        assert c.get("/health").status_code == 200
        c.app.state.ctx.holder.alias_missing = True  # what a reachable registry without the alias gives
        r = c.post("/predict/raw", json=[TX_HEX])
        assert r.status_code == 503
        assert r.json() == {"detail": "no model registered yet: run btc-anomaly train"}


# --- raw --------------------------------------------------------------------------------------------------


def test_raw_valid_invalid_coinbase(client: TestClient) -> None:
    items = [TX_HEX, coinbase_hex(), "zz", TX_HEX[:-10], TX_HEX + "00", ""]
    r = client.post("/predict/raw?resolve_prevouts=false", json=items[:5])
    assert r.status_code == 200
    out = r.json()
    assert [o["valid"] for o in out] == [True, True, False, False, False]
    assert out[0]["summary"]["txid"] == "15e10745f15593a899cef391191bdd3d7c12412cc4696b7bcb669d0feadc8521"
    assert out[0]["model_kind"] == "structural" and out[0]["missing_features"] == FEATURES_PREVOUT
    assert out[0]["prevouts"] == {
        "requested": False,
        "inputs": 5,
        "resolved": 0,
        "source": None,
        "error": None,
    }
    assert out[1]["summary"]["is_coinbase"] and out[1]["model_kind"] == "structural"
    assert (
        "non-hex" in out[2]["reason"] and "truncated" in out[3]["reason"] and "trailing" in out[4]["reason"]
    )
    assert client.post("/predict/raw", json=[""]).status_code == 422


def test_raw_resolves_prevouts_from_blockchain_com(client: TestClient) -> None:
    cases = historical_cases()
    r = client.post("/predict/raw", json=[c["transaction"] for c in cases])
    assert r.status_code == 200
    for case, item in zip(cases, r.json(), strict=True):
        assert item["valid"] and item["summary"]["is_segwit"], case["name"]
        assert item["prevouts"]["resolved"] == item["prevouts"]["inputs"]
        assert item["prevouts"]["error"] is None
        assert item["model_kind"] == "full" and item["missing_features"] == []
        assert item["summary"]["fee"] > 0


def test_operator_setting_caps_the_request_flag(
    tmp_path: Path, lake: Path, blockchain: FakeBlockchainCom
) -> None:
    settings = _settings(
        tmp_path, lake_root=lake, blockchain_base_url=blockchain.base_url, api_resolve_prevouts=False
    )
    before = blockchain.count("/rawtx")
    with _client(settings) as c:
        r = c.post("/predict/raw?resolve_prevouts=true", json=[historical_cases()[0]["transaction"], TX_HEX])
        assert r.status_code == 200 and r.headers["X-Prevout-Lookups"] == "disabled"
        for item in r.json():
            assert item["prevouts"]["requested"] is False and item["prevouts"]["resolved"] == 0
            assert "disabled on this server" in item["prevouts"]["error"]
            assert item["model_kind"] == "structural"
        plain = c.post("/predict/raw", json=[TX_HEX])
        assert "X-Prevout-Lookups" not in plain.headers and plain.json()[0]["prevouts"]["error"] is None
    assert blockchain.count("/rawtx") == before, "no lookup left the server"


def test_raw_without_reachable_source_says_what_is_missing(tmp_path: Path) -> None:
    with _client(_settings(tmp_path)) as c:
        r = c.post("/predict/raw", json=[historical_cases()[0]["transaction"]])
        item = r.json()[0]
        assert item["model_kind"] == "structural" and item["missing_features"] == FEATURES_PREVOUT
        assert item["prevouts"]["requested"] and item["prevouts"]["resolved"] == 0
        assert "connect" in item["prevouts"]["error"] or "unreachable" in item["prevouts"]["error"]


# --- lake ---------------------------------------------------------------------------------------------------


def test_anomalies_ordered_and_filtered(client: TestClient, lake: Path) -> None:
    r = client.get("/anomalies?limit=1000")
    assert r.status_code == 200
    items = r.json()["items"]
    assert items and all(i["is_anomaly"] for i in items)
    scores = [i["anomaly_score"] for i in items]
    assert scores == sorted(scores, reverse=True)
    top = client.get("/anomalies?limit=2").json()["items"]
    assert [i["hash"] for i in top] == [i["hash"] for i in items[:2]]
    high = client.get(f"/anomalies?min_score={scores[1]}").json()["items"]
    assert all(i["anomaly_score"] >= scores[1] for i in high) and len(high) >= 2
    first_seen = sorted(dt.datetime.fromisoformat(i["first_seen"].replace("Z", "+00:00")) for i in items)
    since = first_seen[len(first_seen) // 2]
    later = client.get("/anomalies", params={"since": since.isoformat(), "limit": 1000}).json()["items"]
    assert later and all(
        dt.datetime.fromisoformat(i["first_seen"].replace("Z", "+00:00")) >= since for i in later
    )
    assert client.get("/anomalies?limit=0").status_code == 422
    assert client.get("/anomalies?limit=5000").status_code == 422
    assert client.get("/anomalies?since=yesterday").status_code == 422


def test_transaction_lookup(client: TestClient) -> None:
    h = RECORDS[3]["hash"]
    r = client.get(f"/transactions/{h.upper()}")
    assert r.status_code == 200 and r.json()["hash"] == h and r.json()["scorings"] == 1
    missing = client.get("/transactions/" + "0" * 64)
    assert missing.status_code == 404 and "pass since/until" in missing.json()["detail"]
    assert client.get("/transactions/xyz").status_code == 422
    assert client.get("/transactions/" + "0" * 65).status_code == 422


def test_lake_without_table(tmp_path: Path) -> None:
    (tmp_path / "lake").mkdir()
    with _client(_settings(tmp_path)) as c:
        assert c.get("/anomalies").json()["items"] == []
        assert c.get("/transactions/" + "0" * 64).status_code == 404
        ready = c.get("/ready").json()
        assert ready["ready"] and ready["lake"]["table_exists"] is False


# --- operations ---------------------------------------------------------------------------------------------


def test_ready_needs_the_lake(tmp_path: Path) -> None:
    with _client(_settings(tmp_path, lake_root=tmp_path / "nowhere")) as c:
        r = c.get("/ready")
        assert r.status_code == 503
        assert any("lake" in m for m in r.json()["missing"])
        assert str(tmp_path) not in r.text, "no filesystem path in /ready"


def test_ready_says_what_is_missing_not_where_or_the_upstream_words(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One failed attempt, as `btc-anomaly api` configures its registry client (server.py), not minutes of retries.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    lake = tmp_path / "lake"
    (lake / "scored_transactions" / "_delta_log").mkdir(parents=True)
    (lake / "scored_transactions" / "_delta_log" / "00000000000000000000.json").write_text(
        "not a delta log\n"
    )
    with _client(_settings(tmp_path), model=False) as c:
        c.app.state.ctx.holder.check()  # the registry (127.0.0.1:9) is down: the holder's error has its URL
        assert "127.0.0.1:9" in (c.app.state.ctx.holder.last_error or "")
        r = c.get("/ready")
        assert r.status_code == 503
        body = r.json()
        assert body["missing"] == ["model not loaded: model registry unreachable (details in the API log)"]
        assert body["lake"]["table_error"].startswith("the scored table cannot be read")
        for leaked in (str(tmp_path), "127.0.0.1:9", "http://", "Error", "delta log"):
            assert leaked not in r.text, leaked
    assert str(lake / "scored_transactions") in caplog.text, "the path goes to the log instead"


def test_host_header_outside_allowed_hosts_is_400(tmp_path: Path, lake: Path) -> None:
    settings = _settings(tmp_path, lake_root=lake, allowed_hosts="localhost,api")
    with _client(settings) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/health", headers={"Host": "api:5001"}).status_code == 200
        for host in ("evil.example", "127.0.0.1.evil.example", "localhost.evil.example:5001"):
            r = c.post("/predict", json=RECORDS[0], headers={"Host": host})
            assert r.status_code == 400, host
    with _client(_settings(tmp_path, lake_root=lake, allowed_hosts="*")) as c:
        assert c.get("/health", headers={"Host": "anything.example"}).status_code == 200
    defaults = Settings().allowed_host_list
    assert {"localhost", "127.0.0.1", "api", "dashboard"} <= set(defaults), "local runs and compose names"


def test_model_description(client: TestClient) -> None:
    body = client.get("/model").json()
    assert body["version"] == "1" and body["promotion"] == {"status": "promoted", "reason": "unit test"}
    assert set(body["thresholds"]) == {"full", "structural"}


def test_admin_reload_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with _client(_settings(tmp_path)) as c:
        assert c.post("/admin/reload").status_code == 401
        assert c.post("/admin/reload", headers={"X-API-Key": "wrong"}).status_code == 401
        ok = c.post("/admin/reload", headers={"X-API-Key": "k3y"})
        assert ok.status_code == 200  # registry down: nothing changes, the loaded model stays
        assert ok.json()["changed"] is False and "unreachable" in ok.json()["detail"]
        assert c.post("/predict", json=RECORDS[0]).status_code == 200
    with _client(_settings(tmp_path, api_key=None)) as c:
        assert c.post("/admin/reload", headers={"X-API-Key": "k3y"}).status_code == 403


def test_metrics_use_route_templates(client: TestClient) -> None:
    client.get("/transactions/" + "1" * 64)
    client.post("/predict", json=RECORDS[:3])
    client.get("/no/such/path")
    text = client.get("/metrics").text
    assert 'route="/transactions/{tx_hash}",status="404"' in text
    assert 'route="<unmatched>"' in text
    assert "btc_api_predictions_total" in text and "btc_api_anomaly_score_bucket" in text
    assert 'btc_api_model_info{alias="champion",name="unit-model",version="1"} 1.0' in text
    assert "btc_producer_" not in text
