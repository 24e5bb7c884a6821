"""The columnar fast path of POST /predict: same predictions and same 422/413 answers as the model path."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from btc_anomaly.api import inference
from btc_anomaly.api.body import FAST_PATH_MIN_BYTES, BodyParser
from btc_anomaly.api.columnar import COLUMNAR_VALIDATORS
from btc_anomaly.api.errors import ApiError, BodyValidationError
from btc_anomaly.api.schemas import CanonicalTransaction
from btc_anomaly.schema import Transaction, TxInput, TxOutput
from helpers.api_server import sample_records, served_sample_model, summary_body

RECORDS = sample_records(1000)
FEE_ROW = next(i for i, r in enumerate(RECORDS[:200]) if r["fee"] and r["input_count"] > 1)


@pytest.fixture(scope="module")
def served() -> Any:
    return served_sample_model()


def _models(parser: BodyParser, body: bytes) -> list[Any]:
    return parser._validate(parser.items, body, "transactions")  # the model path, errors included


def _hashes(items: Any) -> list[str]:
    return items.hashes if isinstance(items, inference.CanonicalBatch) else [t.hash for t in items]


def _outcome(fn: Any) -> Any:
    try:
        return ("ok", fn())
    except BodyValidationError as exc:
        return ("422", exc.errors)
    except ApiError as exc:
        return (exc.status_code, exc.detail)


def test_large_canonical_arrays_are_columnar_with_the_same_predictions(served: Any) -> None:
    parser = BodyParser(10_000)
    body = orjson.dumps(RECORDS)
    batch, single = parser.transactions(body)
    assert isinstance(batch, inference.CanonicalBatch) and not single
    models = _models(parser, body)
    assert batch.hashes == [t.hash for t in models]
    assert inference.count_ios(batch) == inference.count_ios(models)
    for explain in ("anomalies", "all"):
        assert inference.predict(served, batch, explain=explain) == inference.predict(
            served, models, explain=explain
        )


def test_one_big_transaction_is_columnar_with_the_same_prediction(served: Any) -> None:
    """A single object the size of a big transaction (the sample's largest: 649 inputs) skips the models."""
    parser = BodyParser(10_000)
    biggest = max(sample_records(), key=lambda r: r["input_count"])
    body = orjson.dumps(biggest)
    assert len(body) >= FAST_PATH_MIN_BYTES
    batch, single = parser.transactions(body)
    assert isinstance(batch, inference.CanonicalBatch) and single and batch.hashes == [biggest["hash"]]
    model = parser._validate(parser.items, b"[" + body + b"]", "transactions")
    assert inference.predict(served, batch, explain="all") == inference.predict(served, model, explain="all")
    broken = orjson.dumps({**biggest, "input_count": 1})  # the models give the 422, field by field
    assert _outcome(lambda: parser.transactions(broken))[0] == "422"


def test_small_and_summary_bodies_keep_the_model_path() -> None:
    parser = BodyParser(10_000)
    items, _ = parser.transactions(orjson.dumps(RECORDS[:3]))
    assert isinstance(items, list) and all(isinstance(t, CanonicalTransaction) for t in items)
    mixed = orjson.dumps([*RECORDS[:300], summary_body(RECORDS[300])])
    assert len(mixed) >= FAST_PATH_MIN_BYTES
    items, _ = parser.transactions(mixed)
    assert isinstance(items, list) and len(items) == 301


def test_defaults_left_out_score_like_the_models(served: Any) -> None:
    """Keys with defaults may be missing: the columns are null, which features read like the defaults."""
    records = copy.deepcopy(RECORDS[:200])
    for r in records:
        for o in r["outputs"]:
            o.pop("script_type", None)
            o.pop("address", None)
        for i in r["inputs"]:
            i.pop("script_type", None)
        r.pop("block_height", None)
    parser = BodyParser(10_000)
    body = orjson.dumps(records)
    batch, _ = parser.transactions(body)
    assert isinstance(batch, inference.CanonicalBatch)
    assert inference.predict(served, batch, explain="all") == inference.predict(
        served, _models(parser, body), explain="all"
    )


def _mutations() -> list[tuple[str, Any]]:
    r = RECORDS[FEE_ROW]
    out0 = r["outputs"][0]
    return [
        ("input_count", lambda t: t.update(input_count=t["input_count"] + 1)),
        ("output_count", lambda t: t.update(output_count=t["output_count"] - 1)),
        ("output_value sum", lambda t: t.update(output_value=t["output_value"] + 1)),
        ("fee identity", lambda t: t.update(fee=t["fee"] + 1)),
        ("vsize", lambda t: t.update(vsize=t["vsize"] + 1)),
        ("weight below size", lambda t: t.update(weight=t["size"] - 1)),
        ("weight above 4 size", lambda t: t.update(weight=4 * t["size"] + 1)),
        ("negative output", lambda t: t["outputs"][0].update(value=-5)),
        ("hash pattern", lambda t: t.update(hash=t["hash"].upper())),
        ("extra field", lambda t: t.update(extra=1)),
        ("extra output field", lambda t: t["outputs"][0].update(extra=1)),
        ("missing field", lambda t: t.pop("source")),
        ("bad source", lambda t: t.update(source="carrier pigeon")),
        ("bad time", lambda t: t.update(first_seen="yesterday")),
        ("locktime bound", lambda t: t.update(locktime=2**32)),
        ("string count", lambda t: t.update(size=str(t["size"]))),  # lax mode coerces: valid on both
        ("null script", lambda t: t["outputs"][0].update(script_type=None)),
        ("output value null", lambda t: t["outputs"][0].update(value=None)),
        ("not an object", lambda t: t.clear()),
        ("output not object", lambda t: t.update(outputs=[1] * len(r["outputs"]))),
        ("unchanged", lambda t: None),
        ("value as float", lambda t: t["outputs"][0].update(value=float(out0["value"]))),
    ]


@pytest.mark.parametrize(("what", "mutate"), _mutations(), ids=[m[0] for m in _mutations()])
def test_bad_items_get_the_model_paths_answer(what: str, mutate: Any) -> None:
    records = copy.deepcopy(RECORDS[:150])
    mutate(records[FEE_ROW])
    body = orjson.dumps(records)
    assert len(body) >= FAST_PATH_MIN_BYTES
    parser = BodyParser(10_000)
    fast = _outcome(lambda: parser.transactions(body)[0])
    slow = _outcome(lambda: _models(parser, body))
    assert fast[0] == slow[0], what
    if fast[0] == "ok":  # lax coercions (``"234"`` for 234) are valid, through the models
        assert _hashes(fast[1]) == [t.hash for t in slow[1]]
    else:
        assert fast[1] == slow[1]
        if what != "unchanged":
            assert fast[0] == "422"


def test_batch_limit_is_the_same_413() -> None:
    parser = BodyParser(100)
    body = orjson.dumps(RECORDS[:101])
    with pytest.raises(ApiError) as info:
        parser.transactions(body)
    assert info.value.status_code == 413 and "101" in info.value.detail


def test_every_model_validator_has_a_columnar_check() -> None:
    for model in (Transaction, CanonicalTransaction, TxInput, TxOutput):
        d = model.__pydantic_decorators__
        assert set(d.model_validators) | set(d.field_validators) == COLUMNAR_VALIDATORS[model.__name__], (
            f"{model.__name__} has a validator the columnar path does not check: add it to body._consistent"
        )
        assert not d.validators and not d.root_validators


def test_coalesced_columnar_and_model_jobs(served: Any) -> None:
    parser = BodyParser(10_000)
    batch, _ = parser.transactions(orjson.dumps(RECORDS[:100]))
    assert isinstance(batch, inference.CanonicalBatch)
    models = _models(parser, orjson.dumps(RECORDS[100:110]))
    summary = parser.transactions(orjson.dumps([summary_body(RECORDS[120])]))[0]
    jobs = [
        inference.Job(models[:4], None, "all"),
        inference.Job(batch, 0.5, "anomalies"),
        inference.Job(summary, None, "all"),
        inference.Job(models[4:], None, "none"),
    ]
    together = inference.predict_jobs(served, jobs)
    alone = [inference.predict(served, j.items, threshold=j.threshold, explain=j.explain) for j in jobs]
    assert together == alone
