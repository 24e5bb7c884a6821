"""GET /health, /ready, /model, /metrics and POST /admin/reload."""

from __future__ import annotations

import hmac
import logging
import os
import time
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.security import APIKeyHeader
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from btc_anomaly.api.context import context
from btc_anomaly.api.errors import ApiError, json_response, model_status
from btc_anomaly.api.model_holder import promotion_info
from btc_anomaly.api.schemas import ErrorDetail, Health, ModelDescription, Readiness, ReloadResult
from btc_anomaly.api.telemetry import render_metrics
from btc_anomaly.model.scoring import describe

log = logging.getLogger(__name__)

# What /ready shows of the lake's status: no paths, no exception text (both go to the log).
_LAKE_PUBLIC = ("reachable", "table_exists", "table_version")

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="BTC_ANOMALY_API_KEY")


def router() -> APIRouter:
    r = APIRouter(tags=["operations"])

    @r.get("/health", response_model=Health, summary="Liveness: the process answers")
    async def health(request: Request) -> Response:
        ctx = context(request)
        return json_response(
            {"status": "ok", "pid": os.getpid(), "uptime_s": round(time.monotonic() - ctx.started_at, 3)}
        )

    @r.get(
        "/ready",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "Not ready; `missing` says why."}},
        summary="Readiness: a model is loaded and the Delta lake is reachable",
    )
    def ready(request: Request) -> Response:
        # Load balancers and anyone who can reach the port read this: it says what is missing, never
        # where (paths, registry URL) or the upstream's own words; the log has those.
        ctx = context(request)
        holder = ctx.holder
        served = holder.current
        status = model_status(holder)
        model: dict[str, Any] = {
            "status": status,
            "alias": holder.alias,
            "last_check_at": holder.last_check_at,
            "last_check_failed": holder.last_error is not None,
        }
        if served is not None:
            model.update(name=served.model.name, version=served.model.version)
        details = ctx.lake.status()
        lake = {k: details[k] for k in _LAKE_PUBLIC if k in details}
        missing = []
        if served is None:
            missing.append(status)
        if not details["reachable"]:
            missing.append("the Delta lake is not reachable (its path is in the API log)")
            _log_once("Delta lake %s is not reachable", details.get("root"))
        if "table_error" in details:
            lake["table_error"] = "the scored table cannot be read (details in the API log)"
            _log_once("scored table %s cannot be read: %s", details.get("table"), details["table_error"])
        body = {"ready": not missing, "model": model, "lake": lake, "missing": missing}
        return json_response(body, 200 if not missing else 503)

    @r.get(
        "/model",
        response_model=ModelDescription,
        responses={503: {"model": ErrorDetail, "description": "No model loaded."}},
        summary="The model being served: version, training, promotion",
    )
    async def model(request: Request) -> Response:
        served = context(request).served()
        info = describe(served.model)
        body = {
            "name": info["name"],
            "version": info["version"],
            "alias": info["alias"],
            "run_id": info["run_id"],
            "loaded_at": info["loaded_at"],
            "trained_at": info["trained_at"],
            "metrics": info["metrics"],
            "params": info["params"],
            "thresholds": info["thresholds"],
            "features": info["features"],
            "promotion": promotion_info(served.tags),
            "description": served.description,
        }
        return json_response(body)

    @r.get("/metrics", summary="Prometheus metrics of every worker", response_class=Response)
    def metrics() -> Response:
        payload, content_type = render_metrics()
        return Response(payload, media_type=content_type)

    @r.post(
        "/admin/reload",
        response_model=ReloadResult,
        responses={
            401: {"model": ErrorDetail, "description": "X-API-Key missing or wrong."},
            403: {
                "model": ErrorDetail,
                "description": "No BTC_ANOMALY_API_KEY configured: endpoint disabled.",
            },
        },
        summary="Check the alias now and load the version it points to",
        description="Runs the reload check in this worker (load off the request path of other requests, then "
        "one atomic swap) and signals the other workers, which follow within a second. `force` reloads even "
        "when the alias did not move.",
    )
    async def reload(
        request: Request,
        api_key: Annotated[str | None, Depends(api_key_header)] = None,
        force: Annotated[bool, Query(description="Reload even if the version is unchanged.")] = False,
    ) -> Response:
        ctx = context(request)
        configured = ctx.settings.api_key.get_secret_value() if ctx.settings.api_key is not None else ""
        if not configured:
            raise ApiError(403, "admin endpoints are disabled: set BTC_ANOMALY_API_KEY")
        if api_key is None or not hmac.compare_digest(
            api_key.encode("utf-8", "surrogateescape"), configured.encode("utf-8", "surrogateescape")
        ):
            raise ApiError(401, "missing or wrong X-API-Key")
        result = await run_in_threadpool(ctx.holder.check, force)
        ctx.holder.signal_workers(force)
        return json_response(asdict(result))

    return r


_last_logged: dict[str, str] = {}


def _log_once(message: str, *args: object) -> None:
    """A warning when a /ready problem appears or changes, not on every probe (every few seconds)."""
    text = message % args
    if _last_logged.get(message) != text:
        _last_logged[message] = text
        log.warning("/ready: %s", text)
