"""`btc-anomaly train` (once or --every) stops at once on SIGTERM/SIGINT (model/train.run_until_signalled).

`make demo`'s Ctrl-C stops MLflow together with the trainer: a training that went on after the signal
ran into MLflow's client retries for minutes and was SIGKILLed. These tests signal this very process
(the handlers are restored afterwards) from inside a run.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from btc_anomaly.model.train import run_until_signalled


@pytest.fixture(autouse=True)
def _restore_handlers(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_cuts_the_running_training_short(sig: int) -> None:
    steps: list[int] = []

    def training() -> None:  # a run that would take a minute: signalled at its first step
        for step in range(1200):
            steps.append(step)
            if step == 0:
                os.kill(os.getpid(), sig)
            time.sleep(0.05)

    stopped = run_until_signalled(training, "1h")  # returns: the loop ends, the run is not retried
    assert stopped == sig
    assert len(steps) < 1200, "the training ran to its end after the signal"
    # MLflow calls on the way out fail fast instead of retrying for minutes.
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"


def test_what_fails_on_the_way_out_of_a_stopped_run_is_not_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def training() -> None:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)
        finally:
            raise ConnectionRefusedError("the registry stopped too")  # e.g. MLflow's end_run

    run_until_signalled(training, "1h")
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


def test_a_signal_during_a_single_training_marks_its_mlflow_run_failed(tmp_path: Path) -> None:
    """`btc-anomaly train` without --every (docker's first training): a process killed by the default
    SIGTERM handler leaves its MLflow run RUNNING for ever; a stopped one ends it."""
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # A store and experiment of the test's own: other tests of the session leave the fluent API pointed
    # at their server and experiment, which are restored afterwards.
    experiment_id = MlflowClient(uri).create_experiment("signals")
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    run_ids: list[str] = []

    def training() -> None:  # the run as train() opens it, signalled while it works
        with mlflow.start_run(experiment_id=experiment_id) as run:
            run_ids.append(run.info.run_id)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)

    try:
        assert run_until_signalled(training) == signal.SIGTERM
    finally:
        mlflow.set_tracking_uri(previous_uri)
    status = MlflowClient(uri).get_run(run_ids[0]).info.status
    assert status in ("FAILED", "KILLED"), status


def test_a_single_training_that_is_not_signalled_returns_none() -> None:
    calls: list[int] = []
    assert run_until_signalled(lambda: calls.append(1)) is None
    assert calls == [1]


def test_the_first_training_script_stops_on_sigterm(tmp_path: Path) -> None:
    """docker/first-training.sh is PID 1 of compose's trainer-init: a shell ignores SIGTERM there unless it
    traps it, and docker's stop ends in SIGKILL (a training cut that way leaves its MLflow run RUNNING).
    Here it waits for rows in an empty lake; SIGTERM ends it with the shell's 143."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "BTC_ANOMALY_STATE_DIR": str(tmp_path),
        "FIRST_TRAINING_RETRY_S": "600",
    }
    proc = subprocess.Popen(
        ["sh", str(root / "docker" / "first-training.sh")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the first row count: the script is in its loop
    assert "first-training:" in line, line
    time.sleep(0.5)  # into its sleep
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=30)
    finally:
        proc.kill()
    assert rc == 143, (rc, proc.stdout.read())
