"""`btc-anomaly api` over real HTTP, serving a champion trained on the sample in a real MLflow registry."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import httpx
import orjson
import pandas as pd
import pytest
from deltalake import DeltaTable

from btc_anomaly.config import Settings
from btc_anomaly.features import FEATURES_PREVOUT
from btc_anomaly.model.scoring import load_champion, score_frame
from helpers.api_server import (
    FIXTURES,
    ApiServer,
    coinbase_hex,
    core_invalid_vectors,
    core_valid_vectors,
    historical_cases,
    sample_records,
    summary_body,
)

pytestmark = pytest.mark.integration

RECORDS = sample_records()
TX_HEX = (FIXTURES / "example_tx_15e10745.hex").read_text().strip()


@pytest.fixture(scope="module")
def http(api_server: ApiServer) -> httpx.Client:
    with httpx.Client(base_url=api_server.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def expected(champion_settings: Settings) -> pd.DataFrame:
    """The model engineer's scoring of the whole sample with the same champion, loaded independently."""
    return score_frame(
        pd.DataFrame(RECORDS), load_champion(champion_settings), explain="all", settings=champion_settings
    )


def test_ready_and_model(http: httpx.Client, champion_settings: Settings) -> None:
    ready = http.get("/ready").json()
    assert ready["ready"] and ready["missing"] == []
    assert ready["model"]["name"] == champion_settings.model_name and ready["model"]["version"] == "1"
    assert ready["lake"]["table_exists"]
    model = http.get("/model").json()
    assert model["version"] == "1" and model["alias"] == "champion"
    assert model["promotion"]["status"] == "promoted"
    assert model["promotion"]["reason"].startswith("all") and "checks passed" in model["promotion"]["reason"]
    assert model["trained_at"] and model["metrics"]["rows"] == 5274
    assert "PROMOTED" in model["description"]


def test_scores_equal_the_stream_scoring(http: httpx.Client, expected: pd.DataFrame) -> None:
    one = http.post("/predict", json=RECORDS[42]).json()
    assert one["anomaly_score"] == expected["anomaly_score"][42]
    assert [r["text"] for r in one["reasons"]] == list(expected["reasons"][42])
    batch = http.post("/predict", json=RECORDS[:1000], params={"explain": "all"}).json()
    assert [p["anomaly_score"] for p in batch] == expected["anomaly_score"][:1000].tolist()
    assert [p["is_anomaly"] for p in batch] == expected["is_anomaly"][:1000].tolist()
    assert [p["model_kind"] for p in batch] == list(expected["model_kind"][:1000])
    assert [[r["text"] for r in p["reasons"]] for p in batch] == [list(r) for r in expected["reasons"][:1000]]


def test_summary_body_and_threshold(http: httpx.Client, expected: pd.DataFrame) -> None:
    r = http.post("/predict", json=summary_body(RECORDS[7]))
    assert r.status_code == 200
    body = r.json()
    assert body["model_kind"] == "full" and "output_hhi" in body["missing_features"]
    assert 0 < body["anomaly_score"] <= 1
    low = http.post("/predict", json=RECORDS[:200], params={"threshold": 0.45, "explain": "none"}).json()
    assert [p["anomaly_score"] for p in low] == expected["anomaly_score"][:200].tolist()
    assert [p["is_anomaly"] for p in low] == (expected["anomaly_score"][:200] > 0.45).tolist()


def test_raw_transactions(http: httpx.Client) -> None:
    cases = historical_cases()
    valid = [TX_HEX, coinbase_hex(), *(c["transaction"] for c in cases), *core_valid_vectors(10)]
    invalid = ["", "zz", TX_HEX[:-2], TX_HEX + "00", "0" * 7, *core_invalid_vectors(200)]
    r = http.post("/predict/raw", json=[h for h in valid if h] + [h for h in invalid if h])
    assert r.status_code == 200
    out = r.json()
    by_valid = [o["valid"] for o in out]
    assert by_valid[: len(valid)] == [True] * len(valid)
    assert out[1]["summary"]["is_coinbase"] and out[1]["model_kind"] == "structural"
    for item in out[2 : 2 + len(cases)]:  # segwit and taproot, parents served by the Blockchain.com stand-in
        assert item["summary"]["is_segwit"] and item["model_kind"] == "full"
        assert item["prevouts"]["resolved"] == item["prevouts"]["inputs"] and item["missing_features"] == []
    assert out[0]["model_kind"] == "structural" and out[0]["missing_features"] == FEATURES_PREVOUT
    assert "not found" in out[0]["prevouts"]["error"]
    rejected = [o for o in out if not o["valid"]]
    assert len(rejected) >= 4 and all(o["reason"] for o in rejected)
    assert http.post("/predict/raw", json=[""]).status_code == 422
    assert http.post("/predict/raw", json={"hex": TX_HEX}).status_code == 422


