"""``scripts/mutation_score.py``: the kill rate `make mutation` reports, and the equivalent-mutant list it
trusts only while it still fits the code (mutmut renumbers mutants after an edit)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "mutation_score.py"
MODULE = "btc_anomaly.features"
KILLED, SURVIVED = 1, 0  # mutmut's exit codes (mutmut.stats.status_by_exit_code)


@pytest.fixture
def score(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("mutation_score", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "ROOT", tmp_path)
    monkeypatch.setattr(module, "mutated_line", lambda name: "")
    return module


def _results(root: Path, codes: dict[int, int | None]) -> None:
    meta = root / "mutants" / "src" / "btc_anomaly" / "features.py.meta"
    meta.parent.mkdir(parents=True)
    by_key = {f"{MODULE}.x_f__mutmut_{n}": code for n, code in codes.items()}
    meta.write_text(json.dumps({"exit_code_by_key": by_key, "durations_by_key": {}}))


def test_a_listed_survivor_leaves_the_denominator(
    score: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _results(tmp_path, {1: KILLED, 2: KILLED, 3: KILLED, 4: KILLED, 5: KILLED, 6: KILLED, 7: KILLED,
                        8: KILLED, 9: KILLED, 10: SURVIVED})  # fmt: skip
    monkeypatch.setattr(score, "EQUIVALENT", {f"{MODULE}.x_f__mutmut_10": "the same for every input"})
    assert score.main() == 0
    row = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("btc_anomaly/features.py"))
    assert row.split()[1:7] == ["10", "9", "0", "0", "1", "100.0%"]


def test_an_unlisted_survivor_counts_against_the_score(
    score: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _results(tmp_path, {1: KILLED, 2: KILLED, 3: KILLED, 4: SURVIVED})
    monkeypatch.setattr(score, "EQUIVALENT", {})
    assert score.main() == 1
    out = capsys.readouterr().out
    assert "75.0%" in out and f"{MODULE}.x_f__mutmut_4" in out and "below 90%" in out


def test_a_listed_mutant_that_was_killed_makes_the_list_stale(
    score: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # After an edit, number 2 names another mutant, which a test kills; the survivor is now number 3.
    _results(tmp_path, {1: KILLED, 2: KILLED, 3: SURVIVED} | {n: KILLED for n in range(4, 31)})
    monkeypatch.setattr(score, "EQUIVALENT", {f"{MODULE}.x_f__mutmut_2": "written for the old number 2"})
    assert score.main() == 1
    out = capsys.readouterr().out
    row = next(x for x in out.splitlines() if x.startswith("btc_anomaly/features.py"))
    assert row.split()[1:6] == ["30", "29", "1", "0", "0"]  # killed, survived, no test, equivalent
    assert f"{MODULE}.x_f__mutmut_2: killed" in out
    assert f"{MODULE}.x_f__mutmut_3" in out.split("not killed")[1]


def test_a_listed_mutant_a_stopped_run_never_reached_is_not_stale(
    score: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _results(tmp_path, {n: KILLED for n in range(1, 20)} | {20: None})
    monkeypatch.setattr(score, "EQUIVALENT", {f"{MODULE}.x_f__mutmut_20": "the same for every input"})
    assert score.main() == 0
    assert "did not survive" not in capsys.readouterr().out
