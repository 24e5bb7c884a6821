"""The canonical transaction: the one definition every component reads and writes.

The pydantic models below are the source of truth. The Arrow schema (Delta tables, deltalake readers)
and the Spark StructType (``from_json`` in the stream) are derived from them, so a field added here
appears everywhere. Bump ``SCHEMA_VERSION`` on any change that is not purely additive.

Amounts are integer satoshis. ``fee`` and ``input_value`` (and input ``value``) are null when the
prevouts are unknown, e.g. a raw hex transaction decoded without a prevout lookup.
"""

from __future__ import annotations

import datetime as dt
import types
import typing
from typing import Annotated, Any, Literal

import orjson
import pyarrow as pa
from annotated_types import Ge
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SCHEMA_VERSION = 1

SOURCES = ("rest", "ws", "replay", "block", "rawtx")
Source = Literal["rest", "ws", "replay", "block", "rawtx"]

# Script types, named as Bitcoin Core's `decodescript` does.
SCRIPT_TYPES = (
    "pubkey",
    "pubkeyhash",
    "scripthash",
    "multisig",
    "nulldata",
    "witness_v0_keyhash",
    "witness_v0_scripthash",
    "witness_v1_taproot",
    "witness_unknown",
    "coinbase",
    "nonstandard",
    "unknown",  # prevout script not known (no prevout lookup)
)

Sat = Annotated[int, Field(ge=0, le=21_000_000 * 100_000_000)]
Count = Annotated[int, Field(ge=0)]
TxHash = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class TxInput(_Strict):
    address: str | None = None
    value: Sat | None = None
    script_type: str = "unknown"


class TxOutput(_Strict):
    address: str | None = None
    value: Sat
    script_type: str = "nonstandard"


