"""Each promotion-gate check refuses a real failing challenger, through the real MLflow server.

Every challenger is a bundle trained by ``train()`` on a real slice of the bundled sample and registered
in the session MLflow server; ``promote()`` then gates it with every *other* check opened wide in
Settings, so the check under test is the only one that can refuse, and the refusal it records on the
version (``promotion.status``/``promotion.reason``/``promotion.checks``) is asserted.

The registry-write order (the record before the alias, a re-run that finishes a half-done promotion) is
checked here too, on the real client with one call made to fail.
"""

from __future__ import annotations

import gzip
import json
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pandas as pd
import pytest

from btc_anomaly.config import PROJECT_ROOT, Settings
from btc_anomaly.model import promotion
from btc_anomaly.model.promotion import GateDecision, champion_history, promote, promotion_history
from btc_anomaly.model.reference import canary_transactions
from btc_anomaly.model.registry import CHAMPION, client
from btc_anomaly.model.train import TrainingData, train
from btc_anomaly.runtime.mlflow_server import MlflowServer

pytestmark = pytest.mark.integration

SAMPLE = PROJECT_ROOT / "data" / "sample" / "transactions.jsonl.gz"
# The sample's 2017 block: a champion that knows only its fee market and mix ranks the reference set
# differently from a model of the whole sample (Spearman ~0.5 with ``canaries_trained_in``, below the
# 0.6 default).
STALE_BLOCK = 481824

# Every check opened wide (Settings values no model can miss); ``only()`` closes one again.
OPEN: dict[str, dict[str, Any]] = {
    "min_train_rows": {"gate_min_train_rows": 0},
    "anomaly_rate": {"gate_rate_tolerance": math.inf},  # [0, inf]: a flag rate of 0 passes too
    "reference_stability": {"gate_reference_max_flag_rate": 1.0},
    "champion_agreement": {"gate_min_rank_corr": -1.0},
    "canaries": {"gate_canary_min_flagged": 0.0},
    "benchmark": {"gate_benchmark_tolerance": 1.0, "gate_benchmark_min_roc_auc": 0.0},
}


@pytest.fixture(scope="module")
def sample() -> pd.DataFrame:
    lines = gzip.decompress(SAMPLE.read_bytes()).splitlines()
    return pd.DataFrame([orjson.loads(line) for line in lines])


