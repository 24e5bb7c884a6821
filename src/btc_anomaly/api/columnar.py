"""Columnar validation of large arrays of canonical transactions: POST /predict's fast path.

Validating a 1,000-transaction body through the models builds ~5,000 frozen Python objects (each
transaction, input and output) before the Arrow table the feature function reads is built from them,
the largest part of a batch request (bench/RESULTS.md, API section). Here the body is decoded by msgspec into
Structs generated from the models' own field rules (``rules_of`` → ``struct_of``): one strict pass in C
that checks the JSON types, required and nullable fields, unknown keys, integer bounds and literals. The
Structs' fields become Arrow columns (``ColumnarParser``), where patterns and timestamps are checked with
RE2 and the models' validators by ``consistent`` (``COLUMNAR_VALIDATORS`` lists them; a test compares
that list with the models').

The path only ever *accepts*: a body it accepts is one the models accept, with the same values. Whatever
it is not sure about — lax-mode coercions the models allow (``"5"`` or ``5.0`` for 5, ``1`` for true), a
timestamp written as a number — makes it return None, and the caller validates the body through the
models, which give the 422/413 answers with field-level messages. tests/unit/test_api_body.py and
test_api_columnar.py hold both paths to that, on hand-made and generated bodies.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter
from typing import Annotated, Any, Literal

import annotated_types
import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from btc_anomaly.schema import _unwrap

UNSET = msgspec.UNSET

Kind = Literal["int", "str", "bool", "datetime", "literal", "list"]

# RFC 3339 with a "T", at most microseconds, a year from 1900 and valid time fields (no leap second): a
# form pydantic reads for sure. It accepts more (unix numbers, a space separator...): the model path.
_TIMESTAMP = (
    r"^(19|2\d)\d\d-[01]\d-[0-3]\dT([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{1,6})?"
    r"(Z|[+-]([01]\d|2[0-3]):[0-5]\d)?$"
)

# Validators of the canonical models, each re-implemented column-wise by ``consistent``. A test compares
# this list with the models' own, so a rule added to the models cannot be skipped silently here.
COLUMNAR_VALIDATORS = {
    "Transaction": {"_utc", "_consistent"},  # _utc only normalises first_seen, which scoring does not read
    "CanonicalTransaction": {"_utc", "_consistent", "_sizes"},
    "TxInput": set(),
    "TxOutput": set(),
}


@dataclass(frozen=True)
class Rule:
    """What a model accepts for one field, in the terms the columnar checks need."""

    name: str
    kind: Kind
    required: bool  # no default: a missing key is an error
    nullable: bool  # an explicit null is valid
    ge: int | None = None
    le: int | None = None
    pattern: str | None = None
    choices: tuple[str, ...] = ()
    items: tuple[Rule, ...] = ()  # kind "list": the rules of the item model


def rules_of(model: type[BaseModel]) -> tuple[Rule, ...]:
    """The ``Rule`` of each field of ``model``; a field type or constraint the checks do not know raises,
    so a model change shows up in the tests instead of being skipped."""
    return tuple(_rule(name, info) for name, info in model.model_fields.items())


def _rule(name: str, info: FieldInfo) -> Rule:
    annotation, nullable, metadata = _unwrap(info.rebuild_annotation())
    common = {
        "name": name,
        "required": info.is_required(),
        "nullable": nullable,
        **_constraints(name, metadata),
    }
    origin = typing.get_origin(annotation)
    if annotation is bool:  # before int: bool is an int subclass
        return Rule(kind="bool", **common)
    if annotation is int:
        return Rule(kind="int", **common)
    if annotation is str:
        return Rule(kind="str", **common)
    if annotation is dt.datetime:
        return Rule(kind="datetime", **common)
    if origin is Literal and all(isinstance(a, str) for a in typing.get_args(annotation)):
        return Rule(kind="literal", choices=typing.get_args(annotation), **common)
    if origin is list:
        (item,) = typing.get_args(annotation)
        if isinstance(item, type) and issubclass(item, BaseModel):
            return Rule(kind="list", items=rules_of(item), **common)
    raise TypeError(f"{name}: no columnar check for {annotation}")


def _constraints(name: str, metadata: Iterable[Any]) -> dict[str, Any]:
    """A field's constraint metadata (``schema._unwrap``) as Rule keyword arguments."""
    constraints: dict[str, Any] = {}
    for meta in metadata:
        if isinstance(meta, annotated_types.Ge):
            constraints["ge"] = meta.ge
        elif isinstance(meta, annotated_types.Gt):
            constraints["ge"] = meta.gt + 1  # integers only (checked by the kind)
        elif isinstance(meta, annotated_types.Le):
            constraints["le"] = meta.le
        elif isinstance(meta, annotated_types.Lt):
            constraints["le"] = meta.lt - 1
        elif isinstance(pattern := getattr(meta, "pattern", None), str):  # pydantic's Field(pattern=)
            constraints["pattern"] = pattern
        else:
            raise TypeError(f"{name}: no columnar check for the constraint {meta!r}")
    return constraints