class Transaction(_Strict):
    schema_version: int = SCHEMA_VERSION
    hash: TxHash
    first_seen: dt.datetime
    block_height: Count | None = None
    version: int
    locktime: Count
    size: Count
    vsize: Count
    weight: Count
    fee: Sat | None = None
    input_count: Count
    output_count: Count
    input_value: Sat | None = None
    output_value: Sat
    is_coinbase: bool
    has_op_return: bool
    is_segwit: bool
    rbf: bool
    inputs: list[TxInput]
    outputs: list[TxOutput]
    source: Source

    @field_validator("first_seen")
    @classmethod
    def _utc(cls, v: dt.datetime) -> dt.datetime:
        # Naive timestamps are taken as UTC; everything is stored in UTC.
        return v.replace(tzinfo=dt.UTC) if v.tzinfo is None else v.astimezone(dt.UTC)

    @model_validator(mode="after")
    def _consistent(self) -> Transaction:
        if self.input_count != len(self.inputs):
            raise ValueError(f"input_count {self.input_count} != {len(self.inputs)} inputs")
        if self.output_count != len(self.outputs):
            raise ValueError(f"output_count {self.output_count} != {len(self.outputs)} outputs")
        if self.output_value != sum(o.value for o in self.outputs):
            raise ValueError("output_value is not the sum of output values")
        if (
            self.fee is not None
            and self.input_value is not None
            and not self.is_coinbase
            and self.fee != self.input_value - self.output_value
        ):
            raise ValueError("fee != input_value - output_value")
        if self.fee is not None and self.fee < 0:
            raise ValueError("fee is negative")
        return self

    # --- JSON ------------------------------------------------------------------------------------
    def to_json_bytes(self) -> bytes:
        return orjson.dumps(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        d = self.model_dump()
        d["first_seen"] = _iso(self.first_seen)
        return d

    @classmethod
    def from_json(cls, data: bytes | str) -> Transaction:
        return cls.model_validate(orjson.loads(data))


class InvalidTransaction(Exception):
    """A record that cannot become a canonical transaction; ``reason`` says why in one line."""

    def __init__(self, reason: str, raw: bytes | str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.raw = raw


def parse_transaction(data: bytes | str | dict[str, Any]) -> Transaction:
    """Validate one record into a Transaction or raise InvalidTransaction with a readable reason."""
    try:
        if isinstance(data, dict):
            return Transaction.model_validate(data)
        return Transaction.from_json(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidTransaction(f"bad JSON: {exc}", data if not isinstance(data, dict) else None) from exc
    except ValidationError as exc:
        raise InvalidTransaction(
            validation_reason(exc), data if not isinstance(data, dict) else None
        ) from exc


# --- event-time bounds --------------------------------------------------------------------------------
# Not part of the model: "now" is the receiver's clock, and a record is judged when it arrives (the API
# scores historical transactions with any first_seen). The producer and the stream check these bounds,
# because event time drives the window watermark: one record dated next year would make every later
# row late (processing/aggregates.py).

FIRST_SEEN_MIN = dt.datetime(2009, 1, 3, tzinfo=dt.UTC)  # day of the genesis block: nothing is older
FIRST_SEEN_TOO_EARLY = "first_seen before 2009-01-03 (the genesis block)"


def first_seen_too_late(max_skew_s: float) -> str:
    return f"first_seen more than {max_skew_s:g} s in the future"


# An ISO 8601 time of day followed by its UTC offset ("Z", "+05:45", "-0500", "+01").
_HAS_OFFSET = r"\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:[Zz]|[+-]\d{2}(?::?\d{2})?)$"


def utc_times(values: Any) -> Any:
    """``first_seen`` values (datetimes, Timestamps, ISO 8601 strings, or a datetime64 column) as a pandas
    Series of UTC Timestamps; naive values are UTC, as the schema says.

    pandas' own ``to_datetime(..., format="ISO8601", utc=True)`` reads a naive string that follows one
    with an offset at that offset (a mixed JSON batch would land rows in the wrong time), so naive
    strings get an explicit "+00:00" first. Arrow's regex finds them: pandas' ``str.contains`` cost more
    than the parse itself, on the API's batches and the trainer's million rows alike."""
    import pandas as pd
    import pyarrow.compute as pc

    series = values if isinstance(values, pd.Series) else pd.Series(values)
    if series.dtype == object or pd.api.types.is_string_dtype(series.dtype):
        series = series.astype("string")
        has_offset = pc.match_substring_regex(pa.array(series, type=pa.string()), _HAS_OFFSET)
        naive = pc.fill_null(pc.invert(has_offset), False)  # a missing value stays missing
        if pc.any(naive).as_py():
            series = series.mask(naive.to_numpy(zero_copy_only=False), series + "+00:00")
    return pd.to_datetime(series, utc=True, format="ISO8601")


def first_seen_error(
    first_seen: dt.datetime, *, max_skew_s: float, now: dt.datetime | None = None
) -> str | None:
    """Why ``first_seen`` is outside [2009-01-03, now + max_skew_s], or None when it is inside."""
    if first_seen < FIRST_SEEN_MIN:
        return FIRST_SEEN_TOO_EARLY
    if first_seen > (now or dt.datetime.now(dt.UTC)) + dt.timedelta(seconds=max_skew_s):
        return first_seen_too_late(max_skew_s)
    return None


def validation_reason(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def _iso(ts: dt.datetime) -> str:
    return ts.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- derived schemas -----------------------------------------------------------------------------

_PA_SCALARS: dict[type, pa.DataType] = {
    str: pa.string(),
    int: pa.int64(),
    bool: pa.bool_(),
    float: pa.float64(),
    dt.datetime: pa.timestamp("us", tz="UTC"),
}


def _unwrap(annotation: Any) -> tuple[Any, bool, list[Any]]:
    """Return (base type, nullable, metadata) for a field annotation."""
    nullable = False
    metadata: list[Any] = []
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation, *meta = typing.get_args(annotation)
            for m in meta:
                metadata.extend(getattr(m, "metadata", [m]))
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:  # every reader of the result assumes one type per field
                raise TypeError(f"unions other than X | None are not supported: {annotation}")
            nullable = nullable or len(args) < len(typing.get_args(annotation))
            annotation = args[0]
        else:
            return annotation, nullable, metadata


def _arrow_type(annotation: Any) -> pa.DataType:
    base, _, _ = _unwrap(annotation)
    origin = typing.get_origin(base)
    if origin is list:
        (item,) = typing.get_args(base)
        return pa.list_(pa.field("element", _arrow_type(item), nullable=False))
    if origin is Literal:
        return pa.string()
    if isinstance(base, type) and issubclass(base, BaseModel):
        return pa.struct(_arrow_fields(base))
    return _PA_SCALARS[base]


def _arrow_fields(model: type[BaseModel]) -> list[pa.Field]:
    fields = []
    for name, info in model.model_fields.items():
        annotation = info.rebuild_annotation()
        _, nullable, _ = _unwrap(annotation)
        fields.append(pa.field(name, _arrow_type(annotation), nullable=nullable))
    return fields


def arrow_schema() -> pa.Schema:
    """Arrow schema of a canonical transaction (nested inputs/outputs as list<struct>)."""
    return pa.schema(_arrow_fields(Transaction))


def non_negative_fields() -> list[str]:
    """Top-level numeric fields that must be >= 0 (for validators that do not run pydantic, e.g. Spark)."""
    out = []
    for name, info in Transaction.model_fields.items():
        _, _, meta = _unwrap(info.rebuild_annotation())
        if any(isinstance(m, Ge) and m.ge == 0 for m in meta):
            out.append(name)
    return out


def required_fields() -> list[str]:
    """Top-level fields that may not be null."""
    return [
        name for name, info in Transaction.model_fields.items() if not _unwrap(info.rebuild_annotation())[1]
    ]


def spark_schema() -> Any:
    """Spark StructType of a canonical transaction, derived from the Arrow schema (needs pyspark)."""
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(arrow_schema())
