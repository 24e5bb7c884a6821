"""promote(): the decision is recorded before the champion alias moves, and a failed run can be re-run.

A fake registry stands in for MLflow (the real one is exercised in tests/integration/test_model_lifecycle.py);
the gate's checks are stubbed: this is about the order of registry writes, not the checks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from btc_anomaly.config import Settings
from btc_anomaly.model import promotion
from btc_anomaly.model.promotion import Check, champion_history, promote, promotion_history


@dataclass
class _Version:
    version: str
    tags: dict[str, str] = field(default_factory=dict)
    description: str = "trained"
    run_id: str | None = None


class FakeRegistry:
    def __init__(self, versions: int) -> None:
        self.versions = {str(v): _Version(str(v)) for v in range(1, versions + 1)}
        self.aliases: dict[str, str] = {}
        self.log: list[tuple[str, ...]] = []
        self.fail: dict[str, int] = {}  # method → failures left

    def _maybe_fail(self, method: str) -> None:
        if self.fail.get(method, 0) > 0:
            self.fail[method] -= 1
            raise ConnectionError(f"registry down during {method}")

    def get_model_version(self, name: str, version: str) -> _Version:
        return self.versions[str(version)]

    def set_model_version_tag(self, name: str, version: str, key: str, value: str) -> None:
        self._maybe_fail("set_model_version_tag")
        self.versions[str(version)].tags[key] = value
        self.log.append(("tag", str(version), key))

    def update_model_version(self, name: str, version: str, description: str) -> None:
        self._maybe_fail("update_model_version")
        self.versions[str(version)].description = description
        self.log.append(("description", str(version)))

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        self._maybe_fail("set_registered_model_alias")
        self.aliases[alias] = str(version)
        self.log.append(("alias", alias, str(version)))

    def search_model_versions(self, _filter: str) -> list[_Version]:
        return list(self.versions.values())


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> FakeRegistry:
    reg = FakeRegistry(3)
    monkeypatch.setattr(promotion, "client", lambda _s: reg)

    def by_alias(_s: Settings, alias: str, _c: Any = None) -> Any:
        v = reg.aliases.get(alias)
        return reg.versions[v] if v else None

    monkeypatch.setattr(promotion, "version_by_alias", by_alias)
    monkeypatch.setattr(promotion, "load_version", lambda _s, v: SimpleNamespace(bundle=None, tags={}))
    monkeypatch.setattr(promotion, "load_alias", lambda _s, a: SimpleNamespace(bundle=None, tags={}))
    monkeypatch.setattr(
        promotion,
        "evaluate",
        lambda *_a: ([Check("canaries", True, 1.0, ">= 0.8", "5/5 canaries flagged")], {"m": 1.0}),
    )
    return reg


SETTINGS = Settings()


def test_record_is_written_before_the_alias_moves(registry: FakeRegistry) -> None:
    registry.aliases["champion"] = "1"
    registry.versions["1"].tags["promotion.status"] = "promoted"
    d = promote(SETTINGS, "2", decided_by="ci@test")
    assert d.promoted
    alias_at = registry.log.index(("alias", "champion", "2"))
    written = {entry[2] for entry in registry.log[:alias_at] if entry[0] == "tag" and entry[1] == "2"}
    assert {
        "promotion.status",
        "promotion.reason",
        "promotion.decided_at",
        "promotion.previous_champion",
    } <= written
    assert any(k.startswith(promotion.EVENT_PREFIX) for k in written)
    assert ("description", "2") in registry.log[:alias_at]
    assert registry.versions["1"].tags["promotion.superseded_by"] == "2"


def test_failed_tagging_leaves_the_champion_alone(registry: FakeRegistry) -> None:
    registry.aliases["champion"] = "1"
    registry.fail["set_model_version_tag"] = 1
    with pytest.raises(ConnectionError):
        promote(SETTINGS, "2", decided_by="ci@test")
    assert registry.aliases["champion"] == "1"  # no champion the history cannot explain
    assert promotion_history(SETTINGS) == []


def test_failed_alias_move_is_finished_by_a_rerun_without_a_second_decision(registry: FakeRegistry) -> None:
    registry.aliases["champion"] = "1"
    registry.fail["set_registered_model_alias"] = 1
    with pytest.raises(RuntimeError, match="run `btc-anomaly promote 2` again"):
        promote(SETTINGS, "2", decided_by="ci@test")
    assert registry.aliases["champion"] == "1"
    first = promotion_history(SETTINGS)
    assert [(e["version"], e["status"]) for e in first] == [("2", "promoted")]

    again = promote(SETTINGS, "2", decided_by="ops@test")
    assert again.promoted and again.decided_by == "ci@test"  # the recorded decision, not a new one
    assert registry.aliases["champion"] == "2"
    assert promotion_history(SETTINGS) == first
    assert registry.versions["2"].description.count("PROMOTED") == 1
    assert registry.versions["1"].tags["promotion.superseded_by"] == "2"
    assert [e["version"] for e in champion_history(SETTINGS)] == ["2"]

    # Re-running once more is a no-op.
    log_len = len(registry.log)
    assert promote(SETTINGS, "2").note == "already the champion"
    assert len(registry.log) == log_len


def test_superseded_marking_is_finished_by_a_rerun(registry: FakeRegistry) -> None:
    registry.aliases["champion"] = "1"
    calls = {"n": 0}
    original = registry.update_model_version

    def flaky(name: str, version: str, description: str) -> None:
        if version == "1":  # the old champion's note, written after the alias moved
            calls["n"] += 1
            if calls["n"] == 1:
                raise ConnectionError("registry down")
        original(name, version, description)

    registry.update_model_version = flaky  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        promote(SETTINGS, "2")
    assert registry.aliases["champion"] == "2"
    assert "promotion.superseded_by" not in registry.versions["1"].tags
    assert promote(SETTINGS, "2").note == "already the champion"
    assert registry.versions["1"].tags["promotion.superseded_by"] == "2"
    assert registry.versions["1"].description.count("SUPERSEDED") == 1


def test_stale_pending_promotion_is_gated_again(registry: FakeRegistry) -> None:
    """A promotion recorded over v1 whose alias never moved is not replayed once v3 became champion."""
    registry.aliases["champion"] = "1"
    registry.fail["set_registered_model_alias"] = 1
    with pytest.raises(RuntimeError):
        promote(SETTINGS, "2", decided_by="ci@test")
    assert promote(SETTINGS, "3").promoted
    time.sleep(0.002)  # event tags are keyed by decision time (ms): the fake registry is faster than that
    d = promote(SETTINGS, "2", decided_by="ops@test")
    assert d.decided_by == "ops@test" and d.previous_champion == "3"
    assert registry.aliases["champion"] == "2"
    assert len([e for e in promotion_history(SETTINGS) if e["version"] == "2"]) == 2


def test_refusal_never_touches_the_alias(registry: FakeRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    registry.aliases["champion"] = "1"
    monkeypatch.setattr(
        promotion, "evaluate", lambda *_a: ([Check("canaries", False, 0.2, ">= 0.8", "1/5 flagged")], {})
    )
    d = promote(SETTINGS, "2")
    assert not d.promoted
    assert registry.aliases["champion"] == "1"
    assert registry.versions["2"].tags["promotion.status"] == "refused"
    assert not any(e[0] == "alias" for e in registry.log)


# --- the benchmark check (pure logic: numbers in, Check out) -------------------------------------------------

CHAMP = {"canonical.roc_auc": 0.960, "canonical.precision_at_50": 0.90, "summary.roc_auc": 0.940}


def _bench(challenger: dict[str, float] | None, champion: dict[str, float] | None, **kw: Any) -> Check:
    return promotion.benchmark_check(challenger, champion, tolerance=0.02, min_roc_auc=0.90, **kw)


def test_benchmark_within_tolerance_passes() -> None:
    mine = {"canonical.roc_auc": 0.945, "canonical.precision_at_50": 0.88, "summary.roc_auc": 0.935}
    check = _bench(mine, CHAMP)
    assert check.passed and check.name == "benchmark"
    assert check.value == 0.945
    assert "within 0.02 of the champion" in check.detail
    assert _bench(CHAMP, None).passed  # no champion: only the floor


def test_benchmark_regression_beyond_tolerance_is_refused_with_both_values() -> None:
    mine = dict(CHAMP, **{"canonical.precision_at_50": 0.86})
    check = _bench(mine, CHAMP)
    assert not check.passed
    assert "canonical precision at 50 0.8600" in check.detail
    assert "champion's 0.9000" in check.detail and "tolerance 0.02" in check.detail
    assert "ROC-AUC" not in check.detail  # only the metric that regressed is named

    worse = dict(CHAMP, **{"summary.roc_auc": 0.90, "canonical.roc_auc": 0.93})
    detail = _bench(worse, CHAMP).detail
    assert "8-field ROC-AUC 0.9000" in detail and "canonical ROC-AUC 0.9300" in detail


def test_benchmark_floor_applies_without_and_with_a_champion() -> None:
    low = {"canonical.roc_auc": 0.85, "canonical.precision_at_50": 0.9, "summary.roc_auc": 0.9}
    check = _bench(low, None)
    assert not check.passed and "below the floor 0.9" in check.detail
    weak_champion = {"canonical.roc_auc": 0.86, "canonical.precision_at_50": 0.9, "summary.roc_auc": 0.9}
    assert not _bench(low, weak_champion).passed  # as good as the champion, still under the floor
    assert not _bench(dict(low, **{"canonical.roc_auc": math.nan}), None).passed


def test_benchmark_errors() -> None:
    failed = _bench(None, None, error="FileNotFoundError: benchmark.jsonl.gz")
    assert not failed.passed and failed.value is None
    assert failed.detail == "benchmark evaluation failed: FileNotFoundError: benchmark.jsonl.gz"
    # A champion that cannot be evaluated does not block a challenger that clears the floor.
    ok = _bench(CHAMP, None, champion_error="ValueError: feature version 1")
    assert ok.passed and "champion not comparable (ValueError: feature version 1)" in ok.detail
    # A path the champion has no number for is not compared.
    assert _bench(
        dict(CHAMP, **{"summary.roc_auc": 0.5}), dict(CHAMP, **{"summary.roc_auc": math.nan})
    ).passed
