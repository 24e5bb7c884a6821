"""Train → register → gate → champion against a real MLflow server, from a Delta table of the sample."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import cloudpickle
import pandas as pd
import pyarrow as pa
import pytest
from deltalake import write_deltalake

import btc_anomaly.model.train as train_module
from btc_anomaly.config import PROJECT_ROOT, Settings
from btc_anomaly.features import compute_features
from btc_anomaly.model.promotion import champion_history, promote, promotion_history
from btc_anomaly.model.registry import CHALLENGER, CHAMPION, client
from btc_anomaly.model.scoring import SCORED_COLUMNS, cached_champion, map_in_pandas_scorer
from btc_anomaly.model.train import train
from btc_anomaly.runtime.mlflow_server import MlflowServer
from btc_anomaly.schema import Transaction, arrow_schema

pytestmark = pytest.mark.integration
SAMPLE = PROJECT_ROOT / "data" / "sample" / "transactions.jsonl.gz"
BENCH_TAGS = (
    "bench.canonical.roc_auc",
    "bench.canonical.precision_at_50",
    "bench.summary.roc_auc",
    "bench.canonical.normal_flag_rate",
)


def _write_table(path: Path, limit: int | None = None) -> None:
    lines = gzip.decompress(SAMPLE.read_bytes()).splitlines()
    # The 20-row table is the 20 most recent transactions, so "most recent" windows see the same rows.
    lines = lines[-limit:] if limit else lines
    rows = [Transaction.model_validate_json(line).model_dump() for line in lines]
    write_deltalake(str(path), pa.Table.from_pylist(rows, schema=arrow_schema()))


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lake")
    _write_table(root / "transactions")
    _write_table(root / "tiny", limit=20)
    return root


@pytest.fixture(scope="module")
def settings(mlflow_server: MlflowServer, lake: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    # A model name of its own: the server is shared by the whole session.
    return Settings(
        state_dir=tmp_path_factory.mktemp("state"),
        mlflow_tracking_uri=mlflow_server.url,
        model_name=f"btc-anomaly-iforest-{uuid.uuid4().hex[:8]}",
        model_train_table=lake / "transactions",
    )


def test_lifecycle(settings: Settings, lake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking.client import MlflowClient

    c = client(settings)
    # MLflow's log_model reads the history of every metric its run already has, one request each: the
    # benchmark's few hundred took minutes against compose's MLflow (auth + Postgres), so they are
    # logged after the model. Counted on the real client, which still answers.
    history_reads: list[str] = []
    real_history = MlflowClient.get_metric_history

    def counted_history(self: MlflowClient, run_id: str, key: str) -> object:
        history_reads.append(key)
        return real_history(self, run_id, key)

    monkeypatch.setattr(MlflowClient, "get_metric_history", counted_history)

    # 1. First model: registered, challenger, passes the gate, becomes champion.
    first = train(settings, decided_by="ci@test", progress=False)
    assert len(history_reads) < 20, f"{len(history_reads)} metric histories read while logging the model"
    monkeypatch.undo()
    assert first.version == "1"
    assert first.metrics["rows"] == 5274
    assert first.decision.promoted, first.decision.summary
    assert c.get_model_version_by_alias(settings.model_name, CHAMPION).version == "1"
    assert c.get_model_version_by_alias(settings.model_name, CHALLENGER).version == "1"
    mv = c.get_model_version(settings.model_name, "1")
    assert mv.tags["promotion.status"] == "promoted"
    assert mv.tags["promotion.decided_by"] == "ci@test"
    assert mv.tags["train.data_digest"] == first.params["data_digest"]
    assert "PROMOTED" in mv.description

    run = c.get_run(first.run_id)
    for p in ("n_estimators", "max_samples", "contamination", "random_state", "window_start", "window_end"):
        assert p in run.data.params
    for m in ("rows", "anomaly_rate_full", "score_p99_full", "fit_seconds", "total_seconds"):
        assert m in run.data.metrics
    assert run.inputs.dataset_inputs, "training dataset not logged"
    artifacts = {a.path for a in c.list_artifacts(first.run_id, "plots")}
    assert artifacts == {"plots/score_histogram.png", "plots/fee_rate_vs_value.png", "plots/benchmark_pr.png"}
    # The benchmark evaluation of the new bundle: metrics, table, headline tags, and a passed gate check.
    assert "benchmark.md" in {a.path for a in c.list_artifacts(first.run_id)}
    for key in ("bench.canonical.roc_auc", "bench.summary.roc_auc", "bench.raw.roc_auc"):
        assert 0.5 < run.data.metrics[key] <= 1.0, key
    for key in BENCH_TAGS:
        assert float(mv.tags[key]) == pytest.approx(run.data.metrics[key], abs=1e-6), key
    bench_check = next(ch for ch in first.decision.checks if ch.name == "benchmark")
    assert bench_check.passed and "no champion yet" in bench_check.detail

    # 2. A bad challenger (20 rows) is refused, with the reason recorded; the champion stays.
    bad = train(
        settings.model_copy(update={"model_train_table": lake / "tiny"}), decided_by="ci@test", progress=False
    )
    assert bad.version == "2"
    assert not bad.decision.promoted
    failed = {ch.name for ch in bad.decision.failed}
    assert {"min_train_rows", "anomaly_rate"} <= failed
    assert c.get_model_version_by_alias(settings.model_name, CHAMPION).version == "1"
    assert c.get_model_version_by_alias(settings.model_name, CHALLENGER).version == "2"
    mv2 = c.get_model_version(settings.model_name, "2")
    assert mv2.tags["promotion.status"] == "refused"
    assert "min_train_rows" in mv2.tags["promotion.reason"] and "20 rows" in mv2.tags["promotion.reason"]
    assert "REFUSED" in mv2.description

    # The process-wide champion cache (stream workers, API) serves v1 until the alias moves.
    live = settings.model_copy(update={"model_reload_s": 0.0})
    assert cached_champion(live).version == "1"

    # 3. A second good model on another seed: agreement with the champion is checked, then promoted.
    second = train(
        settings.model_copy(update={"iforest_random_state": 7}), decided_by="ci@test", progress=False
    )
    assert second.decision.promoted, second.decision.summary
    agreement = next(ch for ch in second.decision.checks if ch.name == "champion_agreement")
    assert agreement.value is not None and agreement.value >= settings.gate_min_rank_corr
    assert c.get_model_version(settings.model_name, "1").tags["promotion.superseded_by"] == "3"
    assert cached_champion(live).version == "3"

    # The mapInPandas function pickles (Spark uses cloudpickle) and scores batches with the champion.
    scorer = cloudpickle.loads(
        cloudpickle.dumps(map_in_pandas_scorer(settings.mlflow_tracking_uri, settings.model_name))
    )
    txs = pd.read_json(SAMPLE, lines=True, nrows=300)
    batches = list(scorer(iter([txs.iloc[:120], txs.iloc[120:]])))
    assert [len(b) for b in batches] == [120, 180]
    assert all(list(b.columns) == SCORED_COLUMNS for b in batches)
    assert {v for b in batches for v in b["model_version"]} == {"3"}

    # 4. Re-gating the refused version explicitly is refused again and recorded again.
    again = promote(settings, "2", decided_by="ops@test")
    assert not again.promoted

    history = promotion_history(settings)
    assert [(e["version"], e["status"]) for e in history] == [
        ("1", "promoted"),
        ("2", "refused"),
        ("3", "promoted"),
        ("2", "refused"),
    ]
    assert history[-1]["decided_by"] == "ops@test"
    assert [e["version"] for e in champion_history(settings)] == ["1", "3"]
    assert history[2]["previous_champion"] == "1"

    # 5. models:/<name>@champion loads and scores in a fresh process (what the stream and API do).
    code = """