@pytest.fixture(scope="module")
def base(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    # 30 trees: the checks judge what a forest learned from its data, not how finely (and it is fast).
    return Settings(
        state_dir=tmp_path_factory.mktemp("gate-state"),
        mlflow_tracking_uri=mlflow_server.url,
        model_name=f"btc-anomaly-gate-{uuid.uuid4().hex[:8]}",
        iforest_n_estimators=30,
    )


def only(settings: Settings, check: str) -> Settings:
    """``settings`` with every check but ``check`` opened wide (the defaults for ``check``)."""
    wide = {k: v for name, values in OPEN.items() if name != check for k, v in values.items()}
    return settings.model_copy(update=wide)


def register(settings: Settings, frame: pd.DataFrame, what: str) -> str:
    """Train on ``frame`` and register the version as the challenger, without gating it."""
    # The source is where the rows came from (MLflow resolves it as a dataset source); ``what`` names the
    # slice in the version's training summary via its digest and window.
    data = TrainingData(frame.reset_index(drop=True), None, None, source=str(SAMPLE))
    result = train(settings, data=data, promote=False, decided_by="ci@gate", progress=False)
    assert result.version is not None
    return result.version


@dataclass
class Registered:
    settings: Settings
    versions: dict[str, str]  # what → version


@pytest.fixture(scope="module")
def truncated(base: Settings, sample: pd.DataFrame) -> str:
    """The 400 most recent transactions: too few to have learnt what normal is."""
    return register(base, sample.sort_values("first_seen").tail(400), "truncated")


@pytest.fixture(scope="module")
def registered(base: Settings, sample: pd.DataFrame, truncated: str) -> Registered:
    canaries = canary_transactions()
    slices = {
        # The five canaries 60 times each among the sample: what the gate must see flagged is ordinary
        # to this forest, and thousands of identical rows tie its scores (the training flag rate drifts).
        "canaries_trained_in": pd.concat([sample, *[canaries] * 60], ignore_index=True),
        # Only one-input, at most two-output, small transactions: every bigger ordinary transaction of the
        # reference set lies past its training range.
        "small_only": sample[
            (sample["input_count"] == 1) & (sample["output_count"] <= 2) & (sample["vsize"] < 300)
        ],
        "stale_block": sample[sample["block_height"] == STALE_BLOCK],
    }
    versions = {what: register(base, frame, what) for what, frame in slices.items()}
    return Registered(base, {"truncated": truncated, **versions})


def assert_refused_by(d: GateDecision, settings: Settings, check: str, *needles: str) -> None:
    """Only ``check`` failed, and the version carries the refusal with that check's reason."""
    assert not d.promoted, d.summary
    assert [c.name for c in d.failed] == [check], d.summary
    reason = client(settings).get_model_version(settings.model_name, d.version).tags
    assert reason["promotion.status"] == "refused"
    assert reason["promotion.reason"].startswith(f"{check}: ")
    for needle in needles:
        assert needle in reason["promotion.reason"], reason["promotion.reason"]
    recorded = json.loads(reason["promotion.checks"])
    assert recorded[check]["passed"] is False
    assert all(v["passed"] for name, v in recorded.items() if name != check)
    last = [e for e in promotion_history(settings) if e["version"] == d.version][-1]
    assert last["status"] == "refused" and last["reason"] == d.reason


def test_min_train_rows_refuses_a_truncated_window(registered: Registered) -> None:
    s = only(registered.settings, "min_train_rows")
    d = promote(s, registered.versions["truncated"], decided_by="ci@gate")
    assert_refused_by(d, s, "min_train_rows", "trained on 400 rows (minimum 1,000)")


def test_anomaly_rate_refuses_a_forest_of_tied_rows(registered: Registered) -> None:
    s = only(registered.settings, "anomaly_rate")
    d = promote(s, registered.versions["canaries_trained_in"], decided_by="ci@gate")
    assert_refused_by(d, s, "anomaly_rate", "outside [0.0050, 0.0200]")


def test_reference_stability_refuses_a_model_that_flags_ordinary_traffic(registered: Registered) -> None:
    s = only(registered.settings, "reference_stability")
    d = promote(s, registered.versions["small_only"], decided_by="ci@gate")
    assert_refused_by(d, s, "reference_stability", "of 500 reference transactions flagged (max 5.0%)")
    check = d.failed[0]
    assert check.value is not None and check.value > 0.05
    assert d.metrics["reference_flag_rate"] == check.value


def test_canaries_refuses_a_model_that_learnt_them_as_normal(registered: Registered) -> None:
    s = only(registered.settings, "canaries")
    d = promote(s, registered.versions["canaries_trained_in"], decided_by="ci@gate")
    assert_refused_by(d, s, "canaries", "0/5 canaries flagged (missed ")
    assert d.metrics["canary_flagged_share"] == 0.0


def test_benchmark_floor_refuses_a_model_blind_to_the_benchmark(registered: Registered) -> None:
    s = only(registered.settings, "benchmark")
    d = promote(s, registered.versions["small_only"], decided_by="ci@gate")
    assert_refused_by(d, s, "benchmark", f"below the floor {s.gate_benchmark_min_roc_auc:g}")
    assert d.metrics["benchmark.canonical.roc_auc"] < s.gate_benchmark_min_roc_auc


def test_champion_agreement_refuses_a_challenger_that_reorders_the_reference_set(
    registered: Registered,
) -> None:
    s = only(registered.settings, "champion_agreement")
    stale = registered.versions["stale_block"]
    # No champion yet: the check has nothing to compare and passes; the stale model is forced in.
    assert promote(s, stale, decided_by="ci@gate", force=True).promoted
    c = client(s)
    assert c.get_model_version_by_alias(s.model_name, CHAMPION).version == stale

    whole = registered.versions["canaries_trained_in"]  # the whole sample (plus the canaries)
    d = promote(s, whole, decided_by="ci@gate")
    assert_refused_by(d, s, "champion_agreement", "with the champion on the reference set (min 0.6)")
    assert d.metrics["champion_rank_corr"] < s.gate_min_rank_corr
    assert c.get_model_version_by_alias(s.model_name, CHAMPION).version == stale

    # The same challenger with the check open is promoted: agreement was the only thing in its way.
    wide = s.model_copy(update=OPEN["champion_agreement"])
    assert promote(wide, whole, decided_by="ci@gate").promoted
    assert c.get_model_version_by_alias(s.model_name, CHAMPION).version == whole


# --- registry-write order, on the real registry with one call failing ---------------------------------


class FailingOnce:
    """The real MLflow client with ``method`` raising on its first ``times`` calls for ``version``."""

    def __init__(self, real: Any, method: str, version: str | None = None, times: int = 1) -> None:
        self.real, self.method, self.version, self.left = real, method, version, times

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.real, name)
        if name != self.method:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            version = args[1] if len(args) > 1 else kwargs.get("version")
            if self.left > 0 and (self.version is None or str(version) == self.version):
                self.left -= 1
                raise ConnectionError(f"registry down during {name}")
            return attr(*args, **kwargs)

        return call


