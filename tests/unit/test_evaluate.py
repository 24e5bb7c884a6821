"""The benchmark evaluation: metrics against hand-computed cases, the 8-field reduction, the report's shape,
determinism, and the production scorer's summary path against the API's.

The bundle is the sample bundle of ``helpers.api_server`` (the trainer's ``fit_bundle`` on the bundled
sample); the benchmark file is a small one written here in the real file's format.
"""

from __future__ import annotations

import copy
import gzip
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from btc_anomaly.api import inference
from btc_anomaly.api.schemas import SummaryTransaction
from btc_anomaly.features import SPECS
from btc_anomaly.model import candidates
from btc_anomaly.model.evaluate import (
    EXPECTED_FEATURES,
    HEADLINE,
    META_COLUMNS,
    PAST_RANGE_FEATURES,
    SUMMARY_FIELDS,
    ScoredRows,
    ScoreMetrics,
    bundle_scorer,
    evaluate,
    expected_features,
    load_benchmark,
    path_report,
    pr_auc,
    precision_at,
    roc_auc,
    to_summary,
)
from helpers.api_server import sample_bundle, sample_records, served_sample_model, summary_body

RECORDS = sample_records()


# --- a small benchmark file in the real format ---------------------------------------------------------------


def _overpay(tx: dict[str, Any]) -> dict[str, Any]:
    """The largest output gives 2,000 sat/vB to the fee (stays a valid canonical transaction)."""
    t = copy.deepcopy(tx)
    big = max(t["outputs"], key=lambda o: o["value"])
    big["value"] = max(0, big["value"] - 2000 * t["vsize"])
    t["output_value"] = sum(o["value"] for o in t["outputs"])
    t["fee"] = t["input_value"] - t["output_value"]
    return t


def _fanout(tx: dict[str, Any]) -> dict[str, Any]:
    """300 more dust outputs, sizes grown to match."""
    t = copy.deepcopy(tx)
    t["outputs"] += [{"address": None, "value": 330, "script_type": "witness_v0_keyhash"}] * 300
    t["size"] += 31 * 300
    t["weight"] += 4 * 31 * 300
    t["vsize"] = (t["weight"] + 3) // 4
    big = max(t["outputs"], key=lambda o: o["value"])
    big["value"] -= 330 * 300
    t["output_count"] = len(t["outputs"])
    t["output_value"] = sum(o["value"] for o in t["outputs"])
    t["fee"] = t["input_value"] - t["output_value"]
    return t


def _raw(tx: dict[str, Any]) -> dict[str, Any]:
    t = copy.deepcopy(tx)
    t["fee"] = t["input_value"] = None
    t["inputs"] = [{"address": None, "value": None, "script_type": "unknown"} for _ in t["inputs"]]
    return t


def write_benchmark(path: Path) -> Path:
    rich = [r for r in RECORDS if r["fee"] and not r["is_coinbase"] and r["output_value"] > 10_000_000]
    normals, bases = rich[::7][:120], rich[3::11][:40]
    lines = []

    def add(split: str, label: int, arch: str, base: dict[str, Any], tx: dict[str, Any]) -> None:
        lines.append(
            {
                "id": f"{split[0]}-{len(lines):04d}",
                "split": split,
                "label": label,
                "archetype": arch,
                "source_txid": base["hash"],
                "source_block": base["block_height"],
                "change": arch,
                "tx": tx,
                "hex": "",
            }
        )

    for tx in normals:
        add("canonical", 0, "normal", tx, tx)
        add("raw", 0, "normal", tx, _raw(tx))
    for i, base in enumerate(bases):
        arch, fn = ("fee_overpayment", _overpay) if i % 2 else ("dust_fanout", _fanout)
        tx = fn(base)
        tx["hash"] = f"{i + 1:064x}"
        add("canonical", 1, arch, base, tx)
        add("raw", 1, arch, base, _raw(tx))
    with gzip.open(path, "wt") as fh:
        fh.writelines(json.dumps(line) + "\n" for line in lines)
    return path


@pytest.fixture(scope="module")
def bench_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_benchmark(tmp_path_factory.mktemp("bench") / "benchmark.jsonl.gz")


@pytest.fixture(scope="module")
def report(bench_file: Path) -> Any:
    return evaluate(bundle_scorer(sample_bundle()), bench_file, name="unit")


# --- metrics ---------------------------------------------------------------------------------------------


