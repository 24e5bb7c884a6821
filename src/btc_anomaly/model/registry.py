"""MLflow registry access shared by training, the promotion gate and scoring."""

from __future__ import annotations

import getpass
import socket
from dataclasses import dataclass
from typing import Any

from btc_anomaly.config import Settings

CHAMPION = "champion"
CHALLENGER = "challenger"


def whoami() -> str:
    """Who decided: ``user@host`` of this process (overridable with ``--by``)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def client(settings: Settings) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)


def use_tracking(settings: Settings) -> None:
    """Point the fluent mlflow API (runs, log_model, load_model) at the configured server."""
    import mlflow

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)


def version_by_alias(settings: Settings, alias: str, mlflow_client: Any | None = None) -> Any | None:
    """The ModelVersion an alias points to, or None if the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    c = mlflow_client or client(settings)
    try:
        return c.get_model_version_by_alias(settings.model_name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


@dataclass
class LoadedVersion:
    name: str
    version: str
    run_id: str | None
    tags: dict[str, str]
    bundle: Any  # ModelBundle


def load_version(settings: Settings, version: str | int) -> LoadedVersion:
    """Load one registered version through the pyfunc loader (what serving does) and unwrap its bundle."""
    import mlflow.pyfunc

    use_tracking(settings)
    mv = client(settings).get_model_version(settings.model_name, str(version))
    model = mlflow.pyfunc.load_model(f"models:/{settings.model_name}/{mv.version}")
    return LoadedVersion(
        name=settings.model_name,
        version=str(mv.version),
        run_id=mv.run_id,
        tags=dict(mv.tags or {}),
        bundle=model.unwrap_python_model().bundle,
    )


def load_alias(settings: Settings, alias: str) -> LoadedVersion | None:
    """Load the version behind ``models:/<name>@<alias>``; None when the alias is not set."""
    mv = version_by_alias(settings, alias)
    if mv is None:
        return None
    # Load the version the alias resolved to, so the number we report is the one we loaded even if
    # the alias moves meanwhile.
    return load_version(settings, mv.version)
