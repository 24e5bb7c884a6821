"""Trainer metrics: a scheduled run's result, failures, the champion gauges and what the port serves."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import REGISTRY, generate_latest

from btc_anomaly.config import Settings
from btc_anomaly.model import registry
from btc_anomaly.monitoring import trainer as tm
from btc_anomaly.monitoring.exposition import filtered_registry


def value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def check(name: str, passed: bool) -> Any:
    return SimpleNamespace(name=name, passed=passed)


def result(decision: Any, version: str = "4") -> Any:
    return SimpleNamespace(
        version=version,
        metrics={
            "rows": 7006.0,
            "rows_full": 6000.0,
            "anomaly_rate": 0.0101,
            "anomaly_rate_full": 0.0102,
            "anomaly_rate_structural": 0.0099,
        },
        timings={"total_seconds": 12.5},
        decision=decision,
    )


def decision(promoted: bool, checks: list[Any], forced: bool = False) -> Any:
    return SimpleNamespace(promoted=promoted, checks=checks, forced=forced)


@pytest.fixture
def champion(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    state: dict[str, Any] = {"mv": None, "error": None}

    def fake(settings: Settings, alias: str, mlflow_client: Any = None) -> Any:
        assert alias == registry.CHAMPION
        if state["error"]:
            raise state["error"]
        return state["mv"]

    monkeypatch.setattr(registry, "version_by_alias", fake)
    return state


def test_outcomes() -> None:
    assert tm.outcome(None) == "skipped"
    assert tm.outcome(decision(True, [])) == "unchanged"
    assert tm.outcome(decision(True, [check("a", True)])) == "promoted"
    assert tm.outcome(decision(True, [check("a", False)], forced=True)) == "forced"
    assert tm.outcome(decision(False, [check("a", False)])) == "refused"


def test_a_scheduled_run_exports_its_result_and_the_champion(champion: dict[str, Any]) -> None:
    promoted_at = "2026-11-21T10:00:00.000+00:00"
    champion["mv"] = SimpleNamespace(
        version="4",
        creation_timestamp=1_790_000_000_000,
        tags={
            "promotion.status": "promoted",
            "promotion.decided_at": promoted_at,
            "train.anomaly_rate_full": "0.0102",
            "train.anomaly_rate_structural": "0.0099",
        },
    )
    runs = value("btc_trainer_runs_total", result="success")
    promoted = value("btc_trainer_promotion_decisions_total", outcome="promoted")
    gate = decision(True, [check("min_train_rows", True), check("canaries", True)])
    tm.scheduled(Settings.model_construct(), lambda: result(gate))()

    assert value("btc_trainer_runs_total", result="success") == runs + 1
    assert value("btc_trainer_consecutive_failures") == 0
    assert value("btc_trainer_last_success_timestamp_seconds") > 0
    assert value("btc_trainer_last_run_duration_seconds") == 12.5
    assert value("btc_trainer_training_rows", model_kind="structural") == 7006
    assert value("btc_trainer_training_rows", model_kind="full") == 6000
    assert value("btc_trainer_training_anomaly_rate", model_kind="all") == pytest.approx(0.0101)
    assert value("btc_trainer_model_version") == 4
    assert value("btc_trainer_promotion_decisions_total", outcome="promoted") == promoted + 1
    assert value("btc_trainer_gate_check_passed", check="canaries") == 1
    assert value("btc_trainer_champion_version") == 4
    assert value("btc_trainer_champion_created_timestamp_seconds") == 1_790_000_000
    assert value("btc_trainer_champion_promoted_timestamp_seconds") == (
        dt.datetime.fromisoformat(promoted_at).timestamp()
    )
    assert value("btc_trainer_champion_training_anomaly_rate", model_kind="full") == pytest.approx(0.0102)


def test_failures_count_in_a_row_and_are_re_raised(champion: dict[str, Any]) -> None:
    failures = value("btc_trainer_runs_total", result="failure")
    champion["error"] = RuntimeError("registry down")  # must not hide the training error either

    def boom() -> Any:
        raise FileNotFoundError("no Delta table")

    wrapped = tm.scheduled(Settings.model_construct(), boom)
    for _ in range(3):
        with pytest.raises(FileNotFoundError):
            wrapped()
    assert value("btc_trainer_runs_total", result="failure") == failures + 3
    assert value("btc_trainer_consecutive_failures") == 3
    champion["error"] = None
    champion["mv"] = None
    tm.scheduled(Settings.model_construct(), lambda: result(None))()
    assert value("btc_trainer_consecutive_failures") == 0
    assert value("btc_trainer_champion_version") == 0


def test_the_trainer_port_serves_only_trainer_and_runtime_metrics() -> None:
    text = generate_latest(filtered_registry("btc_trainer_")).decode()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
    assert "btc_trainer_runs_total" in names
    assert all(n.startswith(("btc_trainer_", "process_", "python_")) for n in names), names