def test_metrics_against_hand_computed_cases() -> None:
    labels = np.array([1, 0, 1, 0])
    scores = np.array([0.9, 0.8, 0.3, 0.1])
    # Positive-negative pairs ranked right: (0.9, 0.8), (0.9, 0.1), (0.3, 0.1); wrong: (0.3, 0.8).
    assert roc_auc(labels, scores) == pytest.approx(3 / 4)
    # Ranked 1, 0, 1, 0: precision 1 at recall 1/2, 2/3 at recall 1.
    assert pr_auc(labels, scores) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert precision_at(labels, scores, 1) == 1.0
    assert precision_at(labels, scores, 2) == 0.5
    assert precision_at(labels, scores, 50) == 0.5  # fewer rows than k: all of them
    # Ties keep row order: the first of the two 0.5s is a normal.
    assert precision_at(np.array([0, 1, 0]), np.array([0.5, 0.5, 0.1]), 1) == 0.0
    assert math.isnan(roc_auc(np.array([0, 0]), np.array([0.1, 0.2])))
    assert math.isnan(pr_auc(np.array([1, 1]), np.array([0.1, 0.2])))

    m = ScoreMetrics.of(labels, scores, np.array([True, True, False, False]))
    assert m.normal_flag_rate == 0.5  # one of the two normals flagged
    assert m.recall == 0.5  # one of the two anomalies flagged
    assert m.roc_auc == pytest.approx(0.75)


def test_per_archetype_metrics_and_reason_agreement() -> None:
    frame = pd.DataFrame(
        {
            "label": [0, 0, 0, 1, 1, 1, 1],
            "archetype": ["normal"] * 3
            + ["fee_overpayment", "fee_overpayment", "past_range_log_vsize", "odd"],
        }
    )
    scored = ScoredRows(
        anomaly_score=np.array([0.1, 0.2, 0.6, 0.9, 0.5, 0.7, 0.8]),
        is_anomaly=np.array([False, False, True, True, False, False, True]),
        risk_score=np.array([0.0, 10.0, 60.0, 80.0, 20.0, 55.0, 0.0]),
        top_features=[[], [], ["log_fee"], ["log_fee_rate"], ["log_vsize"], ["log_vsize"], ["x"]],
    )
    p = path_report("canonical", frame, scored)
    fee = p.archetypes["fee_overpayment"]
    # 0.9 beats all three normals, 0.5 beats two of them: 5 of 6 pairs.
    assert fee.roc_auc == pytest.approx(5 / 6)
    assert fee.recall == 0.5
    assert fee.risk_recall == 0.5  # risk 80 >= 50, risk 20 not
    assert fee.reason_agreement == 0.5  # log_fee_rate is expected, log_vsize is not
    assert p.archetypes["past_range_log_vsize"].reason_agreement == 1.0
    assert math.isnan(p.archetypes["odd"].reason_agreement)  # no expected features: not judged
    assert p.reason_agreement == pytest.approx(2 / 3)
    assert p.score.normal_flag_rate == pytest.approx(1 / 3)
    assert p.risk is not None and p.risk.normal_flag_rate == pytest.approx(1 / 3)

    # On the raw path the fee features do not exist: fee_overpayment is not judged there.
    raw = path_report("raw", frame, scored)
    assert math.isnan(raw.archetypes["fee_overpayment"].reason_agreement)
    assert raw.reason_agreement == 1.0

    with pytest.raises(ValueError, match="different lengths"):
        ScoredRows(anomaly_score=np.zeros(3), is_anomaly=np.zeros(2, bool))


def test_expected_features_are_real_features() -> None:
    for arch, names in EXPECTED_FEATURES.items():
        assert set(names) <= set(SPECS), arch
    for quantity, names in PAST_RANGE_FEATURES.items():
        assert set(names) <= set(SPECS), quantity
    assert expected_features("past_range_input_count") == ("log_input_count",)
    assert expected_features("past_range_fee_rate") == ("log_fee_rate",)
    assert expected_features("past_range_dust_outputs") == ("log_dust_output_count",)
    assert expected_features("past_range_log_vsize") == ("log_vsize",)
    assert expected_features("past_range_no_such_quantity") == ()


# --- the 8-field reduction ----------------------------------------------------------------------------------


def test_to_summary_is_the_8_field_body() -> None:
    records = [r for r in RECORDS[:300] if r["fee"] is not None and not r["is_coinbase"]]
    summary = to_summary(pd.DataFrame(records))
    assert list(summary.columns) == list(SUMMARY_FIELDS)
    assert summary.to_dict("records") == [summary_body(r) for r in records]
    for row in summary.to_dict("records")[:50]:
        SummaryTransaction.model_validate(row)  # a valid /predict body


