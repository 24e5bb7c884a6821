"""The requirements audit (`scripts/audit_requirements.py`) on a recorded PyPI answer."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ECDSA = json.loads((ROOT / "tests/fixtures/pypi/ecdsa.json").read_text())


@pytest.fixture(scope="module")
def audit():
    spec = importlib.util.spec_from_file_location(
        "audit_requirements", ROOT / "scripts/audit_requirements.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_newest_release_carries_its_listed_advisories(audit) -> None:
    finding = audit.assess("ecdsa", ECDSA["info"]["version"], ECDSA, allowed={})
    assert finding.affected == ["PYSEC-2026-1325", "GHSA-wj6h-64fc-37mp"]
    assert finding.allowed == []


def test_a_pin_below_a_fix_is_affected_and_one_at_the_fix_is_not(audit) -> None:
    project = {
        "info": {"version": "3.0"},
        "vulnerabilities": [{"id": "X-1", "fixed_in": ["2.5"], "aliases": []}],
    }
    assert audit.assess("p", "2.4.9", project, allowed={}).affected == ["X-1"]
    assert audit.assess("p", "2.5", project, allowed={}).affected == []


def test_an_advisory_is_allowed_by_its_id_or_an_alias(audit) -> None:
    by_alias = audit.assess(
        "ecdsa", ECDSA["info"]["version"], ECDSA, allowed={"CVE-2024-23342": "no signing here"}
    )
    assert by_alias.allowed == by_alias.affected


def test_withdrawn_advisories_do_not_count(audit) -> None:
    project = {
        "info": {"version": "1.0"},
        "vulnerabilities": [{"id": "W", "withdrawn": "2026-01-01", "fixed_in": []}],
    }
    assert audit.assess("p", "1.0", project, allowed={}).affected == []


def test_pins_are_read_with_normalised_names(audit, tmp_path: Path) -> None:
    pins = tmp_path / "x.txt"
    pins.write_text("Typing_Extensions==4.16.0\n    # via typer\nrequests==2.0 ; python_version<'4'\n-e .\n")
    assert audit.read_pins([pins]) == {"typing-extensions": "4.16.0", "requests": "2.0"}


def test_an_allow_line_without_a_reason_is_refused(audit, tmp_path: Path) -> None:
    allow = tmp_path / "allow.txt"
    allow.write_text("GHSA-1\n")
    with pytest.raises(SystemExit, match="needs a reason"):
        audit.read_allowed(allow)