def test_lake_endpoints(http: httpx.Client, champion_settings: Settings) -> None:
    table = DeltaTable(str(champion_settings.lake_table("scored_transactions"))).to_pandas()
    flagged = table[table["is_anomaly"]].sort_values("scored_at").drop_duplicates("hash", keep="last")
    page = http.get("/anomalies", params={"limit": 1000}).json()
    assert page["count"] == len(flagged)
    assert [i["hash"] for i in page["items"]] == list(
        flagged.sort_values(["anomaly_score", "hash"], ascending=[False, True])["hash"]
    )
    top = page["items"][0]
    found = http.get(f"/transactions/{top['hash']}").json()
    assert found["scorings"] == 2 and found["scored_at"] == top["scored_at"]
    assert found["scored_at"] == flagged["scored_at"].max().isoformat().replace("+00:00", "Z")
    assert http.get("/transactions/" + "f" * 64).status_code == 404
    assert http.get("/transactions/not-a-hash").status_code == 422


def test_limits_are_413(http: httpx.Client, api_server: ApiServer) -> None:
    over = http.post("/predict", json=[summary_body(RECORDS[0])] * 10_001)
    assert over.status_code == 413 and "10,001" in over.json()["detail"]

    def chunked():  # no Content-Length: the server can only count
        for _ in range(1000):
            yield b" " * 10_000

    r = http.post("/predict", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413

    # Declared too big: refused before the body is sent (the request carries no body at all).
    reply = _raw_request(
        api_server.port,
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000000\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 413")

    # Declared small, sent big: the app sees only what was declared; the rest is not a request.
    body = orjson.dumps(RECORDS[:2000])
    reply = _raw_request(
        api_server.port,
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        + body,
    )
    # uvicorn answers 400 for the bytes after the declared body (not a request), or the app 422 for the
    # 100-byte prefix, whichever comes first; never more than the declared bytes reach the app.
    assert reply.startswith((b"HTTP/1.1 400", b"HTTP/1.1 422"))
    assert http.get("/health").status_code == 200


def test_too_many_inputs_and_outputs_is_413_over_http(http: httpx.Client) -> None:
    """Five physically possible 8-field bodies (4 MB each, the most outputs that fit) declare ~2.2M outputs:
    over api_max_batch_ios (2,000,000): refused before any scoring, the server answers on."""
    most = (4_000_000 - 10 - 41) // 9  # schemas: MIN_TX_BYTES, one input, MIN_OUTPUT_BYTES each
    huge = summary_body(RECORDS[0]) | {"size": 4_000_000, "weight": 4_000_000, "outputs_count": most}
    r = http.post("/predict", json=[huge] * 5)
    assert r.status_code == 413, r.text[:300]
    assert "inputs + outputs" in r.json()["detail"] and "2,000,000" in r.json()["detail"]
    assert http.get("/health").status_code == 200


def _raw_request(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
        return s.recv(65536)


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 10_000 + b"]" * 10_000,
        b'{"hash": 1e400}',
        b"[NaN]",
        b'{"size": 99999999999999999999999999999999}',
        '{"hash": "\u0000\u2028\ud7ff"}'.encode(),
        b"\xff\xfe\x00",
        b"null",
        b'[[], {}, null, 1, "x"]',
        orjson.dumps([dict(RECORDS[0], outputs=[{"value": 2**63}])]),
        orjson.dumps(summary_body(RECORDS[0]) | {"outputs_count": 10**12}),
    ],
)
def test_hostile_bodies_are_4xx(http: httpx.Client, body: bytes) -> None:
    for path in ("/predict", "/predict/raw"):
        r = http.post(path, content=body, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text[:300])


def test_admin_reload(http: httpx.Client) -> None:
    assert http.post("/admin/reload").status_code == 401
    assert http.post("/admin/reload", headers={"X-API-Key": "nope"}).status_code == 401
    r = http.post("/admin/reload", params={"force": "true"}, headers={"X-API-Key": "test-admin-key"})
    assert r.status_code == 200 and r.json() == {
        "changed": True,
        "previous_version": "1",
        "version": "1",
        "detail": "loaded v1",
    }
    assert http.post("/predict", json=RECORDS[0]).status_code == 200


def test_metrics(http: httpx.Client) -> None:
    http.get("/transactions/" + "e" * 64)
    text = http.get("/metrics").text
    assert 'btc_api_requests_total{method="GET",route="/transactions/{tx_hash}",status="404"}' in text
    assert 'btc_api_requests_total{method="POST",route="/predict",status="200"}' in text
    assert 'btc_api_predictions_total{label="anomaly",model_kind="full"}' in text
    assert "btc_api_anomaly_score_bucket" in text and "btc_api_request_duration_seconds_bucket" in text
    assert 'btc_api_model_reloads_total{result="success"}' in text
    assert "btc_api_model_info{" in text and "btc_producer" not in text


def test_openapi_documents_the_scoring(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    post = spec["paths"]["/predict"]["post"]
    assert "1 - contamination" in post["description"] and "fee market" in post["description"]
    assert "median" in post["description"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/PredictRequest"
    }
    assert {"SummaryTransaction", "CanonicalTransaction"} <= set(spec["components"]["schemas"])
    assert "403" in spec["paths"]["/admin/reload"]["post"]["responses"]


def test_log_has_no_tracebacks(api_server: ApiServer) -> None:
    assert "Traceback" not in Path(api_server.log_path).read_text(errors="replace")
