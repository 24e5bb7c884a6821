"""The README's shell examples run: every command of every README block that talks to the running stack
is executed (bash, from the checkout) against the session's `make demo` stack (``demo_stack``).

Which blocks run — the rule: a fenced ``bash`` block runs when it holds a ``curl`` command; such a block
must hold nothing but ``curl`` commands (comments aside), so an example cannot hide in a setup block.
Every other block (``make``, ``docker compose``, ``cp``, starting services) is installation or start-up,
not a request to the stack, and is skipped; the test prints them. The README's default ports (API 5001,
dashboard 8050, MLflow 5000, Prometheus 9090) are mapped to the demo stack's ports.

A command fails the test when curl fails, the answer is not 2xx, or the JSON is not the shape the README
promises: ``SHAPES`` lists, per route, the fields that must be there (a removed or renamed field fails).
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from demo_stack import DemoStack

from btc_anomaly.config import PROJECT_ROOT

pytestmark = pytest.mark.e2e

README = PROJECT_ROOT / "README.md"
BLOCK = re.compile(r"^```(?:bash|sh|shell)\n(.*?)^```", re.S | re.M)
README_PORTS = {5001: "api", 8050: "dashboard", 5000: "mlflow", 9090: "prometheus"}
HOST_PORT = re.compile(r"\b(?:localhost|127\.0\.0\.1):(\d+)")

PREDICTION = {
    "hash",
    "anomaly_score",
    "is_anomaly",
    "threshold",
    "model_threshold",
    "model_kind",
    "reasons",
    "missing_features",
    "model",
    "risk_score",
    "severity",
    "signals",
    "rule_hits",
    "watchlist_hits",
    "risk_detail",
}
SCORED_ROW = {"hash", "first_seen", "anomaly_score", "is_anomaly", "threshold", "model_version", "scored_at"}
# Route (method, path without the query) -> the fields each answer must have.
SHAPES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/predict"): {"object": PREDICTION},
    ("POST", "/predict/raw"): {
        "list": {
            True: PREDICTION | {"index", "valid", "summary", "prevouts"},
            False: {"index", "valid", "reason"},
        }
    },
    ("GET", "/anomalies"): {"object": {"count", "items"}, "items": SCORED_ROW},
    ("GET", "/addresses/"): {
        "object": {"address", "watchlists", "transactions", "count", "truncated", "highest_risk", "rule_hits"}
    },
}


@dataclass(frozen=True)
class Command:
    line: int  # README line number of the command's first line
    text: str

    @property
    def method(self) -> str:
        bare = re.sub(r"\$\([^)]*\)", "", self.text)  # `date -d` inside $(...) is not curl's -d
        return "POST" if re.search(r"\s(?:-d|--data\S*)\s", bare) else "GET"

    @property
    def path(self) -> str:
        match = re.search(r"(?:localhost|127\.0\.0\.1):\d+(/[^\s\"'?]*)", self.text)
        return match.group(1) if match else ""


def blocks(text: str) -> list[tuple[int, list[Command]]]:
    """(line of the block's fence, its commands): continuation lines joined, comments and blanks left out."""
    out = []
    for match in BLOCK.finditer(text):
        first = text[: match.start(1)].count("\n") + 1
        commands: list[Command] = []
        pending, start = "", 0
        for offset, raw in enumerate(match.group(1).splitlines()):
            line = raw.strip()
            if not pending and (not line or line.startswith("#")):
                continue
            if not pending:
                start = first + offset
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            commands.append(Command(start, pending + line))
            pending = ""
        out.append((first - 1, commands))
    return out


def stack_blocks(text: str) -> tuple[list[Command], list[str]]:
    """(commands to run, first command of each skipped block)."""
    run, skipped = [], []
    for fence, commands in blocks(text):
        curls = [c for c in commands if c.text.startswith("curl ")]
        if not curls:
            skipped.append(f"README.md:{fence}: {commands[0].text if commands else '(empty)'}")
            continue
        others = [c for c in commands if c not in curls]
        assert not others, (
            f"README.md:{fence}: a block with curl examples must hold only curl commands "
            f"(split it): {[c.text for c in others]}"
        )
        run.extend(curls)
    return run, skipped


def shape_errors(route: tuple[str, str], body: Any) -> list[str]:
    # An entry ending in "/" covers the paths under it (/addresses/<address>); the others match exactly.
    shape = next(
        (
            s
            for (m, p), s in SHAPES.items()
            if m == route[0] and (route[1] == p or (p.endswith("/") and route[1].startswith(p)))
        ),
        None,
    )
    if shape is None:
        return [f"no SHAPES entry for {route[0]} {route[1]}: add the fields this example promises"]
    errors = []
    if "object" in shape:
        if not isinstance(body, dict):
            return [f"expected a JSON object, got {type(body).__name__}"]
        errors += [f"missing field {k!r}" for k in sorted(shape["object"] - set(body))]
        for i, item in enumerate(body.get("items", []) if "items" in shape else []):
            errors += [f"items[{i}] missing field {k!r}" for k in sorted(shape["items"] - set(item))]
    if "list" in shape:
        if not isinstance(body, list) or not body:
            return [f"expected a non-empty JSON array, got {body!r:.200}"]
        for i, item in enumerate(body):
            wanted = shape["list"].get(item.get("valid") if isinstance(item, dict) else None)
            if wanted is None:
                errors.append(f"[{i}] is not an item of this route: {item!r:.200}")
                continue
            errors += [f"[{i}] missing field {k!r}" for k in sorted(wanted - set(item))]
    return errors


def to_stack(command: str, stack: DemoStack) -> str:
    """The command with the README's default ports replaced by the demo stack's."""

    def port(match: re.Match[str]) -> str:
        service = README_PORTS.get(int(match.group(1)))
        if service is None:
            raise AssertionError(f"README example uses port {match.group(1)}, not a demo stack port")
        return f"127.0.0.1:{stack.ports[service]}"

    return HOST_PORT.sub(port, command)


def run_curl(command: str, out: Path) -> tuple[int, str, str]:
    """(curl exit code, HTTP status, stderr): the body goes to ``out``."""
    assert command.startswith("curl ")
    wrapped = f"curl --max-time 60 -sS -o {out} -w '%{{http_code}}' " + command[len("curl ") :]
    proc = subprocess.run(
        ["bash", "-c", wrapped], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120
    )
    return proc.returncode, proc.stdout.strip(), proc.stderr.strip()


def test_readme_rule_finds_the_examples() -> None:
    # Guards the rule itself: the README has curl examples, and every skipped block is really setup.
    run, skipped = stack_blocks(README.read_text())
    assert len(run) >= 5, [c.text for c in run]
    assert {c.path for c in run} >= {"/predict", "/predict/raw", "/anomalies"}
    for first in skipped:
        assert "curl" not in first, first
    print("skipped (not requests to the running stack):\n" + "\n".join(skipped))


def check(command: Command, stack: DemoStack, out: Path) -> str | None:
    """Why the example does not work against the stack, or None when it does."""
    code, status, stderr = run_curl(to_stack(command.text, stack), out)
    where = f"README.md:{command.line}: {command.text[:160]}"
    body_text = out.read_text(errors="replace") if out.exists() else ""
    if code != 0 or not status.startswith("2"):
        return f"{where}\n  curl exit {code}, HTTP {status}: {body_text[:300]} {stderr[:200]}"
    try:
        body = json.loads(body_text)
    except json.JSONDecodeError:
        return f"{where}\n  not JSON: {body_text[:300]}"
    errors = shape_errors((command.method, command.path), body)
    return f"{where}\n  " + "; ".join(errors) if errors else None


@pytest.mark.timeout(600)
def test_every_readme_example_answers_2xx_with_its_shape(demo_stack: DemoStack, tmp_path: Path) -> None:
    run, _ = stack_blocks(README.read_text())
    failures = [f for i, c in enumerate(run) if (f := check(c, demo_stack, tmp_path / f"body-{i}"))]
    assert not failures, "README examples that do not work:\n" + "\n".join(failures)


def test_a_broken_example_fails_the_check(demo_stack: DemoStack, tmp_path: Path) -> None:
    # The README's old /predict/raw example (an object around the array: 422) and a field the API does
    # not answer: the check above must report both, or it proves nothing.
    run, _ = stack_blocks(README.read_text())
    raw = next(c for c in run if c.path == "/predict/raw")
    old_body = raw.text.replace('-d "[', '-d "{\\"transactions\\": [').replace(']"', ']}"')
    assert old_body != raw.text, raw.text
    failure = check(Command(raw.line, old_body), demo_stack, tmp_path / "old")
    assert failure is not None and "HTTP 422" in failure, failure
    predict = next(c for c in run if c.path == "/predict")
    assert check(predict, demo_stack, tmp_path / "ok") is None
    SHAPES[("POST", "/predict")]["object"] = PREDICTION | {"a_field_the_api_never_had"}
    try:
        failure = check(predict, demo_stack, tmp_path / "shape")
    finally:
        SHAPES[("POST", "/predict")]["object"] = PREDICTION
    assert failure is not None and "missing field 'a_field_the_api_never_had'" in failure, failure
