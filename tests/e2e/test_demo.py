"""`make demo` scripted end to end, as a newcomer runs it: the Procfile stack under honcho (Kafka, MLflow,
the producer replaying the bundled real sample, the Spark stream, the trainer, the API, the dashboard and
Prometheus when installed), then Ctrl-C.

The stack gets free ports and its own state folder through the same Settings variables a user would set,
so it never collides with a developer's running stack or another test. Passes when scored transactions
reach ``GET /anomalies``, ``POST /predict`` answers with the champion, the dashboard serves, ``btc-anomaly
detect`` has polled cleanly several times after it MERGEd into ``coordinated_bursts`` (issue #19: it died
at the read after its second bursts write), after SIGINT to the whole `make` process group (what Ctrl-C
sends) no process of the stack is left, and no process logged a ``Traceback`` or an ``ERROR`` line, start-up
included, up to Ctrl-C (waiting for Kafka or MLflow is INFO; lines logged while the stack shuts down are
printed, not failed on).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from btc_anomaly.config import PROJECT_ROOT
from btc_anomaly.runtime.kafka_broker import free_port

pytestmark = pytest.mark.e2e

STARTUP_BUDGET_S = 210  # first scored rows within this (the issue: "within a few minutes" of `make demo`)
STOP_BUDGET_S = 60
DETECT_POLL_S = 5  # the test's detect poll interval (10 s by default)
DETECT_POLLS_AFTER_MERGE = 3  # clean detect polls required after the first MERGE into coordinated_bursts
DETECT_BUDGET_S = 120  # for those, after the checks above (bursts exist ~100 s into the demo)
# A log line that is a failure whichever process wrote it: a traceback, or an ERROR level in Python's
# logging, uvicorn's ("ERROR:") or log4j's (Spark, Kafka) format.
BAD_LINE = re.compile(r"Traceback \(most recent call last\)|(?:^|\s)ERROR(?:\s|:)")
EXAMPLE_TX = {
    "hash": "15e10745f15593a899cef391191bdd3d7c12412cc4696b7bcb669d0feadc8521",
    "size": 884,
    "weight": 3536,
    "fee": 20000,
    "inputs_count": 5,
    "outputs_count": 4,
    "input_value": 6013460000,
    "output_value": 6013440000,
}


def _http(url: str, body: object | None = None) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            ctype = resp.headers.get("content-type", "")
            return resp.status, json.loads(raw) if "json" in ctype else raw
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()[:500]
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(exc)


def _marked_pids(marker: str) -> list[int]:
    """Every process whose environment carries the marker: all descendants of `make demo` inherit it."""
    needle = f"BTC_DEMO_TEST_MARKER={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _describe(pids: list[int]) -> str:
    out = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:160]
            out.append(f"{pid}: {cmdline!r}")
        except OSError:
            pass
    return "\n".join(out)


@pytest.mark.timeout(STARTUP_BUDGET_S + DETECT_BUDGET_S + STOP_BUDGET_S + 120)
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_scores_transactions_and_stops_cleanly(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    ports = {
        name: free_port()
        for name in (
            "kafka",
            "controller",
            "mlflow",
            "api",
            "dashboard",
            "prometheus",
            "producer",
            "stream",
            "trainer",
            "detect",
            "alertmanager",
        )
    }
    env = {
        **os.environ,
        "BTC_DEMO_TEST_MARKER": marker,
        "BTC_ANOMALY_KAFKA_PORT": str(ports["kafka"]),
        "BTC_ANOMALY_KAFKA_CONTROLLER_PORT": str(ports["controller"]),
        "BTC_ANOMALY_KAFKA_BOOTSTRAP": f"127.0.0.1:{ports['kafka']}",
        "BTC_ANOMALY_MLFLOW_PORT": str(ports["mlflow"]),
        "BTC_ANOMALY_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['mlflow']}",
        "BTC_ANOMALY_API_PORT": str(ports["api"]),
        "BTC_ANOMALY_DASHBOARD_PORT": str(ports["dashboard"]),
        "BTC_ANOMALY_PROMETHEUS_PORT": str(ports["prometheus"]),
        "BTC_ANOMALY_PRODUCER_METRICS_PORT": str(ports["producer"]),
        "BTC_ANOMALY_STREAM_METRICS_PORT": str(ports["stream"]),
        "BTC_ANOMALY_TRAINER_METRICS_PORT": str(ports["trainer"]),
        "BTC_ANOMALY_DETECT_METRICS_PORT": str(ports["detect"]),
        "BTC_ANOMALY_DETECT_POLL_S": str(DETECT_POLL_S),
        "BTC_ANOMALY_ALERTMANAGER_PORT": str(ports["alertmanager"]),
        # Shorter waits than a user's defaults: the test has a budget, the stack logic is the same.
        "BTC_ANOMALY_MODEL_RELOAD_S": "5",
        "FIRST_TRAINING_RETRY_S": "5",
        "BTC_ANOMALY_SPARK_DRIVER_MEMORY": "1g",
    }
    for key in [k for k in env if k.startswith("BTC_ANOMALY_") and k.endswith(("_DIR", "_ROOT", "_TABLE"))]:
        env.pop(key)  # a developer's lake/state overrides would point the stack elsewhere
    log_path = tmp_path / "demo.log"
    api = f"http://127.0.0.1:{ports['api']}"
    started = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                "make",
                "--no-print-directory",
                "demo",
                f"DEMO_STATE={tmp_path / 'state'}",
                "DEMO_ENV_FILE=/dev/null",
                "SPEED=60",
            ],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: SIGINT to it is Ctrl-C in its terminal
        )
    try:
        first_scored_s = None
        anomalies: object = None
        while time.monotonic() - started < STARTUP_BUDGET_S:
            assert proc.poll() is None, f"make demo exited early ({proc.returncode}):\n{_tail(log_path)}"
            status, anomalies = _http(f"{api}/anomalies?limit=20")
            if status == 200 and isinstance(anomalies, dict) and anomalies.get("count", 0) > 0:
                first_scored_s = time.monotonic() - started
                break
            time.sleep(3)
        assert first_scored_s is not None, (
            f"no scored anomalies within {STARTUP_BUDGET_S}s (last /anomalies: {anomalies!r})\n{_tail(log_path)}"
        )
        print(f"first scored anomaly after {first_scored_s:.0f}s")
        item = anomalies["items"][0]  # type: ignore[index]
        assert 0.0 < item["anomaly_score"] <= 1.0 and item["is_anomaly"] is True

        status, body = _http(f"{api}/predict", EXAMPLE_TX)
        assert status == 200, body
        assert "anomaly_score" in json.dumps(body)

        status, page = _http(f"http://127.0.0.1:{ports['dashboard']}/")
        assert status == 200 and b"react-entry-point" in page  # type: ignore[operator]

        _wait_for_detect_polls(
            f"http://127.0.0.1:{ports['detect']}/metrics",
            tmp_path / "state" / "lake" / "coordinated_bursts",
            log_path,
        )
    finally:
        stopped = time.monotonic()
        running_lines = len(log_path.read_text(errors="replace").splitlines())  # before Ctrl-C
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(STOP_BUDGET_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while _marked_pids(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _marked_pids(marker)
        leftover = _describe(left)
        for pid in left:  # clean up before failing, so one bad run does not leak into the next
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left running after Ctrl-C:\n{leftover}"
    print(f"stack stopped {time.monotonic() - stopped:.1f}s after SIGINT")
    bad = _bad_lines(log_path)
    running = [i for i in bad if i < running_lines]
    if len(running) < len(bad):
        # After Ctrl-C (SIGINT reaches every process of the group at once, the stream's JVM included):
        # shown, not failed on; start-up and the whole run are.
        print(f"after Ctrl-C:\n{_excerpt(log_path, [i for i in bad if i >= running_lines])}")
    assert not running, (
        f"{len(running)} Traceback/ERROR lines in the demo's log before Ctrl-C:\n{_excerpt(log_path, running)}"
    )


def _metrics(url: str) -> dict[str, float]:
    """Samples of a Prometheus endpoint, keyed ``name`` or ``name{k=v,...}`` (empty when it does not answer)."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = _http(url)
    if status != 200 or not isinstance(body, bytes):
        return {}
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def _wait_for_detect_polls(url: str, bursts: Path, log_path: Path) -> None:
    """``DETECT_POLLS_AFTER_MERGE`` detect polls after its first MERGE into coordinated_bursts (table
    version 1: the write that produced the files the next read failed on), none of them failed."""
    deadline = time.monotonic() + DETECT_BUDGET_S
    polls_at_merge = None
    seen: dict[str, float] = {}
    while time.monotonic() < deadline:
        seen = _metrics(url)
        polls = seen.get("btc_detect_poll_duration_seconds_count")
        if polls is None:
            time.sleep(2)
            continue
        if polls_at_merge is None and _merged(bursts):
            polls_at_merge = polls
        if polls_at_merge is not None and polls >= polls_at_merge + DETECT_POLLS_AFTER_MERGE:
            break
        time.sleep(2)
    failures = {k: v for k, v in seen.items() if k.startswith("btc_detect_poll_failures_total") and v}
    assert polls_at_merge is not None, (
        f"detect did not MERGE into {bursts} within {DETECT_BUDGET_S}s of the checks above "
        f"(detect metrics: {seen or 'no answer'})\n{_tail(log_path)}"
    )
    assert (
        seen.get("btc_detect_poll_duration_seconds_count", 0) >= polls_at_merge + DETECT_POLLS_AFTER_MERGE
    ), f"fewer than {DETECT_POLLS_AFTER_MERGE} detect polls after the first bursts MERGE: {seen}"
    assert not failures and seen.get("btc_detect_consecutive_failed_polls") == 0, (
        f"detect polls failed: {failures}\n{_tail(log_path)}"
    )
    print(f"detect: {seen['btc_detect_poll_duration_seconds_count']:.0f} polls, none failed")


def _merged(table: Path) -> bool:
    """The table has a version after its creating append: detect's upsert MERGEd into it."""
    from deltalake import DeltaTable

    return bool(DeltaTable.is_deltatable(str(table))) and DeltaTable(str(table)).version() >= 1


def _bad_lines(path: Path) -> list[int]:
    return [
        i for i, line in enumerate(path.read_text(errors="replace").splitlines()) if BAD_LINE.search(line)
    ]


def _excerpt(path: Path, bad: list[int], before: int = 3, after: int = 25, most: int = 6) -> str:
    """The first ``most`` offending lines with their context (a traceback's frames follow its first line)."""
    lines = path.read_text(errors="replace").splitlines()
    parts, shown_to = [], -1
    for i in bad:
        if i <= shown_to:
            continue
        if len(parts) == most:
            parts.append(f"... and more: {len(bad)} lines in all; the whole log is {path}")
            break
        start, end = max(i - before, shown_to + 1), min(len(lines), i + after + 1)
        parts.append("\n".join(f"{n + 1:6d}: {lines[n]}" for n in range(start, end)))
        shown_to = end - 1
    return "\n---\n".join(parts)


def _tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
