"""Columnar validation of large arrays of canonical transactions: POST /predict's fast path.

Validating a 1,000-transaction body through the models builds ~5,000 frozen Python objects (each
transaction, input and output), and even a TypedDict mirror of them still builds every dict through
pydantic-core: ~6 ms of a ~20 ms request, before the Arrow table the feature function reads is built
from those dicts (bench/RESULTS.md, API section). Here the body is parsed once (orjson) and converted
to Arrow with type *inference*, which is a strict JSON type check on the way: an integer field holding a
float (``5.5``, ``5.0``) or a bool, a string field holding a number, a bool holding ``1``, an input that
is not an object, or an object key no model has, comes out as another Arrow type or another column.
The models' field rules (required, nullable, bounds, patterns, literals) are derived from the models
themselves (``rules_of``) and checked column by column; their validators by ``consistent``
(``COLUMNAR_VALIDATORS`` lists them; a test compares that list with the models').

The path only ever *accepts*: a body it accepts is one the models accept, with the same values. Whatever
it is not sure about — lax-mode coercions the models allow (``"5"`` for 5), a key missing from the first
object only, a timestamp written as a number — makes it return None, and the caller validates the body
through the models, which give the 422/413 answers with field-level messages. tests/unit/test_api_body.py
holds both paths to that, on hand-made and generated bodies.
"""

from __future__ import annotations

import datetime as dt
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import annotated_types
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from btc_anomaly.schema import _unwrap

Kind = Literal["int", "str", "bool", "datetime", "literal", "list"]

_ARROW_TYPE: dict[str, pa.DataType] = {
    "int": pa.int64(),
    "str": pa.string(),
    "bool": pa.bool_(),
    "datetime": pa.string(),
    "literal": pa.string(),
}
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


# --- the checks -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Columns:
    """A validated body: the hashes in order, and the fields as a table of ``parse_columns``' schema."""

    hashes: list[str]
    table: pa.Table


def parse_columns(
    body: bytes, rules: Sequence[Rule], schema: pa.Schema, max_items: int
) -> Columns | int | None:
    """``body`` (a JSON array) validated column-wise against ``rules``, as a table of ``schema`` (the
    rules' fields; datetimes as strings): ``Columns``; the number of items when there are more than
    ``max_items`` (the caller's 413); None when the models must decide."""
    try:
        rows = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(rows) is not list or not rows or any(type(r) is not dict for r in rows):
        return None
    if len(rows) > max_items:
        return len(rows)
    # Arrow takes the columns from the first object: every other object must have no key it lacks.
    names = {r.name for r in rules}
    first = set(rows[0])
    if not first <= names or not set().union(*rows) <= first:
        return None
    try:
        inferred = pa.Table.from_pylist(rows)
    except (pa.ArrowException, OverflowError, TypeError, ValueError):
        return None
    columns: list[pa.Array] = []
    for rule in rules:
        present = rule.name in first
        column = inferred.column(rule.name).combine_chunks() if present else None
        checked = _check(rule, column, schema.field(rule.name).type, len(rows), lambda: rows)
        if checked is None:
            return None
        columns.append(checked)
    table = pa.Table.from_arrays(columns, schema=schema)
    if not consistent(table):
        return None
    return Columns(table.column("hash").to_pylist(), table)


_MISSING = object()


Objects = Callable[[], Iterable[dict[str, Any]]]


def _check(
    rule: Rule, column: pa.Array | None, target: pa.DataType, n: int, objects: Objects
) -> pa.Array | None:
    """``column`` (inferred from the ``n`` JSON objects ``objects()`` yields; None = the key is in none of
    them) checked against ``rule``, as ``target``; None if it fails. The objects themselves are read only
    to tell a missing key from an explicit null, where that decides (Arrow makes both null)."""
    if column is None:  # the key is in no object: the default everywhere, if the field has one
        return None if rule.required and n else pa.nulls(n, target)
    if pa.types.is_null(column.type):  # null (or missing) everywhere
        column = pa.nulls(n, target)
    elif rule.kind == "list":
        if not pa.types.is_list(column.type):
            return None
        column = _check_items(rule, column, target, lambda: _items(objects(), rule.name))
        if column is None:
            return None
    elif column.type != _ARROW_TYPE[rule.kind]:
        return None
    if column.null_count and not _nulls_allowed(rule, (o.get(rule.name, _MISSING) for o in objects())):
        return None
    valid = column.drop_null() if column.null_count else column
    if not len(valid):
        return column
    if rule.kind == "int" and (rule.ge is not None or rule.le is not None):
        lo, hi = pc.min_max(valid).values()
        if (rule.ge is not None and lo.as_py() < rule.ge) or (rule.le is not None and hi.as_py() > rule.le):
            return None
    if rule.pattern is not None and not pc.all(pc.match_substring_regex(valid, rule.pattern)).as_py():
        return None
    if rule.kind == "literal" and not pc.all(pc.is_in(valid, value_set=pa.array(rule.choices))).as_py():
        return None
    if rule.kind == "datetime" and not _timestamps(valid):
        return None
    return column


def _nulls_allowed(rule: Rule, values: Iterable[Any]) -> bool:
    """Whether the nulls of a column are valid; ``values``: the raw value per object (or ``_MISSING``)."""
    if not rule.required and rule.nullable:
        return True
    if rule.required and not rule.nullable:
        return False
    if rule.required:  # nullable but required: each null must be an explicit one
        return not any(v is _MISSING for v in values)
    return not any(v is None for v in values)  # has a default: each null must be a missing key


def _items(objects: Iterable[dict[str, Any]], name: str) -> Iterable[dict[str, Any]]:
    """The items of every object's ``name`` list (dicts: the inferred Arrow type said so)."""
    for o in objects:
        yield from o.get(name) or ()


def _check_items(rule: Rule, column: pa.Array, target: pa.DataType, items: Objects) -> pa.Array | None:
    """A ``list<struct>`` column (of the list items ``items()`` yields) against the item model's rules,
    rebuilt as ``target``."""
    if column.offset:
        column = pa.concat_arrays([column])  # offsets from 0, values exactly the listed items
    values = column.values
    if not pa.types.is_struct(values.type) and not pa.types.is_null(values.type):
        return None
    if values.null_count:  # a null item (``[null]``): never valid
        return None
    present = {f.name for f in values.type} if pa.types.is_struct(values.type) else set()
    if not present <= {r.name for r in rule.items}:
        return None  # a key the item model does not have
    item_type = target.value_type
    children = []
    for sub in rule.items:
        field = values.field(sub.name) if sub.name in present else None
        checked = _check(sub, field, item_type.field(sub.name).type, len(values), items)
        if checked is None:
            return None
        children.append(checked)
    struct = pa.StructArray.from_arrays(children, fields=[item_type.field(r.name) for r in rule.items])
    mask = column.is_null() if column.null_count else None
    return pa.ListArray.from_arrays(column.offsets, struct, type=target, mask=mask)


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
