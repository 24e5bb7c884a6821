"""The columnar validator only ever accepts what the models accept, with the same predictions.

Generated bodies: sample transactions with random edits (odd JSON values in any field, nested or not,
keys removed or added, lists replaced). Whenever the fast path accepts a body, the models must accept it
too and score it identically; when it declines, the models decide (test_api_body.py checks the answers).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from btc_anomaly.api import inference
from btc_anomaly.api.body import BodyParser
from btc_anomaly.api.columnar import ColumnarParser, rules_of
from btc_anomaly.api.errors import BodyValidationError
from btc_anomaly.api.schemas import CanonicalTransaction
from btc_anomaly.schema import TxInput, TxOutput
from helpers.api_server import sample_records, served_sample_model

RECORDS = sample_records(40)
TOP = list(CanonicalTransaction.model_fields)
ITEM = {"inputs": list(TxInput.model_fields), "outputs": list(TxOutput.model_fields)}
PARSER = BodyParser(10_000)
SERVED: list[Any] = []

TIMESTAMPS = [
    "2021-02-28T23:59:59Z",
    "2021-02-29T00:00:00Z",
    "2020-02-29T12:00:00+23:59",
    "2021-01-01T00:00:00-00:00",
    "2021-01-01T00:00:00+00:00",
    "1900-01-01T00:00:00Z",
    "2021-01-01T00:00:00.5Z",
    "2021-01-01T00:00:00.123456789Z",
    "2021-01-01t00:00:00Z",
    "2021-01-01 00:00:00",
    "2021-01-01",
    "2021-06-31T00:00:00Z",
    "2021-01-01T23:59:60Z",
    "2021-01-01T00:00:00+2400",
]
ODD: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.sampled_from([0, 1, -1, 10, 2**31, 2**32, 2**53 + 1, 21 * 10**14, 21 * 10**14 + 1, 10**8]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1.0, 0.0, 5.5, 1e3]),
    st.text(max_size=4),
    st.sampled_from(["5", "true", "0", "rest", "ws", "a" * 64, "A" * 64, "0" * 63, *TIMESTAMPS]),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.sampled_from(["value", "x"]), st.integers(), max_size=1),
    st.datetimes(min_value=dt.datetime(1899, 12, 31), max_value=dt.datetime(2100, 1, 1)).map(
        lambda d: d.isoformat() + "Z"
    ),
)


TIMES = st.one_of(
    st.sampled_from(TIMESTAMPS),
    st.datetimes(min_value=dt.datetime(1899, 12, 31), max_value=dt.datetime(2100, 1, 1)).map(
        lambda d: d.isoformat() + "Z"
    ),
)
# Fields no cross-field rule ties to others, with values around their bounds: many bodies stay valid.
NEAR: dict[str, st.SearchStrategy[Any]] = {
    "version": st.integers(-(2**31) - 1, 2**32),
    "locktime": st.integers(-1, 2**32),
    "block_height": st.one_of(st.none(), st.integers(-1, 10**8 + 1)),
    "schema_version": st.integers(0, 3),
    "rbf": st.booleans(),
    "is_segwit": st.booleans(),
    "has_op_return": st.booleans(),
    "first_seen": TIMES,
    "source": st.sampled_from(["rest", "ws", "replay", "block", "rawtx", "REST", ""]),
}


def _edit() -> st.SearchStrategy[tuple[Any, ...]]:
    where = st.integers(min_value=0, max_value=len(RECORDS) - 1)
    near = st.sampled_from(sorted(NEAR)).flatmap(lambda f: st.tuples(st.just(f), NEAR[f]))
    return st.one_of(
        st.tuples(st.just("near"), where, near),
        st.tuples(st.just("set"), where, st.sampled_from(TOP), ODD),
        st.tuples(st.just("del"), where, st.sampled_from(TOP)),
        st.tuples(st.just("add"), where, st.sampled_from(["extra", "inputs_count"]), ODD),
        st.tuples(st.just("item"), where, st.sampled_from(list(ITEM)), st.integers(0, 3), st.data()),
    )


def _apply(records: list[dict[str, Any]], edit: tuple[Any, ...]) -> None:
    kind, row, name = edit[0], records[edit[1]], edit[2]
    if kind == "near":
        row[name[0]] = name[1]
    elif kind in ("set", "add"):
        row[name] = edit[3]
    elif kind == "del":
        row.pop(name, None)
    else:
        items, data = row.get(name), edit[4]
        if not isinstance(items, list) or not items:
            return
        item = items[edit[3] % len(items)]
        if not isinstance(item, dict):
            return
        action = data.draw(st.sampled_from(["near", "set", "del", "add", "replace"]))
        if action == "near":
            field = data.draw(
                st.sampled_from(
                    ["address", "script_type", "value"] if name == "inputs" else ["address", "script_type"]
                )
            )
            item[field] = data.draw(st.one_of(st.none(), st.text(max_size=3), st.integers(-1, 3)))
        elif action == "set":
            item[data.draw(st.sampled_from(ITEM[name]))] = data.draw(ODD)
        elif action == "del":
            item.pop(data.draw(st.sampled_from(ITEM[name])), None)
        elif action == "add":
            item["extra"] = data.draw(ODD)
        else:
            items[edit[3] % len(items)] = data.draw(ODD)


def _models(body: bytes) -> list[Any] | None:
    try:
        return PARSER._validate(PARSER.items, body, "transactions")  # type: ignore[no-any-return]
    except BodyValidationError:
        return None


# Bodies the fast path must accept out of the 300 generated (40-60 are, mostly from "near" edits, which
# keep a body valid): a fast path that declined everything would otherwise pass the property unseen.
MIN_ACCEPTED = 15
ACCEPTED: list[bool] = []


def test_accepted_bodies_are_valid_and_score_the_same() -> None:
    ACCEPTED.clear()
    _accepted_bodies_are_valid_and_score_the_same()
    accepted = sum(ACCEPTED)
    assert accepted >= MIN_ACCEPTED, f"the fast path accepted {accepted} of {len(ACCEPTED)} generated bodies"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(_edit(), min_size=1, max_size=3))
def _accepted_bodies_are_valid_and_score_the_same(edits: list[tuple[Any, ...]]) -> None:
    records = copy.deepcopy(RECORDS)
    for edit in edits:
        _apply(records, edit)
    body = json.dumps(records).encode()  # stdlib: integers beyond 64 bits are sent too
    fast = PARSER.canonical_batch(body)
    event("fast path " + ("declined" if fast is None else "accepted"))
    ACCEPTED.append(fast is not None)
    if fast is None:
        return
    models = _models(body)
    assert models is not None, f"fast path accepted a body the models reject: {edits}"
    if not SERVED:
        SERVED.append(served_sample_model())
    assert fast.hashes == [m.hash for m in models]
    assert inference.predict(SERVED[0], fast, explain="all") == inference.predict(
        SERVED[0], models, explain="all"
    )


def test_unedited_and_lax_bodies() -> None:
    body = orjson.dumps(RECORDS)
    assert PARSER.canonical_batch(body) is not None
    lax = copy.deepcopy(RECORDS)
    lax[3]["size"] = str(lax[3]["size"])  # valid (lax mode) but not the fast path's business
    assert PARSER.canonical_batch(orjson.dumps(lax)) is None and _models(orjson.dumps(lax)) is not None


def test_over_the_limit_is_counted() -> None:
    parser = ColumnarParser(CanonicalTransaction, PARSER.columnar.schema, 10)
    assert parser.parse(orjson.dumps(RECORDS)) == len(RECORDS)


def test_a_checked_column_left_out_of_the_schema_is_refused() -> None:
    schema = PARSER.columnar.schema
    with pytest.raises(ValueError, match="hash"):
        ColumnarParser(CanonicalTransaction, schema.remove(schema.get_field_index("hash")), 10)


def test_a_constraint_without_a_columnar_check_is_refused() -> None:
    class Odd(BaseModel):
        name: str = Field(min_length=3)

    class Union(BaseModel):
        value: int | str

    for model in (Odd, Union):
        with pytest.raises(TypeError):
            rules_of(model)


def test_keys_left_out_of_some_objects_only() -> None:
    """A missing key with a default and an explicit null are both null in Arrow: only the first is valid."""
    records = copy.deepcopy(RECORDS)
    records[5]["outputs"][0].pop("script_type")
    records[7].pop("block_height")
    fast = PARSER.canonical_batch(orjson.dumps(records))
    assert fast is not None
    models = _models(orjson.dumps(records))
    assert models is not None
    served = served_sample_model()
    assert inference.predict(served, fast, explain="all") == inference.predict(served, models, explain="all")
    records[9]["outputs"][0]["script_type"] = None
    assert PARSER.canonical_batch(orjson.dumps(records)) is None
