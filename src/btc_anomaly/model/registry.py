"""MLflow registry access shared by training, the promotion gate and scoring.

A version's model is data: training records the SHA-256 of its bundle files (``bundle.bundle_digest``) as
the version tag ``DIGEST_TAG``; every loader (API, stream, promotion gate, evaluate) downloads only those
files, checks the digest and reads JSON and NumPy arrays. Nothing stored in the registry is imported or
executed, so whoever can write to the registry cannot run code in a serving process.
"""

from __future__ import annotations

import getpass
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from btc_anomaly.config import Settings

CHAMPION = "champion"
CHALLENGER = "challenger"
DIGEST_TAG = "bundle.sha256"
# Where the pyfunc keeps ``artifacts={pyfunc.ARTIFACT_KEY: ...}`` inside the logged model.
BUNDLE_PATH = "artifacts/bundle"


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


class BundleRefused(ValueError):
    """A registered version that serving will not load: no digest recorded, or its files differ from it."""


def log_bundle(
    settings: Settings,
    bundle_dir: Path,
    *,
    signature: Any,
    input_example: Any,
    pip_requirements: list[str],
) -> Any:
    """Log the saved bundle in the active run as a pyfunc, register it as a new version of
    ``settings.model_name`` and record its ``bundle_digest`` as the version's ``DIGEST_TAG``.

    The pyfunc (``pyfunc.py``, "models from code") is what the MLflow UI shows and what
    ``mlflow models serve`` runs for a user who chooses to; our loaders never run it (``load_version``).
    Returns MLflow's ModelInfo.
    """
    import mlflow.pyfunc

    from btc_anomaly.model.bundle import bundle_digest
    from btc_anomaly.model.pyfunc import ARTIFACT_KEY, MODEL_CODE

    digest = bundle_digest(bundle_dir)
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(MODEL_CODE),
        artifacts={ARTIFACT_KEY: str(bundle_dir)},
        signature=signature,
        input_example=input_example,
        pip_requirements=pip_requirements,
        registered_model_name=settings.model_name,
    )
    version = str(info.registered_model_version)
    client(settings).set_model_version_tag(settings.model_name, version, DIGEST_TAG, digest)
    return info


def load_version(settings: Settings, version: str | int) -> LoadedVersion:
    """Download one registered version's bundle files, check them against the digest recorded at training
    and load them as data (JSON + NumPy arrays): no code stored with the version is imported or run.

    Raises ``BundleRefused`` when the version has no digest or its files do not match it.
    """
    import mlflow.artifacts

    from btc_anomaly.model.bundle import ModelBundle, bundle_digest

    c = client(settings)
    mv = c.get_model_version(settings.model_name, str(version))
    tags = dict(mv.tags or {})
    label = f"{settings.model_name} v{mv.version}"
    expected = tags.get(DIGEST_TAG)
    if not expected:
        raise BundleRefused(
            f"{label} has no {DIGEST_TAG} tag: its files cannot be verified, refusing to load it "
            "(retrain with this release)"
        )
    source = c.get_model_version_download_uri(settings.model_name, str(mv.version))
    with tempfile.TemporaryDirectory(prefix="btc-anomaly-bundle-") as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{source.rstrip('/')}/{BUNDLE_PATH}",
            dst_path=tmp,
            tracking_uri=settings.mlflow_tracking_uri,
            registry_uri=settings.mlflow_tracking_uri,
        )
        actual = bundle_digest(local)
        if actual != expected:
            raise BundleRefused(
                f"{label}: bundle digest mismatch (recorded {expected[:16]}..., files {actual[:16]}...): "
                "its files changed after training, refusing to load it"
            )
        # Everything is read into memory here, so the downloaded files can go with the folder.
        bundle = ModelBundle.load(local)
    return LoadedVersion(
        name=settings.model_name,
        version=str(mv.version),
        run_id=mv.run_id,
        tags=tags,
        bundle=bundle,
    )


def load_alias(settings: Settings, alias: str) -> LoadedVersion | None:
    """Load the version behind ``models:/<name>@<alias>``; None when the alias is not set."""
    mv = version_by_alias(settings, alias)
    if mv is None:
        return None
    # Load the version the alias resolved to, so the number we report is the one we loaded even if
    # the alias moves meanwhile.
    return load_version(settings, mv.version)
