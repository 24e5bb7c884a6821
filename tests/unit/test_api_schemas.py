"""Request validation: the 8-field body's physical rules, the canonical body's bounds, the batch parser."""

from __future__ import annotations

import orjson
import pytest
from pydantic import ValidationError

from btc_anomaly.api.body import BodyParser
from btc_anomaly.api.errors import ApiError, BodyValidationError
from btc_anomaly.api.schemas import CanonicalTransaction, SummaryTransaction, request_schemas
from helpers.api_server import sample_records, summary_body

RECORD = next(r for r in sample_records() if r["fee"] and r["is_segwit"])
GOOD = summary_body(RECORD)


def _errors(body: dict) -> list[str]:
    with pytest.raises(ValidationError) as info:
        SummaryTransaction.model_validate(body)
    return [str(e["msg"]) for e in info.value.errors()]


def test_summary_body_of_a_real_tx_is_valid() -> None:
    tx = SummaryTransaction.model_validate(GOOD)
    assert tx.fee == RECORD["fee"] and tx.input_value == RECORD["input_value"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"weight": GOOD["size"] - 1}, "must lie in [size, 4 * size]"),
        ({"weight": GOOD["size"] * 4 + 1}, "must lie in [size, 4 * size]"),
        ({"outputs_count": 10_000}, "need at least"),
        ({"fee": GOOD["fee"] + 1}, "fee"),
        ({"fee": None, "input_value": GOOD["output_value"] - 1}, "input_value"),
        ({"size": 5_000_000}, "less than or equal"),
        ({"inputs_count": 0}, "greater than or equal"),
        ({"hash": "AB" * 32}, "pattern"),
        ({"extra": 1}, "Extra inputs"),
        ({"output_value": -1}, "greater than or equal"),
    ],
)
def test_summary_body_rules(change: dict, message: str) -> None:
    assert any(message in m for m in _errors(GOOD | change))


def test_canonical_bounds_and_sizes() -> None:
    CanonicalTransaction.model_validate(RECORD)
    for change in ({"vsize": RECORD["vsize"] + 1}, {"locktime": 2**32}, {"weight": RECORD["size"] - 1}):
        with pytest.raises(ValidationError):
            CanonicalTransaction.model_validate(RECORD | change)


def test_parser_counts_before_validating() -> None:
    parser = BodyParser(max_items=100)
    body = orjson.dumps([{"not": "a transaction"}] * 200_000)
    with pytest.raises(ApiError) as info:
        parser.transactions(body)
    # One 413 with the count, not 200k item errors: the items are counted, never validated.
    assert info.value.status_code == 413 and "200,000" in info.value.detail


def test_parser_errors_point_at_the_field() -> None:
    parser = BodyParser(max_items=10)
    bad = dict(RECORD, outputs=[dict(RECORD["outputs"][0], value=-5), *RECORD["outputs"][1:]])
    with pytest.raises(BodyValidationError) as info:
        parser.transactions(orjson.dumps([RECORD, bad]))
    locs = [e["loc"] for e in info.value.errors]
    assert ["body", 1, "canonical", "outputs", 0, "value"] in locs
    with pytest.raises(BodyValidationError) as info:
        parser.transactions(b"{not json")
    assert info.value.errors[0]["type"] == "json_invalid"
    with pytest.raises(BodyValidationError):
        parser.transactions(b"[]")
    with pytest.raises(BodyValidationError):
        parser.raw_hexes(b'"0100"')  # the raw endpoint takes an array


def test_openapi_request_schemas_are_self_contained() -> None:
    predict, raw, defs = request_schemas("#/components/schemas/{model}")
    text = orjson.dumps([predict, raw, defs]).decode()
    for ref in ("CanonicalTransaction", "SummaryTransaction", "TxInput", "TxOutput"):
        assert ref in defs
    assert "$defs" not in text
