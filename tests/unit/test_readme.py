"""The README's configuration, metrics and benchmark tables and bench/RESULTS.md's headline table are
generated (from the code and ``bench/results.json``) and kept current."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "update_readme.py"


@pytest.fixture(scope="module")
def update_readme() -> ModuleType:
    spec = importlib.util.spec_from_file_location("update_readme", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_reference_sections_are_current(update_readme: ModuleType) -> None:
    text = update_readme.README.read_text()
    assert update_readme.render(text) == text, "README.md is stale: run `make readme`"


def test_results_headline_table_is_current(update_readme: ModuleType) -> None:
    text = update_readme.RESULTS_MD.read_text()
    sections = update_readme.FILES[update_readme.RESULTS_MD]
    assert update_readme.render(text, sections) == text, "bench/RESULTS.md is stale: run `make readme`"


def test_benchmark_table_follows_the_results_file(update_readme: ModuleType, tmp_path: Path) -> None:
    # A figure changed in results.json and not regenerated is what the two checks above catch.
    from bench import headline

    results = headline.load()
    assert results, "bench/results.json is missing: run `make bench`"
    changed = json.loads(json.dumps(results))
    rows = changed["benchmarks"]["bench_training"]["rows"]
    next(r for r in rows if r.get("step") == "features + fit")["seconds"] += 1000.0
    assert headline.headline_markdown(changed) != headline.headline_markdown(results)
    assert "**no**" in headline.headline_markdown(changed)  # the 60 s goal is now missed


def test_a_failed_benchmark_shows_as_not_measured(update_readme: ModuleType) -> None:
    from bench import headline

    results = json.loads(json.dumps(headline.load()))
    results["benchmarks"]["bench_dashboard"] = {"error": "RuntimeError: callback failed: 500", "rows": []}
    table = headline.headline_markdown(results)
    line = next(x for x in table.splitlines() if x.startswith("| dashboard refresh"))
    assert "not measured (bench_dashboard failed: RuntimeError: callback failed: 500)" in line


def test_every_figure_of_a_benchmark_that_ran_is_read(update_readme: ModuleType) -> None:
    # A benchmark that renames a row (or a figure that asks for a wrong one) would print "not measured"
    # in the README after a whole `make bench`; the rows of the last run must feed every figure.
    from bench import headline

    results = headline.load()
    ran = {name for name, entry in results.get("benchmarks", {}).items() if not entry.get("error")}
    unread = []
    for fig in headline.FIGURES:
        if fig.bench not in ran:
            continue
        try:
            fig.read(results)
        except headline.UNREADABLE as exc:
            unread.append(f"{fig.name}: {type(exc).__name__}: {exc}")
    assert not unread, unread
