"""Property-based fuzzing of the OpenAPI schema (schemathesis): no generated request may get a 5xx.

The schema is the app's own (``create_app().openapi()``, what ``/openapi.json`` serves); every generated
request goes over real HTTP to the session's `btc-anomaly api` (uvicorn subprocess, MLflow champion,
Blockchain.com stand-in for prevouts). Schemathesis generates valid and invalid bodies, query strings
and path parameters for every operation, bounded to ``MAX_EXAMPLES`` per operation.

(``schemathesis.pytest.from_fixture`` would load the schema from the running server, but its lazy
loader relies on a pytest internal that pytest 9 removed.)
"""

from __future__ import annotations

import hypothesis
import pytest
import schemathesis

from btc_anomaly.api.app import create_app
from btc_anomaly.config import Settings
from helpers.api_server import ApiServer

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 200

schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi())


@schema.parametrize()
@hypothesis.settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure reproduces
    suppress_health_check=list(hypothesis.HealthCheck),
    database=None,
)
def test_no_server_errors(case: schemathesis.Case, api_server: ApiServer) -> None:
    response = case.call(base_url=api_server.url, timeout=60)
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}"
    )
