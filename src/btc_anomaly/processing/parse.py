"""Kafka records → canonical transaction columns + the reasons a record is not a valid transaction.

Everything here is Spark SQL expressions (no Python UDF): a Python round trip per record would cost more
than the rest of the stream together. The rules are derived from schema.py so a field added or
constrained there is parsed and checked here without an edit:

* the JSON schema is ``schema.spark_schema()`` plus a corrupt-record column: Spark's ``from_json`` keeps
  the fields it could convert (partial results) and sets that column when any value had the wrong type;
* required fields come from ``schema.required_fields()`` (a missing field with a model default, e.g.
  ``schema_version``, takes the default, as pydantic does), ``>= 0`` from ``schema.non_negative_fields()``,
  upper bounds, the hash pattern and literal choices from the pydantic field metadata, and the same
  rules for the elements of ``inputs`` / ``outputs`` from their models;
* the cross-field rules mirror ``Transaction._consistent`` (the one part written twice: a pydantic
  model validator cannot be turned into SQL mechanically).

A record is valid when its ``errors`` array is empty. Deliberate differences from
``schema.parse_transaction``:

* unknown fields are ignored, not rejected (tolerant reader): schema.py evolves additively without a
  version bump, so a newer producer's extra field must not quarantine every message of an older
  stream; it is also 15 % of the parse cost (a second pass over each JSON document for its keys);
* numbers or booleans sent as JSON strings (``"5"``, ``"yes"``) are a wrong type here (the producer
  never sends them; pydantic's lax mode would coerce), while a JSON number where a string is expected
  is taken as its text (Spark's JSON reader does so; pydantic would reject it);
* an explicit ``null`` for a defaulted field takes the default.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from annotated_types import Ge, Le
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from btc_anomaly.schema import (
    FIRST_SEEN_MIN,
    FIRST_SEEN_TOO_EARLY,
    Transaction,
    _unwrap,
    first_seen_too_late,
    non_negative_fields,
    required_fields,
    spark_schema,
)

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

CORRUPT = "_corrupt_record"
ERRORS = "errors"
KAFKA_COLUMNS = ("key", "value", "topic", "partition", "offset", "timestamp")


@dataclass(frozen=True)
class FieldRule:
    """What the pydantic model says about one field, in the terms the SQL checks need."""

    name: str
    required: bool  # not nullable
    default: Any  # PydanticUndefined when the field has no default
    ge: int | None
    le: int | None
    pattern: str | None
    choices: tuple[str, ...] | None
    item_model: type[BaseModel] | None  # list[Model] fields: the element model


def field_rules(model: type[BaseModel]) -> Iterator[FieldRule]:
    for name, info in model.model_fields.items():
        base, nullable, meta = _unwrap(info.rebuild_annotation())
        ge = next((m.ge for m in meta if isinstance(m, Ge)), None)
        le = next((m.le for m in meta if isinstance(m, Le)), None)
        pattern = next((m.pattern for m in meta if getattr(m, "pattern", None)), None)
        choices = tuple(typing.get_args(base)) if typing.get_origin(base) is Literal else None
        item_model = None
        if typing.get_origin(base) is list:
            (item,) = typing.get_args(base)
            item_base = _unwrap(item)[0]
            if isinstance(item_base, type) and issubclass(item_base, BaseModel):
                item_model = item_base
        yield FieldRule(name, not nullable, info.default, ge, le, pattern, choices, item_model)


def _rules() -> dict[str, FieldRule]:
    rules = {r.name: r for r in field_rules(Transaction)}
    # schema.py's own helpers are the contract for the top level; the metadata walk above must agree.
    assert [n for n, r in rules.items() if r.required] == required_fields()
    assert [n for n, r in rules.items() if r.ge == 0] == non_negative_fields()
    return rules


def transaction_columns() -> list[str]:
    return list(spark_schema().fieldNames())


def json_schema() -> Any:
    from pyspark.sql import types as T

    schema = spark_schema()
    return T.StructType([*schema.fields, T.StructField(CORRUPT, T.StringType(), True)])


@dataclass(frozen=True)
class Check:
    """``bad`` is true for an invalid record (null counts as not bad); ``reason`` explains it."""

    bad: Column
    reason: Column


def _check(bad: Column, reason: str | Column) -> Check:
    from pyspark.sql import functions as F

    return Check(F.coalesce(bad, F.lit(False)), F.lit(reason) if isinstance(reason, str) else reason)


def _element_rules(field: str, model: type[BaseModel]) -> list[tuple[Any, str]]:
    """(predicate on one element, reason) for the elements of a list-of-``model`` field."""
    rules: list[tuple[Any, str]] = [(lambda x: x.isNull(), f"{field}: null element")]
    for rule in field_rules(model):
        if rule.required and not _has_default(rule):
            rules.append((_element_missing(rule.name), f"{field}: missing {rule.name}"))
        if rule.ge is not None:
            rules.append((_element_below(rule.name, rule.ge), f"{field}: negative {rule.name}"))
        if rule.le is not None:
            rules.append((_element_above(rule.name, rule.le), f"{field}: {rule.name} above {rule.le}"))
    return rules


# Spark's higher-order functions take one-argument lambdas; these build them per field (a default
# argument to bind the field name would count as a second lambda parameter).
def _element_missing(name: str) -> Any:
    return lambda x: x[name].isNull()


def _element_below(name: str, bound: int) -> Any:
    return lambda x: x[name] < bound


def _element_above(name: str, bound: int) -> Any:
    return lambda x: x[name] > bound


def _any_of(rules: list[tuple[Any, str]]) -> Any:
    from functools import reduce

    def predicate(x: Column) -> Column:
        from pyspark.sql import functions as F

        return reduce(lambda a, b: a | b, [F.coalesce(r(x), F.lit(False)) for r, _ in rules])

    return predicate


def _has_default(rule: FieldRule) -> bool:
    return rule.default is not PydanticUndefined and rule.default is not None


def _defaults(model: type[BaseModel]) -> tuple[list[FieldRule], list[FieldRule]]:
    rules = list(field_rules(model))
    return rules, [r for r in rules if _has_default(r)]


def _with_defaults(arr: Column, model: type[BaseModel]) -> Column:
    """The array with each element's defaulted fields filled."""
    from pyspark.sql import functions as F

    rules, defaulted = _defaults(model)
    if not defaulted:
        return arr

    def fill(x: Column) -> Column:
        return F.struct(
            *[
                (F.coalesce(x[r.name], F.lit(r.default)) if _has_default(r) else x[r.name]).alias(r.name)
                for r in rules
            ]
        )

    return F.transform(arr, fill)


