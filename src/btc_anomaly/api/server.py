"""``btc-anomaly api``: uvicorn with ``Settings.api_workers`` workers, Prometheus multiprocess mode set up first.

prometheus-client picks its value storage when it is first imported, so ``PROMETHEUS_MULTIPROC_DIR`` is set
here before uvicorn (or anything else) imports it; workers inherit it. The folder is wiped at start (stale
files of a previous run would be summed in) and, when it is a temporary one, removed at exit. The same
folder carries the cross-worker reload signal (model_holder.py).

Workers build their Settings from the environment (``create_app_from_env``), like every other command.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from btc_anomaly.config import Settings

log = logging.getLogger(__name__)

APP_FACTORY = "btc_anomaly.api.app:create_app_from_env"


def prepare_metrics_dir(settings: Settings) -> tuple[Path, bool]:
    """(folder, is_temporary), exported as PROMETHEUS_MULTIPROC_DIR."""
    if settings.api_metrics_dir is not None:
        folder, temporary = Path(settings.api_metrics_dir), False
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.iterdir():
            if stale.is_file() and (stale.suffix == ".db" or stale.name.startswith("reload-request")):
                stale.unlink()
    else:
        folder, temporary = Path(tempfile.mkdtemp(prefix="btc-anomaly-api-metrics-")), True
    if "prometheus_client" in sys.modules and os.environ.get("PROMETHEUS_MULTIPROC_DIR") != str(folder):
        log.warning(
            "prometheus_client was imported before the metrics folder was set: single-worker metrics only"
        )
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    return folder, temporary


def _log_config(level: str) -> dict[str, Any]:
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    # Our own loggers (model reloads, lake and prevout warnings) through uvicorn's handler, in every worker.
    config["loggers"]["btc_anomaly"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


def serve(
    settings: Settings,
    *,
    host: str | None = None,
    port: int | None = None,
    workers: int | None = None,
    log_level: str = "info",
) -> None:
    folder, temporary = prepare_metrics_dir(settings)
    # The registry client's defaults retry for minutes; a poll that cannot reach MLflow should give up
    # quickly and try again at the next tick (the served model stays). Explicit env values win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(settings.api_registry_timeout_s))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # tqdm bars in the service log
    if settings.api_scorer_backend:
        # Every forest evaluation in the workers, including the warm-up the MLflow pyfunc loader runs,
        # uses the API's backend: with numpy, numba (and its LLVM, ~110 MB per worker) is never loaded.
        os.environ["BTC_ANOMALY_SCORER_BACKEND"] = settings.api_scorer_backend
    import uvicorn

    try:
        uvicorn.run(
            APP_FACTORY,
            factory=True,
            host=host or settings.api_host,
            port=settings.api_port if port is None else port,
            workers=workers or settings.api_workers,
            access_log=settings.api_access_log,
            log_level=log_level,
            log_config=_log_config(log_level),
            # Idle keep-alive connections of load balancers and clients outlive uvicorn's 5 s default.
            timeout_keep_alive=30,
        )
    finally:
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)
