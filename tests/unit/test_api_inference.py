"""The API's scoring path against the model engineer's: same features, same scores, same reasons.

The bundle is fit on the bundled real sample with the trainer's ``fit_bundle``; no MLflow needed here.
"""

from __future__ import annotations

import copy

import orjson
import pandas as pd
import pyarrow as pa
import pytest

from btc_anomaly.api import inference
from btc_anomaly.api.body import BodyParser
from btc_anomaly.api.schemas import ITEM_ADAPTER, SummaryTransaction
from btc_anomaly.config import Settings
from btc_anomaly.features import FEATURES_PREVOUT, compute_features
from btc_anomaly.model import core
from btc_anomaly.model.scoring import score_frame
from helpers.api_server import sample_bundle, sample_records, served_sample_model, summary_body

RECORDS = sample_records()


def _without_prevouts(record: dict) -> dict:
    """The same transaction as a raw decode without prevout lookup would give it."""
    r = copy.deepcopy(record)
    r["fee"] = None
    r["input_value"] = None
    for i in r["inputs"]:
        i["value"] = None
        i["address"] = None
        i["script_type"] = "unknown"
    return r


@pytest.fixture(scope="module")
def served():
    return served_sample_model()


@pytest.fixture(scope="module")
def items():
    return [
        ITEM_ADAPTER.validate_python(r)
        for r in RECORDS[:1500] + [_without_prevouts(r) for r in RECORDS[:200]]
    ]


def test_canonical_table_is_the_model_dump(items) -> None:
    columns = set(core.INPUT_COLUMNS)
    dumped = pa.Table.from_pylist([t.model_dump(include=columns) for t in items], schema=core.INPUT_SCHEMA)
    assert inference.canonical_table(items).equals(dumped)


def test_predict_equals_score_frame(served, items) -> None:
    frame = pd.DataFrame(RECORDS[:1500] + [_without_prevouts(r) for r in RECORDS[:200]])
    expected = score_frame(frame, served.model, explain="all", settings=Settings())
    got = inference.predict(served, items, explain="all")
    assert [p["hash"] for p in got] == list(expected["hash"])
    assert [p["anomaly_score"] for p in got] == expected["anomaly_score"].tolist()
    assert [p["is_anomaly"] for p in got] == expected["is_anomaly"].tolist()
    assert [p["threshold"] for p in got] == expected["threshold"].tolist()
    assert [p["model_kind"] for p in got] == list(expected["model_kind"])
    assert [[r["text"] for r in p["reasons"]] for p in got] == [list(r) for r in expected["reasons"]]
    assert [[r["feature"] for r in p["reasons"]] for p in got] == [list(r) for r in expected["top_features"]]
    assert all(0 <= p["anomaly_score"] < 1 for p in got)
    assert {p["model"]["version"] for p in got} == {"1"}
    full = [p for p in got if p["model_kind"] == "full"]
    structural = [p for p in got if p["model_kind"] == "structural"]
    assert all(p["missing_features"] == [] for p in full)
    assert all(p["missing_features"] == FEATURES_PREVOUT for p in structural)


def test_threshold_override_relabels_without_rescoring(served, items) -> None:
    base = inference.predict(served, items[:300], explain="none")
    low = inference.predict(served, items[:300], explain="anomalies", threshold=0.5)
    assert [p["anomaly_score"] for p in low] == [p["anomaly_score"] for p in base]
    assert all(p["threshold"] == 0.5 for p in low)
    assert all(p["is_anomaly"] == (p["anomaly_score"] > 0.5) for p in low)
    assert all(p["model_threshold"] == b["threshold"] for p, b in zip(low, base, strict=True))
    assert sum(p["is_anomaly"] for p in low) > sum(p["is_anomaly"] for p in base)
    assert all(bool(p["reasons"]) == p["is_anomaly"] for p in low)


