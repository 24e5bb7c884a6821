"""Error bodies and handlers: 422 with field-level messages, 413, 503, and a last-resort 500.

Every error body is ``{"detail": ...}``: a string, or for 422 a list of ``{"type", "loc", "msg"}`` where
``loc`` is the path to the offending field (``["body", 3, "outputs", 0, "value"]``). The request's input is
not echoed back: a batch can be megabytes.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

if TYPE_CHECKING:
    from btc_anomaly.api.model_holder import ModelHolder

log = logging.getLogger(__name__)

MAX_ERRORS = 50  # listed per response; the count says how many there were


def json_response(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY),
        status_code=status_code,
        media_type="application/json",
        headers=headers,
    )


class ApiError(StarletteHTTPException):
    """An HTTP error with a ``detail`` body; ``close`` asks the server to drop the connection (unread body)."""

    def __init__(self, status_code: int, detail: Any, *, close: bool = False) -> None:
        super().__init__(
            status_code=status_code, detail=detail, headers={"Connection": "close"} if close else None
        )


class BodyValidationError(Exception):
    """A request body that failed validation; rendered like FastAPI's own 422."""

    def __init__(self, errors: Sequence[dict[str, Any]]) -> None:
        super().__init__(f"{len(errors)} validation errors")
        self.errors = list(errors)


def field_errors(exc: ValidationError, prefix: tuple[str | int, ...] = ("body",)) -> list[dict[str, Any]]:
    return [
        {"type": e["type"], "loc": [*prefix, *e["loc"]], "msg": e["msg"]}
        for e in exc.errors(include_url=False, include_input=False, include_context=False)
    ]


def model_status(holder: ModelHolder) -> str:
    """Why no model is served, for /ready and the 503 bodies: ``holder.status()`` without the registry's
    exception text (URLs, paths, server messages), which the holder logs when it happens."""
    if holder.current is None and holder.last_error is not None and not holder.alias_missing:
        # The holder's own words come first ("model registry unreachable at <uri>: <exception>").
        summary = holder.last_error.split(": ", 1)[0].split(" at ", 1)[0]
        return f"model not loaded: {summary} (details in the API log)"
    return holder.status()


def _error_body(errors: Sequence[dict[str, Any]]) -> dict[str, Any]:
    body: dict[str, Any] = {"detail": list(errors[:MAX_ERRORS])}
    if len(errors) > MAX_ERRORS:
        body["error_count"] = len(errors)
    return body


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> Response:
        errors = [
            {"type": e.get("type"), "loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors()
        ]
        return json_response(_error_body(errors), 422)

    @app.exception_handler(BodyValidationError)
    async def _body_validation(_: Request, exc: BodyValidationError) -> Response:
        return json_response(_error_body(exc.errors), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        return json_response({"detail": exc.detail}, exc.status_code, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        # Last resort only: every known bad input has its own 4xx path (tests/integration/test_api*.py).
        error_id = uuid.uuid4().hex[:12]
        log.exception("unhandled error %s on %s %s", error_id, request.method, request.url.path)
        return json_response({"detail": "internal error", "error_id": error_id}, 500)
