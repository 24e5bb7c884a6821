"""Reading and validating request bodies within the byte and batch limits.

``/predict`` and ``/predict/raw`` read their bodies here instead of through FastAPI's body parameters so
that (1) the byte limit applies to what is *streamed*, not only to what Content-Length declares (a client
that sends a chunked body or lies about its length is cut off at the limit), (2) a batch over the count
limit is refused with 413 as soon as the parser counts one item too many, and (3) the JSON is parsed and
validated in one pass by pydantic-core, with errors in one format (``loc`` = position in the batch, field).

Large arrays of canonical transactions take a columnar fast path (``canonical_batch``, columnar.py):
the body is decoded by a strict decoder generated from ``CanonicalTransaction``'s rules into the Arrow
columns the feature function reads, without a pydantic model per transaction, input and output. Whatever
the fast path does not accept is validated through the models, so a bad body gets exactly the same
413/422 answer (field-level ``loc`` and messages) either way.
"""

from __future__ import annotations

from typing import Annotated, Any

import pyarrow as pa
from pydantic import Field, TypeAdapter, ValidationError
from starlette.requests import ClientDisconnect, Request

from btc_anomaly.api.columnar import ColumnarParser
from btc_anomaly.api.errors import ApiError, BodyValidationError, field_errors
from btc_anomaly.api.inference import CanonicalBatch
from btc_anomaly.api.schemas import ITEM_ADAPTER, CanonicalTransaction, PredictItem
from btc_anomaly.features import INPUT_COLUMNS
from btc_anomaly.schema import arrow_schema

# Arrays from this many bytes (~40 canonical transactions) take the columnar path; below it the models'
# per-item cost is small and the coalescer (batcher.py) merges model items of concurrent requests. An
# 8-field body leaves the columnar decoder at its first object (a key the canonical model does not have).
FAST_PATH_MIN_BYTES = 32 * 1024
# The columns the fast path builds: what the feature function reads, the hash for the response, and what
# the checks read (the timestamp's format, the models' consistency rules).
_FAST_PATH_COLUMNS = (
    "hash",
    "first_seen",
    "input_count",
    "output_count",
    "is_coinbase",
    *INPUT_COLUMNS,
)


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

        # Datetimes stay the strings sent (checked, not converted: scoring does not read first_seen).
        full = arrow_schema()
        schema = pa.schema(
            [
                full.field(c).with_type(pa.string()) if c == "first_seen" else full.field(c)
                for c in _FAST_PATH_COLUMNS
            ]
        )
        self.columnar = ColumnarParser(CanonicalTransaction, schema, max_items)

    def transactions(self, body: bytes) -> tuple[list[Any] | CanonicalBatch, bool]:
        """(validated transactions, whether the body was a single object rather than an array).

        Large arrays of canonical transactions come back as one ``CanonicalBatch`` (columnar), everything
        else as a list of validated models."""
        if body.lstrip()[:1] == b"[":
            if len(body) >= FAST_PATH_MIN_BYTES:
                batch = self.canonical_batch(body)
                if batch is not None:
                    return batch, False
            return self._validate(self.items, body, "transactions"), False
        if len(body) >= FAST_PATH_MIN_BYTES:
            # One huge transaction (thousands of inputs): the models build an object per input in one
            # call that holds the GIL for ~100 ms, stalling the event loop even from a worker thread.
            batch = self.canonical_batch(b"[" + body + b"]")
            if batch is not None:
                return batch, True
        return [self._validate(ITEM_ADAPTER, body, "transactions")], True

    def canonical_batch(self, body: bytes) -> CanonicalBatch | None:
        """The columnar fast path (columnar.py); None when the models must decide (and give the errors)."""
        columns = self.columnar.parse(body)
        if isinstance(columns, int):  # over the batch limit: the model path's 413, without parsing twice
            raise ApiError(413, f"batch of {columns:,} transactions exceeds the limit of {self.max_items:,}")
        if columns is None:
            return None
        return CanonicalBatch(columns.hashes, columns.table.select(INPUT_COLUMNS))

    def raw_hexes(self, body: bytes) -> list[str]:
        return self._validate(self.raw, body, "raw transactions")  # type: ignore[no-any-return]

    def _validate(self, adapter: TypeAdapter[Any], body: bytes, what: str) -> Any:
        try:
            return adapter.validate_json(body)
        except ValidationError as exc:
            if (too_many := self._too_many(exc, what)) is not None:
                raise too_many from None
            raise BodyValidationError(field_errors(exc)) from None

    def _too_many(self, exc: ValidationError, what: str) -> ApiError | None:
        """The 413 for a body whose array is over the batch limit, if that is what ``exc`` says."""
        for e in exc.errors(include_url=False, include_input=False):
            if e["type"] == "too_long" and e["loc"] == ():
                actual = (e.get("ctx") or {}).get("actual_length")
                size = f"{actual:,}" if isinstance(actual, int) else "more"
                return ApiError(413, f"batch of {size} {what} exceeds the limit of {self.max_items:,}")
        return None
