"""The detection-quality goals on the labelled benchmark (src/btc_anomaly/resources/benchmark.jsonl.gz).

The model is the production detector fit on the bundled sample with the trainer's own ``fit_transactions``
(what `make demo` trains); the benchmark's normal rows were held out of that sample, its anomalies are
modified held-out transactions. Deterministic: quality thresholds belong here, timings in bench/.
"""

from __future__ import annotations

from functools import lru_cache

import pandas as pd
import pytest

from btc_anomaly.config import Settings
from btc_anomaly.model.evaluate import EvalReport, bundle_scorer, evaluate
from btc_anomaly.model.train import fit_transactions
from helpers.api_server import sample_records


@lru_cache(maxsize=2)
def _report(first_rows: int | None = None) -> EvalReport:
    frame = pd.DataFrame(sample_records())
    if first_rows is not None:
        frame = frame.iloc[:first_rows]
    bundle, _ = fit_transactions(frame, Settings())
    return evaluate(bundle_scorer(bundle, Settings(risk_detectors=False)))


def _named(report: EvalReport, path: str) -> dict[str, float]:
    """Per archetype ROC-AUC; the real historical oddities (one or two rows each) are judged together."""
    p = report.paths[path]
    return {a: m.roc_auc for a, m in p.archetypes.items() if not a.startswith("historical_")}


@pytest.mark.parametrize("first_rows", [None, 1000], ids=["whole sample", "first 1,000 rows (demo)"])
def test_canonical_path_meets_the_goals(first_rows: int | None) -> None:
    report = _report(first_rows)
    canonical = report.paths["canonical"].score
    assert canonical.roc_auc >= 0.97
    assert canonical.precision_at_50 >= 0.95
    assert canonical.normal_flag_rate <= 0.02
    worst = min(_named(report, "canonical").items(), key=lambda kv: kv[1])
    assert worst[1] >= 0.90, worst


def test_eight_field_and_raw_paths_meet_the_goals() -> None:
    report = _report(None)
    assert report.paths["summary"].score.roc_auc >= 0.95
    raw = report.paths["raw"]
    assert raw.score.roc_auc >= 0.95
    # Raw hex without prevouts: transactions past the range of size and counts are flagged.
    for archetype in ("past_range_size", "past_range_input_count", "past_range_output_count"):
        assert raw.archetypes[archetype].recall == 1.0, archetype


def test_reasons_name_what_was_changed() -> None:
    """The reasons of flagged anomalies name a feature the archetype changed (e.g. the fee rate of an
    overpayment, the input count of a consolidation)."""
    report = _report(None)
    assert report.paths["canonical"].reason_agreement >= 0.9
    assert report.paths["raw"].reason_agreement >= 0.9
