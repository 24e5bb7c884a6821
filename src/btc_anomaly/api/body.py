"""Reading and validating request bodies within the byte and batch limits.

``/predict`` and ``/predict/raw`` read their bodies here instead of through FastAPI's body parameters so
that (1) the byte limit applies to what is *streamed*, not only to what Content-Length declares (a client
that sends a chunked body or lies about its length is cut off at the limit), (2) a batch over the count
limit is refused with 413 as soon as the parser counts one item too many, and (3) the JSON is parsed and
validated in one pass by pydantic-core, with errors in one format (``loc`` = position in the batch, field).

Large arrays of canonical transactions take a columnar fast path (``canonical_batch``): pydantic-core
validates the whole body into plain dicts against a TypedDict mirror of ``CanonicalTransaction`` (same
fields, types and constraints, generated from the model so they cannot drift), the model validators'
cross-field rules are checked with NumPy on the Arrow table built from those dicts, and the batch goes to
the feature function as that table. Building a frozen model per transaction, input and output is what
made a 1,000-transaction body cost ~13 ms of validation (bench/RESULTS.md, API section); the mirror costs
about half. Any failure on the fast path re-validates the body through the models, so a bad body gets
exactly the same 413/422 answer (field-level ``loc`` and messages) as before.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, NotRequired

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.requests import ClientDisconnect, Request
from typing_extensions import TypedDict

from btc_anomaly.api.errors import ApiError, BodyValidationError, field_errors
from btc_anomaly.api.inference import INPUT_SCHEMA, CanonicalBatch
from btc_anomaly.api.schemas import ITEM_ADAPTER, CanonicalTransaction, PredictItem

# Arrays from this many bytes (~40 canonical transactions) take the columnar path; below it the models'
# per-item cost is small and the coalescer (batcher.py) merges model items of concurrent requests.
FAST_PATH_MIN_BYTES = 32 * 1024
# Keys only the 8-field body has: such bodies (or mixed ones) stay on the model path.
_SUMMARY_KEYS = (b'"inputs_count"', b'"outputs_count"')


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

        # The columnar path's validator: same limits, canonical items only, plain dicts out.
        self.canonical: TypeAdapter[list[dict[str, Any]]] = TypeAdapter(
            Annotated[
                list[typed_dict_mirror(CanonicalTransaction)],  # type: ignore[misc]
                Field(min_length=1, max_length=max_items),
            ]
        )

    def transactions(self, body: bytes) -> tuple[list[Any] | CanonicalBatch, bool]:
        """(validated transactions, whether the body was a single object rather than an array).

        Large arrays of canonical transactions come back as one ``CanonicalBatch`` (columnar), everything
        else as a list of validated models."""
        if body.lstrip()[:1] == b"[":
            if len(body) >= FAST_PATH_MIN_BYTES and not any(k in body for k in _SUMMARY_KEYS):
                batch = self.canonical_batch(body)
                if batch is not None:
                    return batch, False
            return self._validate(self.items, body, "transactions"), False
        return [self._validate(ITEM_ADAPTER, body, "transactions")], True

    def canonical_batch(self, body: bytes) -> CanonicalBatch | None:
        """The columnar fast path; None when the body fails any rule (the caller re-validates it through
        the models, which produce the error messages)."""
        try:
            rows = self.canonical.validate_json(body)
        except ValidationError as exc:
            # Over the batch limit: the same 413 as the model path, without parsing the body twice.
            if (too_many := self._too_many(exc, "transactions")) is not None:
                raise too_many from None
            return None
        table = pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)
        if not _consistent(rows, table):
            return None
        return CanonicalBatch([r["hash"] for r in rows], table)

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


# --- the columnar path's rules --------------------------------------------------------------------------

# Validators of the canonical models, all re-implemented column-wise by ``_consistent``. A test compares
# this list with the models' own, so a rule added to the models cannot be skipped silently here.
COLUMNAR_VALIDATORS = {
    "Transaction": {"_utc", "_consistent"},  # _utc only normalises first_seen, which scoring does not read
    "CanonicalTransaction": {"_utc", "_consistent", "_sizes"},
    "TxInput": set(),
    "TxOutput": set(),
}


def _consistent(rows: list[dict[str, Any]], table: pa.Table) -> bool:
    """``Transaction._consistent`` and ``CanonicalTransaction._sizes`` over all rows at once."""
    n = table.num_rows

    def col(name: str) -> np.ndarray:
        return table.column(name).to_numpy(zero_copy_only=False)

    inputs = table.column("inputs").combine_chunks()
    outputs = table.column("outputs").combine_chunks()
    n_in = pc.list_value_length(inputs).to_numpy(zero_copy_only=False)
    n_out = pc.list_value_length(outputs).to_numpy(zero_copy_only=False)
    declared_in = np.fromiter((r["input_count"] for r in rows), np.int64, n)
    declared_out = np.fromiter((r["output_count"] for r in rows), np.int64, n)
    if not (np.array_equal(declared_in, n_in) and np.array_equal(declared_out, n_out)):
        return False
    # Exact integer sums (satoshi totals can pass 2**53 in float64).
    values = outputs.flatten().field("value").to_numpy(zero_copy_only=False).astype(np.int64)
    sums = np.zeros(n, dtype=np.int64)
    np.add.at(sums, pc.list_parent_indices(outputs).to_numpy(zero_copy_only=False), values)
    output_value = col("output_value").astype(np.int64)
    if not np.array_equal(sums, output_value):
        return False
    fee = table.column("fee")
    input_value = table.column("input_value")
    coinbase = np.fromiter((r["is_coinbase"] for r in rows), bool, n)
    known = ~(
        pc.is_null(fee).to_numpy(zero_copy_only=False)
        | pc.is_null(input_value).to_numpy(zero_copy_only=False)
    )
    fee_i = pc.fill_null(fee, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    in_i = pc.fill_null(input_value, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    if (known & ~coinbase & (fee_i != in_i - output_value)).any():
        return False
    size, weight, vsize = (
        col("size").astype(np.int64),
        col("weight").astype(np.int64),
        col("vsize").astype(np.int64),
    )
    return bool(((size <= weight) & (weight <= 4 * size) & (vsize == (weight + 3) // 4)).all())


def typed_dict_mirror(model: type[BaseModel], _cache: dict[type, Any] | None = None) -> Any:
    """A TypedDict with ``model``'s fields, types and constraints (nested models mirrored too).

    Fields with a default are ``NotRequired`` (a missing key stays missing; the Arrow conversion makes it
    null, which features.py reads like the models' defaults). Model and field validators are not carried
    over: ``_consistent`` checks them column-wise (see ``COLUMNAR_VALIDATORS``)."""
    cache = {} if _cache is None else _cache
    if model in cache:
        return cache[model]
    annotations: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        annotation = _mirror_annotation(info.rebuild_annotation(), cache)
        annotations[name] = annotation if info.is_required() else NotRequired[annotation]
    extra = model.model_config.get("extra")
    td = TypedDict(f"{model.__name__}Dict", annotations)  # type: ignore[operator]
    td.__pydantic_config__ = ConfigDict(extra=extra or "ignore", strict=model.model_config.get("strict"))  # type: ignore[attr-defined]
    cache[model] = td
    return td


def _mirror_annotation(annotation: Any, cache: dict[type, Any]) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return typed_dict_mirror(annotation, cache)
    origin = typing.get_origin(annotation)
    if origin is None:
        return annotation
    args = typing.get_args(annotation)
    if origin is Annotated:
        return Annotated[(_mirror_annotation(args[0], cache), *annotation.__metadata__)]  # type: ignore[misc]
    if origin is list:
        return list[_mirror_annotation(args[0], cache)]  # type: ignore[misc]
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(_mirror_annotation(a, cache) for a in args)]  # noqa: UP007
    return annotation