def test_explain_modes(served, items) -> None:
    # "all" explains every row; a row no split isolated faster than average has no positive contribution.
    explained = inference.predict(served, items[:50], explain="all")
    assert sum(1 for p in explained if p["reasons"]) >= 40
    assert not any(p["reasons"] for p in inference.predict(served, items[:50], explain="none"))
    anomalies = inference.predict(served, items, explain="anomalies")
    assert any(p["is_anomaly"] for p in anomalies)
    assert all(bool(p["reasons"]) == p["is_anomaly"] for p in anomalies)


# --- the 8-field body ---------------------------------------------------------------------------------------


def _summary_items(records: list[dict]) -> list[SummaryTransaction]:
    return [SummaryTransaction.model_validate(summary_body(r)) for r in records]


def test_summary_known_features_equal_the_canonical_ones() -> None:
    records = [r for r in RECORDS[:500] if r["input_value"] is not None]
    canonical = compute_features(
        inference.canonical_table([ITEM_ADAPTER.validate_python(r) for r in records])
    )
    summary = compute_features(inference.summary_table(_summary_items(records)))
    known = sorted(core.SUMMARY_KNOWN)
    pd.testing.assert_frame_equal(summary[known], canonical[known])


def test_summary_imputes_medians_and_reports_them(served) -> None:
    records = [r for r in RECORDS[:300] if r["input_value"] is not None]
    preds = inference.predict(served, _summary_items(records), explain="all")
    assert {p["model_kind"] for p in preds} == {"full"}
    assert all(p["missing_features"] == core.SUMMARY_IMPUTED["full"] for p in preds)
    for p in preds:
        for reason in p["reasons"]:
            assert reason["imputed"] == (reason["feature"] in core.SUMMARY_IMPUTED["full"])
            if reason["imputed"]:
                assert reason["value"] == sample_bundle().stats["full"].q(reason["feature"], 0.5)


def test_summary_without_fee_goes_to_the_structural_forest(served) -> None:
    body = summary_body(RECORDS[10]) | {"fee": None, "input_value": None}
    (pred,) = inference.predict(served, [SummaryTransaction.model_validate(body)])
    assert pred["model_kind"] == "structural"
    assert set(FEATURES_PREVOUT) <= set(pred["missing_features"])
    assert set(core.SUMMARY_IMPUTED["structural"]) <= set(pred["missing_features"])


def test_summary_completes_fee_or_input_value() -> None:
    r = next(r for r in RECORDS if r["fee"] and r["input_value"])
    only_input = SummaryTransaction.model_validate(summary_body(r) | {"fee": None})
    only_fee = SummaryTransaction.model_validate(summary_body(r) | {"input_value": None})
    assert only_input.fee == r["fee"] and only_fee.input_value == r["input_value"]


def test_mixed_batch_keeps_order(served) -> None:
    canonical = [ITEM_ADAPTER.validate_python(r) for r in RECORDS[:6]]
    summary = _summary_items(RECORDS[6:12])
    mixed = [canonical[0], summary[0], summary[1], canonical[1], summary[2], canonical[2]]
    preds = inference.predict(served, mixed)
    assert [p["hash"] for p in preds] == [m.hash for m in mixed]
    imputed = ["output_hhi" in p["missing_features"] for p in preds]
    assert imputed == [False, True, True, False, True, False]


def test_huge_declared_counts_are_cheap_and_bounded(served) -> None:
    body = {
        "hash": "ab" * 32,
        "size": 3_900_000,
        "weight": 3_990_000,
        "inputs_count": 1,
        "outputs_count": 400_000,
        "output_value": 10**8,
    }
    item = SummaryTransaction.model_validate(body)
    (pred,) = inference.predict(served, [item], max_ios=2_000_000)
    assert pred["model_kind"] == "structural"
    with pytest.raises(inference.BatchTooLarge):
        inference.predict(served, [item] * 6, max_ios=2_000_000)


def test_parser_accepts_both_shapes() -> None:
    parser = BodyParser(max_items=10)
    items, single = parser.transactions(orjson.dumps(RECORDS[0]))
    assert single and items[0].hash == RECORDS[0]["hash"]
    items, single = parser.transactions(orjson.dumps([RECORDS[0], summary_body(RECORDS[1])]))
    assert not single and isinstance(items[1], SummaryTransaction)
