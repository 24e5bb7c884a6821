"""The model the API serves, hot-reloaded off the request path.

A background thread re-resolves ``models:/<name>@<alias>`` every ``Settings.model_reload_s`` seconds. When
the alias points to another version it loads that version (download, compiled forests, kernel warm-up)
in the thread, then swaps one reference. A request reads ``holder.current`` once and keeps that object
for its whole life, so in-flight requests finish on the model they started with and no request ever
waits for a load.

With several uvicorn workers each process has its own holder. ``POST /admin/reload`` runs a check in the
worker that received it and writes a token to ``reload_signal`` (a file in the shared metrics folder);
every other worker's thread looks at that file once a second and runs the same check (forced or not)
when the token changes.

A registry that is down or has no such alias never stops the process: the loaded model (if any) keeps
serving, and ``status()`` says what is missing for ``/ready`` and the 503 bodies. So does a version whose
bundle has no digest or does not match it (``registry.load_version``): the load counts as a failure in
``btc_api_model_reloads_total{result="failure"}`` and logs one ERROR line.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from btc_anomaly.config import Settings
from btc_anomaly.model.registry import BundleRefused
from btc_anomaly.model.scoring import ChampionModel
from btc_anomaly.monitoring.metrics import API_MODEL_INFO, API_MODEL_LOADED_AT, API_MODEL_RELOADS

log = logging.getLogger(__name__)

NO_MODEL_DETAIL = "no model registered yet: run btc-anomaly train"
_SIGNAL_TICK_S = 1.0


@dataclass(frozen=True)
class Served:
    """Everything a request needs about the model it is scored with (never mutated after the swap)."""

    model: ChampionModel
    tags: dict[str, str] = field(default_factory=dict)
    description: str | None = None

    @property
    def ref(self) -> dict[str, str]:
        return {"name": self.model.name, "version": self.model.version, "alias": self.model.alias}


@dataclass
class CheckResult:
    changed: bool
    previous_version: str | None
    version: str | None
    detail: str


class ModelHolder:
    def __init__(self, settings: Settings, *, reload_signal: Path | None = None) -> None:
        self.settings = settings
        self.alias = settings.api_model_alias
        self.reload_signal = reload_signal
        self._served: Served | None = None
        self._lock = threading.Lock()  # one check/load at a time; requests never take it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._signal_token: str | None = self._read_signal()
        self.checked_once = False
        self.first_check_done = threading.Event()  # set after the first check, whatever its outcome
        self.alias_missing = False
        self.last_error: str | None = None
        self.last_check_at: float | None = None

    # --- what requests read ------------------------------------------------------------------------
    @property
    def current(self) -> Served | None:
        return self._served

    def status(self) -> str:
        """Why there is no model, in one line (``"ok"`` when there is one)."""
        if self._served is not None:
            return "ok"
        if self.alias_missing:
            return NO_MODEL_DETAIL
        if self.last_error is not None:
            return f"model not loaded: {self.last_error}"
        return "model not loaded yet: first registry check in progress"

    # --- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="model-reload", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        next_check = 0.0
        while not self._stop.is_set():
            token = self._read_signal()
            signalled = token != self._signal_token
            self._signal_token = token
            if signalled or time.monotonic() >= next_check:
                self.check(force=signalled and token is not None and token.endswith(":force"))
                self.first_check_done.set()
                next_check = time.monotonic() + self.settings.model_reload_s
            self._stop.wait(min(_SIGNAL_TICK_S, max(0.05, next_check - time.monotonic())))

    # --- checks and loads ---------------------------------------------------------------------------
    def check(self, force: bool = False) -> CheckResult:
        """Resolve the alias; load and swap when it moved (or ``force``). Never raises."""
        from btc_anomaly.model.registry import version_by_alias

        with self._lock:
            old = self._served
            old_version = old.model.version if old is not None else None
            try:
                mv = version_by_alias(self.settings, self.alias)
            except Exception as exc:  # registry down, DNS, auth: keep what we have
                self._failed(
                    f"model registry unreachable at {self.settings.mlflow_tracking_uri}: {_short(exc)}"
                )
                return CheckResult(False, old_version, old_version, self.last_error or "")
            finally:
                self.checked_once = True
                self.last_check_at = time.time()
            if mv is None:
                self.alias_missing = True
                self.last_error = None
                if old is not None:
                    log.warning(
                        "%s@%s no longer exists; still serving v%s",
                        self.settings.model_name,
                        self.alias,
                        old_version,
                    )
                return CheckResult(False, old_version, old_version, NO_MODEL_DETAIL)
            self.alias_missing = False
            version = str(mv.version)
            if version == old_version and not force:
                self.last_error = None
                tags = dict(mv.tags or {})
                if old is not None and (tags != old.tags or (mv.description or None) != old.description):
                    # The gate records its decision on the version right after moving the alias.
                    self._served = replace(old, tags=tags, description=mv.description or None)
                return CheckResult(False, old_version, old_version, f"v{version} is already served")
            try:
                served = self._load(version, dict(mv.tags or {}), mv.description or None)
            except BundleRefused as exc:  # no or wrong digest: the message says it all, no traceback
                self._failed(str(exc), level=logging.ERROR)
                return CheckResult(False, old_version, old_version, self.last_error or "")
            except Exception as exc:  # a broken version must not take the served one down
                log.exception("loading %s v%s failed", self.settings.model_name, version)
                self._failed(f"loading {self.settings.model_name} v{version} failed: {_short(exc)}")
                return CheckResult(False, old_version, old_version, self.last_error or "")
            self.install(served)
            API_MODEL_RELOADS.labels(result="success").inc()
            log.info(
                "serving %s v%s (%s)%s",
                served.model.name,
                version,
                self.alias,
                f", replaced v{old_version}" if old_version else "",
            )
            return CheckResult(True, old_version, version, f"loaded v{version}")

    def install(self, served: Served) -> None:
        """Serve ``served`` from the next request on (the swap; also how tests and embedders set a model)."""
        old = self._served
        self._served = served  # one reference assignment: atomic, in-flight requests keep their own
        self.last_error = None
        self.alias_missing = False
        if old is not None and old.ref != served.ref:
            API_MODEL_INFO.labels(**old.ref).set(0)
        API_MODEL_INFO.labels(**served.ref).set(1)
        API_MODEL_LOADED_AT.set(served.model.loaded_at)

    def _load(self, version: str, tags: dict[str, str], description: str | None) -> Served:
        from btc_anomaly.model.registry import load_version

        loaded = load_version(self.settings, version)
        bundle = loaded.bundle
        bundle.set_backend(self.settings.api_scorer_backend or self.settings.scorer_backend)  # type: ignore[arg-type]
        bundle.warm_up()  # compile or load numba kernels here, not on the first request
        model = ChampionModel(
            bundle=bundle,
            name=loaded.name,
            version=loaded.version,
            run_id=loaded.run_id,
            alias=self.alias,
            loaded_at=time.time(),
        )
        return Served(model=model, tags={**loaded.tags, **tags}, description=description)

    def _failed(self, message: str, level: int = logging.WARNING) -> None:
        if message != self.last_error:
            log.log(level, "%s", message)
        self.last_error = message
        API_MODEL_RELOADS.labels(result="failure").inc()

    # --- cross-worker reload signal -----------------------------------------------------------------
    def signal_workers(self, force: bool = False) -> None:
        """Ask every other worker sharing ``reload_signal`` to run the same check now."""
        if self.reload_signal is None:
            return
        token = f"{time.time_ns()}-{id(self)}" + (":force" if force else "")
        tmp = self.reload_signal.with_suffix(f".{id(self)}.tmp")
        tmp.write_text(token)
        self._signal_token = token  # this worker has already run the check
        tmp.replace(self.reload_signal)  # atomic: a reader never sees half a token

    def _read_signal(self) -> str | None:
        if self.reload_signal is None:
            return None
        try:
            return self.reload_signal.read_text()
        except OSError:
            return None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]


def promotion_info(tags: dict[str, str]) -> dict[str, Any]:
    """The promotion gate's record on a version (see model/promotion.py), as /model shows it."""
    keys = (
        "status",
        "reason",
        "decided_by",
        "decided_at",
        "previous_champion",
        "superseded_by",
        "superseded_at",
    )
    return {k: tags.get(f"promotion.{k}") for k in keys if f"promotion.{k}" in tags}