def _needs_attention(model: type[BaseModel], element_rules: list[tuple[Any, str]]) -> Any:
    """Element predicate: invalid, or a defaulted field missing. One pass flags both cases."""
    from functools import reduce

    from pyspark.sql import functions as F

    _, defaulted = _defaults(model)
    bad = _any_of(element_rules)

    def predicate(x: Column) -> Column:
        return reduce(lambda a, b: a | b, [bad(x), *[x[r.name].isNull() for r in defaulted]], F.lit(False))

    return predicate


def parse(kafka_df: DataFrame, *, max_skew_s: float | None = None) -> DataFrame:
    """Kafka rows → canonical columns, ``errors`` (array<string>, empty = valid) and the Kafka columns.

    ``kafka_df`` has the Kafka source's columns (key, value, topic, partition, offset, timestamp, ...).
    The hot path evaluates one conjunction of cheap predicates per record; the reasons (which need
    the JSON keys and one pass per rule over the arrays) are computed only for invalid records.

    ``first_seen`` must lie in [2009-01-03, batch time + ``max_skew_s``] (schema.first_seen_error, the
    producer's check): the aggregates' watermark follows the largest event time, so one future-dated
    row would make every later row late. ``None`` takes ``Settings.first_seen_max_skew_s`` of the
    process (what `btc-anomaly stream` runs with).
    """
    from functools import reduce

    from pyspark.sql import functions as F

    if max_skew_s is None:
        from btc_anomaly.config import get_settings

        max_skew_s = get_settings().first_seen_max_skew_s
    rules = _rules()
    known = list(rules)
    text = F.col("value").cast("string")
    df = kafka_df.select(
        *KAFKA_COLUMNS,
        F.from_json(text, json_schema(), {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": CORRUPT}).alias(
            "tx"
        ),
    )
    # from_json gives null for an empty/null value and sets the corrupt column for malformed JSON.
    corrupt = F.col("tx").isNull() | F.col(f"tx.{CORRUPT}").isNotNull()
    # Only evaluated for corrupt records (CASE branches are lazy): which fields had a wrong type.
    keys = F.json_object_keys(text)

    def wrong_type(name: str) -> Column:
        # Sent and not null in the JSON, yet null after conversion: its value had the wrong type.
        # Cheap test first: And short-circuits, so the JSON is searched again only for null fields.
        return F.col(f"tx.{name}").isNull() & F.get_json_object(text, f"$.{name}").isNotNull()

    checks: list[Check] = [
        _check(
            corrupt,
            F.when(keys.isNull(), F.lit("bad JSON: not a JSON object")).otherwise(
                F.concat(
                    F.lit("wrong type: "),
                    F.coalesce(
                        F.nullif(
                            F.array_join(
                                F.array_compact(F.array(*[F.when(wrong_type(n), F.lit(n)) for n in known])),
                                ", ",
                            ),
                            F.lit(""),
                        ),
                        F.lit("a nested value"),
                    ),
                )
            ),
        )
    ]
    detail: list[Check] = []  # per-rule array checks, for the reasons only
    out: dict[str, Column] = {}
    for name, rule in rules.items():
        c = F.col(f"tx.{name}")
        out[name] = c
        if rule.required and _has_default(rule):
            out[name] = F.coalesce(c, F.lit(rule.default))
        elif rule.required:
            # A corrupt record already says "wrong type"; "missing" is for well-formed JSON only.
            checks.append(_check(c.isNull() & ~corrupt, f"missing {name}"))
        if rule.ge is not None:
            checks.append(_check(c < rule.ge, f"negative {name}"))
        if rule.le is not None:
            checks.append(_check(c > rule.le, f"{name} above {rule.le}"))
        if rule.pattern is not None:
            checks.append(_check(~c.rlike(rule.pattern), f"{name} does not match {rule.pattern}"))
        if rule.choices is not None:
            checks.append(_check(~c.isin(*rule.choices), f"{name} not one of {', '.join(rule.choices)}"))
        if rule.item_model is not None:
            # Higher-order functions run interpreted, not code-generated: one pass over the elements
            # flags the rare arrays that need more (a second pass to tell, then the reasons or a fill).
            element_rules = _element_rules(name, rule.item_model)
            flagged = F.exists(c, _needs_attention(rule.item_model, element_rules))
            checks.append(
                _check(
                    F.when(flagged, F.exists(c, _any_of(element_rules))).otherwise(F.lit(False)),
                    F.lit(None).cast("string"),
                )
            )
            detail.extend(_check(F.exists(c, pred), reason) for pred, reason in element_rules)
            out[name] = F.when(flagged, _with_defaults(c, rule.item_model)).otherwise(c)

    # Transaction._consistent, in SQL. Spark 4 runs in ANSI mode, where an overflowing long raises and
    # would fail the whole micro-batch: the arithmetic on untrusted values uses try_* (null on overflow).
    tx = {n: F.col(f"tx.{n}") for n in known}
    output_sum = F.aggregate(
        tx["outputs"], F.lit(0).cast("long"), lambda acc, o: F.try_add(acc, F.coalesce(o["value"], F.lit(0)))
    )
    # Event-time bounds in microseconds (no time-zone conversion involved); current_timestamp() is the
    # micro-batch's start, fixed for the whole batch.
    first_seen_us = F.unix_micros(tx["first_seen"])
    checks += [
        _check(first_seen_us < F.lit(int(FIRST_SEEN_MIN.timestamp()) * 1_000_000), FIRST_SEEN_TOO_EARLY),
        _check(
            first_seen_us > F.unix_micros(F.current_timestamp()) + F.lit(int(max_skew_s * 1_000_000)),
            first_seen_too_late(max_skew_s),
        ),
        _check(tx["input_count"] != F.size(tx["inputs"]), "input_count != number of inputs"),
        _check(tx["output_count"] != F.size(tx["outputs"]), "output_count != number of outputs"),
        _check(
            tx["outputs"].isNotNull() & (output_sum.isNull() | (tx["output_value"] != output_sum)),
            "output_value != sum of output values",
        ),
        _check(
            tx["fee"].isNotNull()
            & tx["input_value"].isNotNull()
            & ~F.coalesce(tx["is_coinbase"], F.lit(False))
            & (tx["fee"] != F.try_subtract(tx["input_value"], tx["output_value"])),
            "fee != input_value - output_value",
        ),
    ]
    any_bad = reduce(lambda a, b: a | b, [c.bad for c in checks])
    reasons = F.array_compact(F.array(*[F.when(c.bad, c.reason) for c in [*checks, *detail]]))
    errors = F.when(any_bad, reasons).otherwise(F.array().cast("array<string>"))
    return df.select(*[c.alias(n) for n, c in out.items()], errors.alias(ERRORS), *KAFKA_COLUMNS)


def is_valid() -> Column:
    from pyspark.sql import functions as F

    return F.size(F.col(ERRORS)) == 0
