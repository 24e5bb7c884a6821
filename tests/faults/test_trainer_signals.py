"""`btc-anomaly train --every` stops at once on SIGTERM/SIGINT (model/train.run_every_until_signalled).

`make demo`'s Ctrl-C stops MLflow together with the trainer: a training that went on after the signal
ran into MLflow's client retries for minutes and was SIGKILLed. These tests signal this very process
(the handlers are restored afterwards) from inside a run.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from btc_anomaly.model.train import run_every_until_signalled


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

    run_every_until_signalled("1h", training)  # returns: the loop ends, the run is not retried
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

    run_every_until_signalled("1h", training)
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
