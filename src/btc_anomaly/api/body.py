"""Reading and validating request bodies within the byte and batch limits.

``/predict`` and ``/predict/raw`` read their bodies here instead of through FastAPI's body parameters so
that (1) the byte limit applies to what is *streamed*, not only to what Content-Length declares (a client
that sends a chunked body or lies about its length is cut off at the limit), (2) a batch over the count
limit is refused with 413 as soon as the parser counts one item too many, and (3) the JSON is parsed and
validated in one pass by pydantic-core, with errors in one format (``loc`` = position in the batch, field).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError
from starlette.requests import ClientDisconnect, Request

from btc_anomaly.api.errors import ApiError, BodyValidationError, field_errors
from btc_anomaly.api.schemas import ITEM_ADAPTER, PredictItem


async def read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(
            413,
            f"request body of {int(declared):,} bytes exceeds the limit of {max_bytes:,} bytes",
            close=True,
        )
    chunks: list[bytes] = []
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise ApiError(413, f"request body exceeds the limit of {max_bytes:,} bytes", close=True)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "client disconnected before sending the whole body", close=True) from None
    return b"".join(chunks)


class BodyParser:
    """Validators of the two JSON bodies, with the batch limit; one per app (the limit comes from Settings)."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        # max_length makes pydantic-core stop at the first item over the limit (no validation of the rest).
        self.items: TypeAdapter[list[Any]] = TypeAdapter(
            Annotated[list[PredictItem], Field(min_length=1, max_length=max_items)]
        )
        self.raw: TypeAdapter[list[str]] = TypeAdapter(
            Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=max_items)]
        )

    def transactions(self, body: bytes) -> tuple[list[Any], bool]:
        """(validated transactions, whether the body was a single object rather than an array)."""
        if body.lstrip()[:1] == b"[":
            return self._validate(self.items, body, "transactions"), False
        return [self._validate(ITEM_ADAPTER, body, "transactions")], True

    def raw_hexes(self, body: bytes) -> list[str]:
        return self._validate(self.raw, body, "raw transactions")  # type: ignore[no-any-return]

    def _validate(self, adapter: TypeAdapter[Any], body: bytes, what: str) -> Any:
        try:
            return adapter.validate_json(body)
        except ValidationError as exc:
            for e in exc.errors(include_url=False, include_input=False):
                if e["type"] == "too_long" and e["loc"] == ():
                    actual = (e.get("ctx") or {}).get("actual_length")
                    size = f"{actual:,}" if isinstance(actual, int) else "more"
                    raise ApiError(
                        413, f"batch of {size} {what} exceeds the limit of {self.max_items:,}"
                    ) from None
            raise BodyValidationError(field_errors(exc)) from None
