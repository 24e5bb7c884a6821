"""End-to-end checks of the compose smoke test, run INSIDE the api container.

scripts/smoke_compose.sh pipes this file to ``docker exec -i <api> python -``: it sees the stack exactly as
the services do (the Delta volume at /lake, MLflow at mlflow:5000, Prometheus at prometheus:9090, the API
on its own loopback). Exit 0 when every check passes; otherwise print what is missing and exit 1 (the
script retries until its deadline). Standard library + what the api image ships (deltalake, mlflow).
MLflow runs with basic auth: the mlflow client logs in with the api container's MLFLOW_TRACKING_USERNAME
and MLFLOW_TRACKING_PASSWORD, and a request without them must be refused.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import urllib.request

# Prometheus jobs of monitoring/prometheus/prometheus.compose.yml; all must be up.
EXPECTED_JOBS = {"prometheus", "producer", "stream", "trainer", "detect", "api", "dashboard"}
# A real mainnet transaction (tests/fixtures/example_tx_15e10745.hex) in /predict's 8-field form.
EXAMPLE_TX = {
    "hash": "15e10745f15593a899cef391191bdd3d7c12412cc4696b7bcb669d0feadc8521",
    "size": 884,
    "weight": 3536,
    "fee": 20000,
    "inputs_count": 5,
    "outputs_count": 4,
    "input_value": 6013460000,
    "output_value": 6013440000,
}
MIN_LAKE_ROWS = int(os.environ.get("SMOKE_MIN_LAKE_ROWS", "1000"))
# The stream scores every transaction with the champion: scored rows must reach /anomalies.
REQUIRE_SCORED = os.environ.get("SMOKE_REQUIRE_SCORED", "1") == "1"


def http(url: str, body: object | None = None, timeout: float = 10.0) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()[:300]


def lake_rows(table: str) -> int:
    from deltalake import DeltaTable

    lake = os.environ.get("BTC_ANOMALY_LAKE_ROOT", "/lake")
    try:
        return DeltaTable(f"{lake}/{table}").to_pyarrow_dataset().count_rows()
    except Exception:  # not created yet
        return 0


def main() -> int:
    failures: list[str] = []
    report: dict[str, object] = {}

    rows = lake_rows("transactions")
    report["delta transactions rows"] = rows
    if rows < MIN_LAKE_ROWS:
        failures.append(f"lake: {rows} rows in transactions (< {MIN_LAKE_ROWS})")

    from mlflow import MlflowClient

    from btc_anomaly.config import get_settings

    s = get_settings()
    try:
        champion = MlflowClient(s.mlflow_tracking_uri).get_model_version_by_alias(s.model_name, "champion")
        report["champion"] = f"{s.model_name} v{champion.version}"
    except Exception as exc:
        failures.append(f"registry: no champion ({type(exc).__name__})")

    # Basic auth is on: no credentials, no registry.
    status, _ = http(f"{s.mlflow_tracking_uri}/api/2.0/mlflow/registered-models/search")
    report["MLflow without credentials"] = status
    if status != 401:
        failures.append(f"MLflow answered HTTP {status} without credentials (expected 401)")
    # Postgres is on MLflow's private network: the API cannot even resolve it.
    try:
        socket.create_connection(("postgres", 5432), timeout=3).close()
        failures.append("the api container reaches postgres:5432 (it must not)")
    except OSError:
        report["postgres from api"] = "unreachable"

    status, body = http("http://127.0.0.1:5001/predict", EXAMPLE_TX)
    report["POST /predict"] = status
    if status != 200:
        failures.append(f"POST /predict: HTTP {status} {body!r}")
    else:
        report["predict body"] = body

    # The risk score's watchlists ship in the image (not only in a source checkout).
    status, body = http("http://127.0.0.1:5001/rules")
    lists = body.get("watchlists") if isinstance(body, dict) else None
    report["watchlists"] = len(lists) if lists is not None else f"HTTP {status}"
    if not lists:
        failures.append(f"GET /rules: no watchlist loaded (HTTP {status})")

    status, body = http("http://prometheus:9090/api/v1/targets")
    targets = body.get("data", {}).get("activeTargets", []) if isinstance(body, dict) else []
    health = {t["labels"]["job"]: t["health"] for t in targets}
    report["prometheus targets"] = health
    if set(health) != EXPECTED_JOBS or any(h != "up" for h in health.values()):
        failures.append(f"prometheus targets: {health}")

    scored = lake_rows("scored_transactions")
    status, body = http("http://127.0.0.1:5001/anomalies?limit=5")
    report["scored_transactions rows"] = scored
    count = body.get("count") if isinstance(body, dict) else None
    report["GET /anomalies"] = f"HTTP {status}, count {count}"
    if REQUIRE_SCORED and (scored == 0 or not count):
        failures.append(f"scoring: {scored} scored rows, /anomalies HTTP {status}")

    print(json.dumps(report, default=str, indent=1))
    for failure in failures:
        print("NOT YET:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