def test_summary_path_scores_like_predict(bench_file: Path) -> None:
    frame = load_benchmark(bench_file)
    canonical = frame[frame["split"] == "canonical"].reset_index(drop=True)
    summary = to_summary(canonical)
    ours = bundle_scorer(sample_bundle())(summary, "summary")
    items = [SummaryTransaction.model_validate(r) for r in summary.to_dict("records")]
    api = inference.predict(served_sample_model(), items, explain="all")
    assert np.array_equal(ours.anomaly_score, [p["anomaly_score"] for p in api])
    assert np.array_equal(ours.is_anomaly, [p["is_anomaly"] for p in api])
    assert ours.risk_score is not None
    assert np.allclose(ours.risk_score, [p["risk_score"] for p in api])
    assert ours.top_features == [[r["feature"] for r in p["reasons"]] for p in api]


# --- the report -------------------------------------------------------------------------------------------


def test_load_benchmark(bench_file: Path) -> None:
    frame = load_benchmark(bench_file)
    assert load_benchmark(bench_file) is frame  # cached
    assert set(META_COLUMNS) <= set(frame.columns)
    assert {"hash", "fee", "inputs", "outputs", "input_count"} <= set(frame.columns)
    assert frame["split"].value_counts().to_dict() == {"canonical": 160, "raw": 160}
    assert frame.loc[frame["split"] == "raw", "fee"].isna().all()


def test_table_shape_and_flat_metrics(report: Any) -> None:
    assert list(report.paths) == ["canonical", "summary", "raw"]
    headline, archetypes = report.table().strip().split("\n\n")
    lines = headline.splitlines()
    assert len(lines) == 2 + 2 * 3  # header, rule, anomaly + risk score per path
    assert all(line.count("|") == 12 for line in lines)
    arch_lines = archetypes.splitlines()
    assert [line.split("|")[1].strip() for line in arch_lines[2:]] == ["dust_fanout", "fee_overpayment"]
    assert all(line.count("|") == 2 + 5 * 3 for line in arch_lines)

    flat = report.flat_metrics()
    assert all(k.startswith("bench.") and math.isfinite(v) for k, v in flat.items())
    for key in HEADLINE:
        assert f"bench.{key}" in flat
    assert flat["bench.canonical.n"] == 160 and flat["bench.canonical.n_anomalies"] == 40
    assert "bench.raw.archetype.dust_fanout.roc_auc" in flat
    assert "bench.canonical.risk_precision_at_50" in flat
    assert set(report.headline()) == {f"bench.{k}" for k in HEADLINE}
    # The dust fan-outs are far outside the sample: the production model ranks them on top.
    assert report.paths["canonical"].archetypes["dust_fanout"].roc_auc > 0.9

    fig = report.pr_figure()
    assert len(fig.axes[0].lines) == 6  # anomaly + risk score per path
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_evaluation_is_deterministic(bench_file: Path, report: Any) -> None:
    again = evaluate(bundle_scorer(sample_bundle()), bench_file)
    a = {k: v for k, v in report.flat_metrics().items() if k != "bench.seconds"}
    b = {k: v for k, v in again.flat_metrics().items() if k != "bench.seconds"}
    assert a == b
    assert report.table() == again.table()


# --- candidates -------------------------------------------------------------------------------------------


def test_raw8_columns_are_the_same_from_canonical_and_8_field_rows() -> None:
    frame = pd.DataFrame([r for r in RECORDS[:200] if r["fee"] is not None])
    a = candidates.raw8_columns(frame)
    b = candidates.raw8_columns(to_summary(frame))
    pd.testing.assert_frame_equal(a, b)
    assert list(a.columns) == candidates.RAW8_FULL


def test_time_protocol_split(bench_file: Path) -> None:
    sample = pd.DataFrame(RECORDS)
    train, rows = candidates.protocol_data("time", sample, load_benchmark(bench_file))
    assert (pd.to_numeric(train["block_height"]) < candidates.TIME_SPLIT_BLOCK).all()
    assert (rows["source_block"] == candidates.TIME_SPLIT_BLOCK).all()
    extra = rows[rows["id"].str.startswith("sample-")]
    n_block = int((pd.to_numeric(sample["block_height"]) == candidates.TIME_SPLIT_BLOCK).sum())
    assert len(extra) == 2 * n_block and (extra["label"] == 0).all()
    assert extra.loc[extra["split"] == "raw", "fee"].isna().all()