# --- the strict decoder --------------------------------------------------------------------------------


def struct_of(name: str, rules: Sequence[Rule]) -> type[msgspec.Struct]:
    """A msgspec Struct that decodes exactly the JSON objects whose keys and values pass ``rules``' kinds,
    bounds, literals and required/nullable semantics, without coercion (msgspec is strict: no ``"5"``,
    ``5.0`` or ``true`` for an integer). Patterns and timestamps are checked on the Arrow columns
    (``ColumnarParser.parse``), with RE2, whose anchors mean what they mean in pydantic's Rust regex (Python's
    ``$`` also matches before a final newline)."""
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for rule in rules:
        kind = _msgspec_type(name, rule)
        if rule.required:
            fields.append((rule.name, kind | None if rule.nullable else kind))
        elif rule.nullable:
            fields.append((rule.name, kind | None, None))
        else:  # a default but no null: a missing key is UNSET, an explicit null an error
            fields.append((rule.name, kind | msgspec.UnsetType, msgspec.UNSET))
    return msgspec.defstruct(name, fields, kw_only=True, forbid_unknown_fields=True, gc=False)


def _msgspec_type(name: str, rule: Rule) -> Any:
    if rule.kind == "int":
        bounds = {k: v for k, v in (("ge", rule.ge), ("le", rule.le)) if v is not None}
        return Annotated[int, msgspec.Meta(**bounds)] if bounds else int
    if rule.kind in ("str", "datetime"):
        return str
    if rule.kind == "bool":
        return bool
    if rule.kind == "literal":
        return Literal[rule.choices]
    return list[struct_of(f"{name}_{rule.name}", rule.items)]  # type: ignore[misc]


# --- the columns ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Columns:
    """A validated body: the hashes in order, and the fields as a table of ``ColumnarParser.schema``."""

    hashes: list[str]
    table: pa.Table


class ColumnarParser:
    """JSON arrays of ``model`` objects → ``Columns`` of ``schema`` (a subset of the model's fields, with
    datetimes as the strings sent), or None when the models must decide."""

    def __init__(self, model: type[BaseModel], schema: pa.Schema, max_items: int) -> None:
        self.rules = rules_of(model)
        self.schema = schema
        self.max_items = max_items
        self._decoder = msgspec.json.Decoder(list[struct_of(model.__name__, self.rules)])  # type: ignore[valid-type]
        self._built = _built_rules(self.rules, schema)

    def parse(self, body: bytes) -> Columns | int | None:
        """``Columns``; the number of items when there are more than ``max_items`` (the caller's 413);
        None when the models must decide (invalid, or valid only in pydantic's lax mode)."""
        try:
            objects = self._decoder.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None
        if not objects:
            return None
        if len(objects) > self.max_items:
            return len(objects)
        try:
            arrays = _arrays(objects, self._built, list(self.schema))
        except (pa.ArrowException, OverflowError):  # an integer beyond int64 (no bound in the model)
            return None
        if arrays is None:
            return None
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        if not consistent(table):
            return None
        return Columns(table.column("hash").to_pylist(), table)


def _built_rules(rules: Sequence[Rule], fields: pa.Schema | pa.StructType) -> list[Rule]:
    """The rules of ``fields``, in their order (a list's item rules likewise, for its struct's fields).
    Refuses fields that leave out one whose pattern or timestamp is checked on Arrow (or a list holding
    one): it would go unchecked."""
    by_name = {r.name: r for r in rules}
    built = {f.name for f in fields}
    for rule in rules:
        if rule.name not in built and _checked_on_arrow(rule):
            raise ValueError(f"{rule.name} is checked on its column: the schema must include it")
    out = []
    for f in fields:
        rule = by_name[f.name]
        if rule.kind == "list":
            rule = dataclasses.replace(rule, items=tuple(_built_rules(rule.items, f.type.value_type)))
        out.append(rule)
    return out


def _checked_on_arrow(rule: Rule) -> bool:
    return (
        rule.pattern is not None
        or rule.kind == "datetime"
        or (rule.kind == "list" and any(map(_checked_on_arrow, rule.items)))
    )


