"""promote(): the decision is recorded before the champion alias moves, and a failed run can be re-run.

A fake registry stands in for MLflow (the real one is exercised in tests/integration/test_model_lifecycle.py);
the gate's checks are stubbed: this is about the order of registry writes, not the checks.
"""

from __future__ import annotations

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
