"""Helpers shared by the unit tests: the committed real-data fixtures (see tests/fixtures/SOURCES.md)."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def read_fixture_bytes(path: Path | str) -> bytes:
    """A fixture's content, transparently gunzipped when the file name ends in ``.gz``."""
    path = FIXTURES / path
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


@pytest.fixture
def read_fixture() -> Callable[[Path | str], bytes]:
    return read_fixture_bytes
