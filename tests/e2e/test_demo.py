"""`make demo` scripted end to end, as a newcomer runs it: the Procfile stack under honcho (Kafka, MLflow,
the producer replaying the bundled real sample, the Spark stream, the trainer, the API, the dashboard and
Prometheus when installed), then Ctrl-C.

The stack is the session's ``demo_stack`` (``conftest.py``: free ports, its own state folder, started once
and shared with ``test_readme_commands.py``). Passes when scored transactions reach ``GET /anomalies``,
``POST /predict`` answers with the champion, the dashboard serves, ``btc-anomaly detect`` has polled
cleanly several times after it MERGEd into ``coordinated_bursts`` (issue #19: it died at the read after
its second bursts write), after SIGINT to the whole `make` process group (what Ctrl-C sends) no process
of the stack is left, and no process logged a ``Traceback`` or an ``ERROR`` line, start-up included
(waiting for Kafka or MLflow is INFO). Ctrl-C must stop every process by itself (honcho SIGKILLs what
is left after its KILL_WAIT, and says so in the log), with no such line, no Java exception and no stack
frame while the stack shuts down. The Ctrl-C test runs after every other e2e test (``conftest.LAST``).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from demo_stack import STARTUP_BUDGET_S, STOP_BUDGET_S, DemoStack, http, tail

pytestmark = pytest.mark.e2e

DETECT_POLLS_AFTER_MERGE = 3  # clean detect polls required after the first MERGE into coordinated_bursts
DETECT_BUDGET_S = 120  # for those, after the checks above (bursts exist ~100 s into the demo)
# A log line that is a failure whichever process wrote it: a traceback, or an ERROR level in Python's
# logging, uvicorn's ("ERROR:") or log4j's (Spark, Kafka) format.
BAD_LINE = re.compile(r"Traceback \(most recent call last\)|(?:^|\s)ERROR(?:\s|:)")
# While the stack stops, also: a Java exception or stack frame (Spark's Arrow "Memory was leaked",
# InterruptedException, ...), and honcho's SIGKILL of a process that did not stop in time.
STOP_BAD_LINE = re.compile(
    BAD_LINE.pattern + r"|[\w$.]+(?:Exception|Error)\b|\|\s+at [\w$.<>]+\(|sending SIGKILL"
)
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


@pytest.mark.timeout(STARTUP_BUDGET_S + DETECT_BUDGET_S + 120)
def test_make_demo_scores_transactions(demo_stack: DemoStack) -> None:
    print(f"first scored anomaly after {demo_stack.first_scored_s:.0f}s")
    item = demo_stack.first_anomalies["items"][0]  # type: ignore[index]
    assert 0.0 < item["anomaly_score"] <= 1.0 and item["is_anomaly"] is True

    status, body = http(f"{demo_stack.api}/predict", EXAMPLE_TX)
    assert status == 200, body
    assert "anomaly_score" in json.dumps(body)

    status, page = http(f"{demo_stack.dashboard}/")
    assert status == 200 and b"react-entry-point" in page  # type: ignore[operator]

    _wait_for_detect_polls(
        f"http://127.0.0.1:{demo_stack.ports['detect']}/metrics",
        demo_stack.state_dir / "lake" / "coordinated_bursts",
        demo_stack.log_path,
    )


@pytest.mark.timeout(STOP_BUDGET_S + 120)
def test_ctrl_c_stops_the_whole_stack_cleanly(demo_stack: DemoStack) -> None:
    stopped = demo_stack.stop()
    assert not stopped.leftover, f"processes left running after Ctrl-C:\n{stopped.leftover}"
    print(f"stack stopped {stopped.seconds:.1f}s after SIGINT")
    log_path = demo_stack.log_path
    bad = _bad_lines(log_path)
    running = [i for i in bad if i < stopped.running_lines]
    assert not running, (
        f"{len(running)} Traceback/ERROR lines in the demo's log before Ctrl-C:\n{_excerpt(log_path, running)}"
    )
    stopping = _bad_lines(log_path, STOP_BAD_LINE, start=stopped.running_lines)
    assert not stopping, (
        f"{len(stopping)} Traceback/ERROR/Java exception/SIGKILL lines after Ctrl-C:\n"
        f"{_excerpt(log_path, stopping)}"
    )


def _metrics(url: str) -> dict[str, float]:
    """Samples of a Prometheus endpoint, keyed ``name`` or ``name{k=v,...}`` (empty when it does not answer)."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = http(url)
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
        f"(detect metrics: {seen or 'no answer'})\n{tail(log_path)}"
    )
    assert (
        seen.get("btc_detect_poll_duration_seconds_count", 0) >= polls_at_merge + DETECT_POLLS_AFTER_MERGE
    ), f"fewer than {DETECT_POLLS_AFTER_MERGE} detect polls after the first bursts MERGE: {seen}"
    assert not failures and seen.get("btc_detect_consecutive_failed_polls") == 0, (
        f"detect polls failed: {failures}\n{tail(log_path)}"
    )
    print(f"detect: {seen['btc_detect_poll_duration_seconds_count']:.0f} polls, none failed")


def _merged(table: Path) -> bool:
    """The table has a version after its creating append: detect's upsert MERGEd into it."""
    from deltalake import DeltaTable

    return bool(DeltaTable.is_deltatable(str(table))) and DeltaTable(str(table)).version() >= 1


def _bad_lines(path: Path, pattern: re.Pattern[str] = BAD_LINE, start: int = 0) -> list[int]:
    lines = path.read_text(errors="replace").splitlines()
    return [i for i in range(start, len(lines)) if pattern.search(lines[i])]


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
