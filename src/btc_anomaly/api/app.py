"""The FastAPI application: ``create_app(settings)``; ``btc-anomaly api`` serves it with uvicorn (server.py)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.middleware.trustedhost import TrustedHostMiddleware

from btc_anomaly import __version__ as _package_version
from btc_anomaly.api import errors, routes_lake, routes_ops, routes_predict
from btc_anomaly.api.batcher import Coalescer
from btc_anomaly.api.body import BodyParser
from btc_anomaly.api.context import ApiContext
from btc_anomaly.api.lake import ScoredTable
from btc_anomaly.api.model_holder import ModelHolder
from btc_anomaly.api.prevouts import PrevoutResolver
from btc_anomaly.api.schemas import API_DESCRIPTION, request_schemas
from btc_anomaly.api.telemetry import MetricsMiddleware, multiprocess_dir
from btc_anomaly.config import Settings, get_settings

log = logging.getLogger(__name__)

RELOAD_SIGNAL_NAME = "reload-request"  # in the shared metrics folder, see model_holder.py
GC_GEN0_THRESHOLD = 50_000


def create_app(settings: Settings | None = None, *, watch_model: bool = True) -> FastAPI:
    """The API for ``settings``. ``watch_model=False`` skips the registry thread (tests that set a model)."""
    settings = settings or get_settings()
    shared = multiprocess_dir()
    holder = ModelHolder(settings, reload_signal=Path(shared) / RELOAD_SIGNAL_NAME if shared else None)
    ctx = ApiContext(
        settings=settings,
        holder=holder,
        lake=ScoredTable(settings),
        resolver=PrevoutResolver(settings),
        parser=BodyParser(settings.api_max_batch),
        coalescer=Coalescer(top_k=settings.explain_top_k),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if watch_model:
            holder.start()
            # Serve once the first check has finished, loaded or not: a worker of several that still
            # loads does not take connections (it would answer 503 while its siblings are ready), and a
            # registry that is down only delays start-up by one failed check (then /ready says why).
            await asyncio.to_thread(holder.first_check_done.wait, settings.api_startup_wait_s)
        # Everything imported and loaded so far (pandas, pyarrow, mlflow, the model) lives as long as the
        # process: keep it out of the cyclic GC, whose full collections otherwise walk it all and stall a
        # request now and then (~130 ms p90 on a 1,000-transaction batch, bench_api.py).
        gc.freeze()
        # A 1,000-transaction body parses into ~15,000 containers that all die with the request: at the
        # default gen-0 threshold (700) ~14 young and ~1 older collections walk them while still alive
        # (~0.8 ms a request, measured in the server); at 50,000 one collection every few requests
        # mostly finds them gone. The producer does the same (ingestion/producer.py).
        gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])
        try:
            yield
        finally:
            holder.stop()
            await ctx.resolver.aclose()
            if shared:
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(os.getpid())  # drop this worker's live gauges

    app = FastAPI(
        title="btc-anomaly",
        version=_package_version,
        description=API_DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    errors.install(app)
    # A Host header outside allowed_hosts gets a 400 before any route runs (DNS rebinding: a page on another
    # site that resolves its own name to 127.0.0.1 cannot drive the API from a browser). Added before the
    # metrics middleware, which wraps it: refused requests are counted.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.allowed_host_list or ["*"])
    app.add_middleware(MetricsMiddleware)
    app.include_router(routes_predict.router())
    app.include_router(routes_lake.router(settings))
    app.include_router(routes_ops.router())
    _document_request_bodies(app)
    return app


def create_app_from_env() -> FastAPI:
    """uvicorn factory (``btc_anomaly.api.app:create_app_from_env``): each worker reads Settings from the env."""
    return create_app(Settings())


def _document_request_bodies(app: FastAPI) -> None:
    """Add the hand-parsed request bodies (see body.py) to the OpenAPI components."""
    predict, raw, defs = request_schemas("#/components/schemas/{model}")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in defs.items():
                components.setdefault(name, definition)
            components["PredictRequest"] = predict
            components["RawPredictRequest"] = raw
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
