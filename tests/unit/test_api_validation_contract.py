"""Request validation of the prediction API at its limits: the byte limit on what is declared and on what is
streamed (a real Starlette request), the batch limit's 413 text, which body shape an item is read as, the
columnar fast path's size switch, the raw-hex body, the physical bounds of the models and the OpenAPI request
schemas. Bodies are real sample transactions."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import orjson
import pytest
from pydantic import ValidationError
from starlette.requests import Request

from btc_anomaly.api import body as body_mod
from btc_anomaly.api.body import FAST_PATH_MIN_BYTES, BodyParser, read_body
from btc_anomaly.api.errors import ApiError, BodyValidationError
from btc_anomaly.api.inference import CanonicalBatch
from btc_anomaly.api.schemas import (
    ITEM_ADAPTER,
    CanonicalTransaction,
    SummaryTransaction,
    _body_kind,
    request_schemas,
)
from btc_anomaly.schema import Transaction
from helpers.api_server import sample_records, summary_body

RECORDS = sample_records(400)
TX = next(r for r in RECORDS if r["fee"] and r["input_count"] == 1 and r["output_count"] == 2)


# --- the byte limit ----------------------------------------------------------------------------------------


def _request(
    chunks: Iterable[bytes], headers: dict[str, str] | None = None, disconnect: bool = False
) -> Request:
    messages: list[dict[str, Any]] = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
    messages.append(
        {"type": "http.disconnect"}
        if disconnect
        else {"type": "http.request", "body": b"", "more_body": False}
    )

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    raw_headers = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/predict",
        "headers": raw_headers,
        "query_string": b"",
    }
    return Request(scope, receive)


def _read(chunks: list[bytes], limit: int, headers: dict[str, str] | None = None, **kw: Any) -> bytes:
    return asyncio.run(read_body(_request(chunks, headers, **kw), limit))


def test_body_up_to_the_limit_is_read_whole() -> None:
    assert _read([b"0123", b"456789"], 10, {"content-length": "10"}) == b"0123456789"
    assert _read([b"0123", b"456789"], 10) == b"0123456789"  # chunked, no length
    assert _read([], 10) == b""


def test_declared_length_over_the_limit_is_refused_before_reading() -> None:
    with pytest.raises(ApiError) as err:
        _read([b"x"], 10, {"content-length": "11"})
    assert err.value.status_code == 413
    assert err.value.detail == "request body of 11 bytes exceeds the limit of 10 bytes"
    assert err.value.headers == {"Connection": "close"}
    with pytest.raises(ApiError) as big:
        _read([b"x"], 1_000_000, {"content-length": "1234567"})
    assert big.value.detail == "request body of 1,234,567 bytes exceeds the limit of 1,000,000 bytes"


def test_streamed_bytes_over_the_limit_are_cut_off() -> None:
    for headers in (None, {"content-length": "5"}, {"content-length": "five"}):  # absent, a lie, garbage
        with pytest.raises(ApiError) as err:
            _read([b"012345", b"6789", b"X"], 10, headers)
        assert (err.value.status_code, err.value.detail) == (
            413,
            "request body exceeds the limit of 10 bytes",
        )
        assert err.value.headers == {"Connection": "close"}
    with pytest.raises(ApiError) as thousands:
        _read([b"x" * 1001], 1000)
    assert thousands.value.detail == "request body exceeds the limit of 1,000 bytes"


def test_client_gone_mid_body_is_a_400() -> None:
    with pytest.raises(ApiError) as err:
        _read([b"[{"], 100, disconnect=True)
    assert (err.value.status_code, err.value.detail) == (
        400,
        "client disconnected before sending the whole body",
    )
    assert err.value.headers == {"Connection": "close"}


# --- the batch limit and the body shapes ------------------------------------------------------------------


def test_a_single_object_and_an_array() -> None:
    parser = BodyParser(max_items=3)
    one = orjson.dumps(TX)
    items, single = parser.transactions(one)
    assert single is True and len(items) == 1 and isinstance(items[0], CanonicalTransaction)
    assert items[0].hash == TX["hash"]
    items, single = parser.transactions(b"  \n" + orjson.dumps([TX, summary_body(TX)]))
    assert single is False
    assert [type(i) for i in items] == [CanonicalTransaction, SummaryTransaction]
    assert items[1].fee == TX["fee"]


def test_batch_limit_is_exact_and_names_the_count() -> None:
    parser = BodyParser(max_items=2)
    assert len(parser.transactions(orjson.dumps([TX, TX]))[0]) == 2
    with pytest.raises(ApiError) as err:
        parser.transactions(orjson.dumps([TX, TX, TX]))
    assert (err.value.status_code, err.value.detail) == (
        413,
        "batch of 3 transactions exceeds the limit of 2",
    )
    assert err.value.headers is None  # the body was read: the connection can stay
    with pytest.raises(ApiError) as raw:
        parser.raw_hexes(b'["00", "01", "02"]')
    assert raw.value.detail == "batch of 3 raw transactions exceeds the limit of 2"
    thousands = BodyParser(max_items=1000)
    with pytest.raises(ApiError) as big:
        thousands.raw_hexes(orjson.dumps(["00"] * 1001))
    assert big.value.detail == "batch of 1,001 raw transactions exceeds the limit of 1,000"


def test_an_item_too_long_is_a_field_error_not_a_413() -> None:
    parser = BodyParser(max_items=2)
    long_hash = dict(TX, hash="ab" * 40)  # too_long inside an item, not the batch
    with pytest.raises(BodyValidationError) as err:
        parser.transactions(orjson.dumps([long_hash]))
    assert {tuple(e["loc"][:4]) for e in err.value.errors} == {("body", 0, "canonical", "hash")}


def test_raw_hex_bodies() -> None:
    parser = BodyParser(max_items=2)
    assert parser.raw_hexes(b'["0100", "02 00"]') == ["0100", "02 00"]
    # One transaction is a batch, and any non-empty string passes here: the decoder judges the hex itself.
    assert parser.raw_hexes(b'["0"]') == ["0"]
    for bad, loc in ((b"[]", ["body"]), (b'[""]', ["body", 0]), (b'"0100"', ["body"]), (b"[1]", ["body", 0])):
        with pytest.raises(BodyValidationError) as err:
            parser.raw_hexes(bad)
        assert err.value.errors[0]["loc"] == loc, bad


def test_empty_array_and_non_objects_get_field_errors() -> None:
    parser = BodyParser(max_items=2)
    with pytest.raises(BodyValidationError) as empty:
        parser.transactions(b"[]")
    assert [(e["type"], e["loc"]) for e in empty.value.errors] == [("too_short", ["body"])]
    with pytest.raises(BodyValidationError) as scalar:
        parser.transactions(b"[1]")
    assert [(e["type"], e["loc"]) for e in scalar.value.errors] == [("transaction_body", ["body", 0])]
    assert scalar.value.errors[0]["msg"] == (
        "expected a transaction object: the canonical transaction, or the 8-field body with inputs_count/outputs_count"
    )


def test_the_fast_path_starts_at_its_byte_size() -> None:
    parser = BodyParser(max_items=1000)
    batch = [RECORDS[i % len(RECORDS)] for i in range(200)]
    body = orjson.dumps(batch)
    assert len(body) >= FAST_PATH_MIN_BYTES
    columnar, single = parser.transactions(body)
    assert single is False and isinstance(columnar, CanonicalBatch)
    assert list(columnar.hashes) == [r["hash"] for r in batch]
    # One byte under the switch: the models decide, with the same transactions.
    small = orjson.dumps(batch[:3])
    padded = small[:-1] + b" " * (FAST_PATH_MIN_BYTES - 1 - len(small)) + b"]"
    assert len(padded) == FAST_PATH_MIN_BYTES - 1
    models, _ = parser.transactions(padded)
    assert isinstance(models, list) and [m.hash for m in models] == [r["hash"] for r in batch[:3]]
    at = small[:-1] + b" " * (FAST_PATH_MIN_BYTES - len(small)) + b"]"
    assert isinstance(parser.transactions(at)[0], CanonicalBatch)
    # Summary bodies in a large array are not columnar: the models read them.
    summaries = orjson.dumps([summary_body(r) for r in batch])
    assert len(summaries) >= FAST_PATH_MIN_BYTES and isinstance(parser.transactions(summaries)[0], list)


def test_the_fast_path_counts_the_batch_limit() -> None:
    parser = BodyParser(max_items=150)
    body = orjson.dumps([RECORDS[i % len(RECORDS)] for i in range(200)])
    with pytest.raises(ApiError) as err:
        parser.canonical_batch(body)
    assert (err.value.status_code, err.value.detail) == (
        413,
        "batch of 200 transactions exceeds the limit of 150",
    )
    with pytest.raises(ApiError) as via_transactions:
        parser.transactions(body)
    assert via_transactions.value.status_code == 413
    assert parser.canonical_batch(orjson.dumps([summary_body(TX)] * 300)) is None
    table = BodyParser(max_items=300).canonical_batch(body).table
    assert table.column_names == list(body_mod.INPUT_COLUMNS)
    assert table.column("size").to_pylist() == [RECORDS[i % len(RECORDS)]["size"] for i in range(200)]


# --- which model reads an item ----------------------------------------------------------------------------


def test_body_kind() -> None:
    assert _body_kind({"inputs_count": 1}) == "summary"
    assert _body_kind({"outputs_count": 1}) == "summary"
    assert _body_kind({"inputs": [], "outputs": []}) == "canonical"
    assert _body_kind({}) == "canonical"
    assert _body_kind(SummaryTransaction.model_validate(summary_body(TX))) == "summary"
    assert _body_kind(Transaction.model_validate(TX)) == "canonical"
    assert _body_kind(CanonicalTransaction.model_validate(TX)) == "canonical"
    assert _body_kind([TX]) is None and _body_kind("tx") is None
    assert isinstance(ITEM_ADAPTER.validate_python(summary_body(TX)), SummaryTransaction)


def test_physical_bounds_at_their_edges() -> None:
    size = TX["size"]
    legacy = dict(TX, weight=4 * size, vsize=size)
    assert CanonicalTransaction.model_validate(legacy).vsize == size
    with pytest.raises(ValidationError, match=rf"weight {4 * size + 1} must lie in \[size, 4 \* size\]"):
        CanonicalTransaction.model_validate(dict(TX, weight=4 * size + 1, vsize=size + 1))
    with pytest.raises(ValidationError, match=rf"vsize {size + 1} != ceil\(weight / 4\) = {size}"):
        CanonicalTransaction.model_validate(dict(legacy, vsize=size + 1))
    odd = dict(TX, weight=size + 1, vsize=(size + 1 + 3) // 4)  # ceil, not floor
    assert CanonicalTransaction.model_validate(odd).vsize == -(-(size + 1) // 4)
    summary = summary_body(TX)
    floor = 10 + 41 * summary["inputs_count"] + 9 * summary["outputs_count"]
    assert SummaryTransaction.model_validate(dict(summary, size=floor, weight=floor)).size == floor
    with pytest.raises(ValidationError, match=f"need at least {floor} bytes, size is {floor - 1}"):
        SummaryTransaction.model_validate(dict(summary, size=floor - 1, weight=floor - 1))


def test_summary_completes_fee_or_input_value() -> None:
    summary = summary_body(TX)
    only_fee = SummaryTransaction.model_validate(dict(summary, input_value=None))
    assert only_fee.input_value == TX["output_value"] + TX["fee"]
    only_input = SummaryTransaction.model_validate(dict(summary, fee=None))
    assert only_input.fee == TX["fee"]
    exact = SummaryTransaction.model_validate(dict(summary, fee=None, input_value=TX["output_value"]))
    assert exact.fee == 0
    with pytest.raises(ValidationError, match=r"input_value .* < output_value"):
        SummaryTransaction.model_validate(dict(summary, fee=None, input_value=TX["output_value"] - 1))
    with pytest.raises(ValidationError, match="exceeds 21 million BTC"):
        SummaryTransaction.model_validate(dict(summary, input_value=None, output_value=21 * 10**14, fee=1))
    neither = SummaryTransaction.model_validate(dict(summary, fee=None, input_value=None))
    assert (neither.fee, neither.input_value) == (None, None)


# --- the OpenAPI request schemas ---------------------------------------------------------------------------


def test_request_schemas() -> None:
    predict, raw, defs = request_schemas("#/components/schemas/{model}")
    item = predict["oneOf"][0]
    assert predict["oneOf"][1] == {"type": "array", "items": item, "minItems": 1}
    assert (
        predict["description"]
        == "One transaction (object) or a batch (array); the response has the same shape."
    )
    assert "$defs" not in item
    assert {r["$ref"] for r in item["oneOf"]} == {
        "#/components/schemas/CanonicalTransaction",
        "#/components/schemas/SummaryTransaction",
    }
    assert raw == {
        "type": "array",
        "minItems": 1,
        "items": {"type": "string", "minLength": 1, "description": "A serialized transaction as hex."},
        "description": "Raw transactions as hex strings (whitespace inside a string is ignored).",
    }
    assert {"CanonicalTransaction", "SummaryTransaction", "TxInput", "TxOutput"} <= set(defs)
    assert defs["SummaryTransaction"]["properties"]["size"]["maximum"] == 4_000_000


def test_one_large_object_takes_the_fast_path_from_the_same_byte_size() -> None:
    """A single transaction object (not an array) switches to the columnar path at ``FAST_PATH_MIN_BYTES``
    too, and is answered as a single object either way."""
    parser = BodyParser(max_items=10)
    one = orjson.dumps(TX)
    at = one[:-1] + b" " * (FAST_PATH_MIN_BYTES - len(one)) + b"}"
    assert len(at) == FAST_PATH_MIN_BYTES
    columnar, single = parser.transactions(at)
    assert single is True and isinstance(columnar, CanonicalBatch) and list(columnar.hashes) == [TX["hash"]]
    under = at[:-2] + b"}"  # one byte under
    models, single = parser.transactions(under)
    assert single is True and isinstance(models, list) and [m.hash for m in models] == [TX["hash"]]
