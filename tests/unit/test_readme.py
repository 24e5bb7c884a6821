"""The README's configuration and metrics references are generated from the code and kept current."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "update_readme.py"


def test_readme_reference_sections_are_current() -> None:
    spec = importlib.util.spec_from_file_location("update_readme", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.README.read_text()
    assert module.render(text) == text, "README.md is stale: run `make readme`"