def _arrays(
    objects: Sequence[Any], rules: Sequence[Rule], fields: Sequence[pa.Field]
) -> list[pa.Array] | None:
    """The ``fields`` of decoded Structs as Arrow arrays, or None if a pattern or timestamp fails."""
    n = len(objects)
    if n == 0:
        return [pa.array([], type=f.type) for f in fields]
    get = attrgetter(*(r.name for r in rules))
    values = list(zip(*map(get, objects), strict=True)) if len(rules) > 1 else [tuple(map(get, objects))]
    arrays = []
    for rule, field, column in zip(rules, fields, values, strict=True):
        if rule.kind == "list":
            array = _list_array(rule, field.type, column)
        else:
            data = column if rule.required or rule.nullable else [None if v is UNSET else v for v in column]
            array = pa.array(data, type=field.type)
        if array is None or not _passes(rule, array):
            return None
        arrays.append(array)
    return arrays


def _list_array(rule: Rule, target: pa.ListType, lists: Sequence[list[Any]]) -> pa.Array | None:
    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum(np.fromiter(map(len, lists), np.int32, count=len(lists)), out=offsets[1:])
    item_fields = list(target.value_type)  # rule.items, field by field (_built_rules)
    children = _arrays(list(chain.from_iterable(lists)), rule.items, item_fields)
    if children is None:
        return None
    struct = pa.StructArray.from_arrays(children, fields=item_fields)
    return pa.ListArray.from_arrays(pa.array(offsets), struct, type=target)


def _passes(rule: Rule, array: pa.Array) -> bool:
    """The checks the decoder leaves to Arrow: patterns (RE2) and timestamps (items: ``_list_array``)."""
    if rule.kind == "list" or not _checked_on_arrow(rule):
        return True
    valid = array.drop_null() if array.null_count else array
    if rule.pattern is not None and not pc.all(pc.match_substring_regex(valid, rule.pattern)).as_py():
        return False
    return rule.kind != "datetime" or _timestamps(valid)


def _timestamps(strings: pa.Array) -> bool:
    """Every string is an RFC 3339 timestamp of a real date (the pattern bounds the time fields)."""
    if not pc.all(pc.match_substring_regex(strings, _TIMESTAMP)).as_py():
        return False
    try:
        parsed = pc.strptime(pc.utf8_slice_codeunits(strings, 0, 10), format="%Y-%m-%d", unit="s")
    except pa.ArrowInvalid:
        return False
    # strptime rolls 2021-02-30 over into March 2: a real date keeps its day of the month.
    day = pc.cast(pc.utf8_slice_codeunits(strings, 8, 10), pa.int64())
    return bool(pc.all(pc.equal(pc.day(parsed), day)).as_py())


def consistent(table: pa.Table) -> bool:
    """``Transaction._consistent`` and ``CanonicalTransaction._sizes`` over all rows at once."""

    def col(name: str) -> np.ndarray:
        return table.column(name).to_numpy(zero_copy_only=False)

    inputs = table.column("inputs").combine_chunks()
    outputs = table.column("outputs").combine_chunks()
    n_in = pc.list_value_length(inputs).to_numpy(zero_copy_only=False)
    n_out = pc.list_value_length(outputs).to_numpy(zero_copy_only=False)
    if not (np.array_equal(col("input_count"), n_in) and np.array_equal(col("output_count"), n_out)):
        return False
    # Exact integer sums (satoshi totals can pass 2**53 in float64).
    values = outputs.flatten().field("value").to_numpy(zero_copy_only=False).astype(np.int64)
    sums = np.zeros(table.num_rows, dtype=np.int64)
    np.add.at(sums, pc.list_parent_indices(outputs).to_numpy(zero_copy_only=False), values)
    output_value = col("output_value")
    if not np.array_equal(sums, output_value):
        return False
    fee, input_value = table.column("fee"), table.column("input_value")
    known = ~(
        pc.is_null(fee).to_numpy(zero_copy_only=False)
        | pc.is_null(input_value).to_numpy(zero_copy_only=False)
    )
    fee_i = pc.fill_null(fee, 0).to_numpy(zero_copy_only=False)
    in_i = pc.fill_null(input_value, 0).to_numpy(zero_copy_only=False)
    if (known & ~col("is_coinbase") & (fee_i != in_i - output_value)).any():
        return False
    size, weight, vsize = col("size"), col("weight"), col("vsize")
    return bool(((size <= weight) & (weight <= 4 * size) & (vsize == (weight + 3) // 4)).all())