import json, sys, gzip, itertools
import pandas as pd
from btc_anomaly.config import Settings
from btc_anomaly.model.scoring import load_champion, score_frame
s = Settings()
model = load_champion(s)
lines = list(itertools.islice(gzip.open(sys.argv[1]), 200))
out = score_frame(pd.DataFrame([json.loads(x) for x in lines]), model, settings=s)
print(json.dumps({"version": model.version, "rows": len(out), "kinds": sorted(set(out.model_kind)),
                  "scores_ok": bool(out.anomaly_score.between(0, 1).all())}))
"""
    env = dict(
        os.environ,
        BTC_ANOMALY_MLFLOW_TRACKING_URI=settings.mlflow_tracking_uri,
        BTC_ANOMALY_MODEL_NAME=settings.model_name,
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(SAMPLE)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"version": "3", "rows": 200, "kinds": ["full", "structural"], "scores_ok": True}

    # 6. The CLI reads the same history back.
    cli = subprocess.run(
        [sys.executable, "-m", "btc_anomaly.cli", "promote", "--history"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert [json.loads(line)["status"] for line in cli.stdout.strip().splitlines()] == [
        "promoted",
        "refused",
        "promoted",
        "refused",
    ]


def _one_feature_only(frame: pd.DataFrame) -> pd.DataFrame:
    """Training features in which every column but the output value is a constant (missing stays missing,
    so rows are routed to the same forest): a model blind to fees, counts and scripts."""
    features = compute_features(frame)
    for column in features.columns:
        if column != "log_output_value":
            features[column] = features[column].where(features[column].isna(), 0.0)
    return features


def test_gate_refuses_a_challenger_worse_on_the_benchmark(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A model of its own, and every other check opened wide: the benchmark is the only one that can refuse.
    own = settings.model_copy(
        update={
            "model_name": f"btc-anomaly-bench-{uuid.uuid4().hex[:8]}",
            "gate_rate_tolerance": 1000.0,
            "gate_reference_max_flag_rate": 1.0,
            "gate_min_rank_corr": -1.0,
            "gate_canary_min_flagged": 0.0,
        }
    )
    c = client(own)
    champion = train(own, decided_by="ci@test", progress=False)
    assert champion.decision.promoted, champion.decision.summary

    monkeypatch.setattr(train_module, "compute_features", _one_feature_only)
    worse = train(own, decided_by="ci@test", progress=False)
    assert not worse.decision.promoted
    assert [ch.name for ch in worse.decision.failed] == ["benchmark"]
    check = worse.decision.failed[0]
    assert (
        "below the champion's" in check.detail
        and f"tolerance {own.gate_benchmark_tolerance:g}" in check.detail
    )
    assert "canonical ROC-AUC" in check.detail
    assert (
        worse.decision.metrics["benchmark.canonical.roc_auc"]
        < worse.decision.metrics["benchmark.champion.canonical.roc_auc"] - own.gate_benchmark_tolerance
    )
    # Recorded like every other refusal; the champion stays.
    mv = c.get_model_version(own.model_name, worse.version)
    assert mv.tags["promotion.status"] == "refused"
    assert mv.tags["promotion.reason"].startswith("benchmark: ")
    assert json.loads(mv.tags["promotion.checks"])["benchmark"]["passed"] is False
    assert c.get_model_version_by_alias(own.model_name, CHAMPION).version == champion.version
    # What train() logged for it says the same: its headline numbers are below the champion's.
    assert float(mv.tags["bench.canonical.roc_auc"]) < float(
        c.get_model_version(own.model_name, champion.version).tags["bench.canonical.roc_auc"]
    )

    # `btc-anomaly evaluate` reads both back from the registry and measures them the same way.
    env = dict(
        os.environ,
        BTC_ANOMALY_MLFLOW_TRACKING_URI=own.mlflow_tracking_uri,
        BTC_ANOMALY_MODEL_NAME=own.model_name,
    )
    cli = [sys.executable, "-m", "btc_anomaly.cli", "evaluate"]
    table = subprocess.run(
        [*cli, "--version", worse.version], capture_output=True, text=True, env=env, timeout=300
    )
    assert table.returncode == 0, table.stderr[-3000:]
    assert f"{own.model_name} v{worse.version}" in table.stdout
    assert "| canonical | anomaly_score |" in table.stdout and "| past_range_fee_rate |" in table.stdout
    flat = subprocess.run([*cli, "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert flat.returncode == 0, flat.stderr[-3000:]
    assert json.loads(flat.stdout)["bench.canonical.roc_auc"] == pytest.approx(
        worse.decision.metrics["benchmark.champion.canonical.roc_auc"]
    )