@pytest.fixture
def lineage(base: Settings, truncated: str) -> tuple[Settings, list[str]]:
    """A model of its own with three versions (v1 champion) that pass a gate with every check open:
    copies of a trained version (MLflow's copy_model_version), so no training per test."""
    wide = {k: v for values in OPEN.values() for k, v in values.items()}
    s = base.model_copy(update={"model_name": f"btc-anomaly-order-{uuid.uuid4().hex[:8]}", **wide})
    source = f"models:/{base.model_name}/{truncated}"
    c = client(s)
    versions = [str(c.copy_model_version(source, s.model_name).version) for _ in range(3)]
    for v in versions:  # a copy carries the source's tags: its gate decisions are not the copy's
        for key in c.get_model_version(s.model_name, v).tags:
            if key.startswith("promotion."):
                c.delete_model_version_tag(s.model_name, v, key)
    assert promote(s, versions[0], decided_by="ci@gate").promoted
    return s, versions


def failing(monkeypatch: pytest.MonkeyPatch, s: Settings, method: str, version: str | None = None) -> None:
    wrapper = FailingOnce(client(s), method, version)
    monkeypatch.setattr(promotion, "client", lambda _s: wrapper)


def champion_of(s: Settings) -> str:
    return str(client(s).get_model_version_by_alias(s.model_name, CHAMPION).version)


def test_registry_writes_failing_never_leave_an_unexplained_champion(
    lineage: tuple[Settings, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    s, (v1, v2, v3) = lineage
    c = client(s)

    # Tagging fails: nothing recorded, the alias has not moved.
    failing(monkeypatch, s, "set_model_version_tag", v2)
    with pytest.raises(ConnectionError):
        promote(s, v2, decided_by="ci@gate")
    assert champion_of(s) == v1
    assert [e["version"] for e in promotion_history(s)] == [v1]

    # The alias move fails after the record: a re-run finishes that decision instead of gating again.
    failing(monkeypatch, s, "set_registered_model_alias")
    with pytest.raises(RuntimeError, match=f"run `btc-anomaly promote {v2}` again"):
        promote(s, v2, decided_by="ci@gate")
    monkeypatch.setattr(promotion, "client", client)
    assert champion_of(s) == v1
    first = promotion_history(s)
    assert [(e["version"], e["status"]) for e in first] == [(v1, "promoted"), (v2, "promoted")]
    again = promote(s, v2, decided_by="ops@gate")
    assert again.promoted and again.decided_by == "ci@gate"  # the recorded decision, not a new one
    assert champion_of(s) == v2
    assert promotion_history(s) == first
    assert c.get_model_version(s.model_name, v2).description.count("PROMOTED") == 1
    assert c.get_model_version(s.model_name, v1).tags["promotion.superseded_by"] == v2
    assert promote(s, v2).note == "already the champion"

    # The old champion's SUPERSEDED note fails after the alias moved: the next run finishes it, once.
    failing(monkeypatch, s, "update_model_version", v2)
    with pytest.raises(ConnectionError):
        promote(s, v3, decided_by="ci@gate")
    monkeypatch.setattr(promotion, "client", client)
    assert champion_of(s) == v3
    assert "promotion.superseded_by" not in c.get_model_version(s.model_name, v2).tags
    assert promote(s, v3).note == "already the champion"
    assert c.get_model_version(s.model_name, v2).tags["promotion.superseded_by"] == v3
    assert c.get_model_version(s.model_name, v2).description.count("SUPERSEDED") == 1
    assert [e["version"] for e in champion_history(s)] == [v1, v2, v3]


def test_record_precedes_the_alias_and_a_stale_pending_promotion_is_gated_again(
    lineage: tuple[Settings, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    s, (v1, v2, v3) = lineage
    c = client(s)
    seen: dict[str, Any] = {}
    real_alias: Callable[..., Any] = c.set_registered_model_alias

    def alias_after_record(name: str, alias: str, version: str) -> None:
        # What the registry holds for the version at the moment the alias moves.
        seen.update(client(s).get_model_version(name, version).tags)
        seen["description"] = client(s).get_model_version(name, version).description
        real_alias(name, alias, version)

    monkeypatch.setattr(c, "set_registered_model_alias", alias_after_record)
    monkeypatch.setattr(promotion, "client", lambda _s: c)
    assert promote(s, v2, decided_by="ci@gate").promoted
    assert seen["promotion.status"] == "promoted" and seen["promotion.previous_champion"] == v1
    assert any(k.startswith(promotion.EVENT_PREFIX) for k in seen)
    assert "PROMOTED" in seen["description"]

    # v3 recorded as promoted over v2 but its alias move failed; v1 is promoted back meanwhile (forced,
    # as a rollback would be); v3's old decision is stale and it is gated again over v1.
    failing(monkeypatch, s, "set_registered_model_alias")
    with pytest.raises(RuntimeError):
        promote(s, v3, decided_by="ci@gate")
    monkeypatch.setattr(promotion, "client", client)
    assert promote(s, v1, decided_by="ops@gate", force=True).promoted
    d = promote(s, v3, decided_by="ops@gate")
    assert d.decided_by == "ops@gate" and d.previous_champion == v1
    assert champion_of(s) == v3
    assert len([e for e in promotion_history(s) if e["version"] == v3]) == 2
