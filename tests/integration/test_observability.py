"""Every dashboard and alert query against a real Prometheus scraping the real services.

The stack: the session Kafka broker and MLflow server; ``btc-anomaly produce`` replaying the bundled
sample in a loop; ``btc-anomaly train --every 1h`` (one run: register, gate, champion); ``btc-anomaly api``
serving that champion and answering a little traffic; ``btc-anomaly dashboard`` over a demo lake with one
Dash callback triggered; ``btc-anomaly stream``; ``btc-anomaly detect`` over the demo lake. Prometheus
(Debian binary) scrapes every job every second with the committed alert rules, ProducerStalled's threshold
shortened to seconds.

Then every PromQL expression of grafana/dashboards/*.json and monitoring/prometheus/alerts.yml runs
through Prometheus' HTTP API and must return data (alert expressions with ``bool`` comparisons, so they
answer 0/1 instead of nothing while not firing). Nothing is expected to fail: a service whose CLI command
is gone, or whose log shows a panic (delta-rs' "Forked process detected" in the dashboard's gunicorn
workers, any Rust "panicked at"), fails the tests that depend on it with the log excerpt. Finally the
producer is stopped and BtcProducerStalled must go pending/firing.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml
from deltalake import write_deltalake

from btc_anomaly.cli import app as cli_app
from btc_anomaly.config import PROJECT_ROOT
from btc_anomaly.monitoring import prometheus_config as pc
from btc_anomaly.monitoring import promql
from btc_anomaly.monitoring.catalogue import service_of
from btc_anomaly.monitoring.metrics import STREAM_QUERIES
from btc_anomaly.runtime.kafka_broker import KafkaBroker, free_port
from btc_anomaly.runtime.mlflow_server import MlflowServer
from btc_anomaly.runtime.prometheus_server import PrometheusServer, find_binary
from btc_anomaly.schema import Transaction, arrow_schema

pytestmark = pytest.mark.integration

SAMPLE = PROJECT_ROOT / "data" / "sample" / "transactions.jsonl.gz"
EXAMPLE_HEX = PROJECT_ROOT / "tests" / "fixtures" / "example_tx_15e10745.hex"
GRAFANA_DASHBOARDS = PROJECT_ROOT / "grafana" / "dashboards"
RATE_INTERVAL = "15s"  # Grafana's $__rate_interval for a 1 s scrape interval, with margin
STALL_AFTER_S = 8  # the test's BtcProducerStalled threshold (300 s in alerts.yml)
# Stream queries that reported a micro-batch (the gauge is set from Spark's progress events).
STREAM_BATCHES = 'count by (query) (btc_stream_last_batch_timestamp_seconds{job="stream"} > 0)'
DATA_DEADLINE_S = 150.0  # after the services are up, for every expression to return data
# Lines of a service log that mean it crashed inside a native library: a panic fails that service's tests
# with the excerpt (delta-rs panics with "Forked process detected" when a table opened in gunicorn's
# master is used in a forked worker: the dashboard's start-up is built to avoid exactly that).
PANICS = ("Forked process detected", "panicked at")


def _cli_commands() -> set[str]:
    return {
        info.name or (info.callback.__name__.replace("_", "-") if info.callback else "")
        for info in cli_app.registered_commands
    }


COMMANDS = _cli_commands()
# The CLI command each scrape job runs (every job of prometheus_config.JOBS).
SERVICE_COMMANDS = {
    "producer": "produce",
    "trainer": "train",
    "api": "api",
    "dashboard": "dashboard",
    "stream": "stream",
    "detect": "detect",
}


def _queries() -> list[promql.Query]:
    return [
        *promql.dashboard_queries(GRAFANA_DASHBOARDS),
        *promql.rule_queries(pc.ALERTS_FILE),
    ]


def runnable_expr(q: promql.Query) -> str:
    expr = promql.substitute_grafana(q.expr, {"$__rate_interval": RATE_INTERVAL})
    return promql.as_bool(expr) if q.kind == "alert" else expr


def _services(q: promql.Query) -> set[str | None]:
    return {service_of(name) for name in promql.metric_names(q.expr)}


def _params() -> list[Any]:
    return [pytest.param(q, id=f"{q.kind}:{q.where}") for q in _queries()]


def test_every_scrape_job_has_its_cli_command() -> None:
    assert set(SERVICE_COMMANDS) == set(pc.JOBS)
    missing = {job: cmd for job, cmd in SERVICE_COMMANDS.items() if cmd not in COMMANDS}
    assert not missing, f"scrape jobs whose `btc-anomaly` command is gone from cli.py: {missing}"


# --- processes -----------------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.popen.poll() is not None:
            return
        os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()


@dataclass
class Stack:
    prometheus: PrometheusServer
    procs: dict[str, Proc]
    ports: dict[str, int]
    results: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    panicked: dict[str, str] = field(default_factory=dict)  # job -> log excerpt around its first panic

    def find_panics(self) -> None:
        for job, proc in self.procs.items():
            if job in self.panicked:
                continue
            text = proc.log.read_text(errors="replace") if proc.log.exists() else ""
            at = min((i for i in (text.find(n) for n in PANICS) if i >= 0), default=-1)
            if at >= 0:
                self.panicked[job] = text[max(0, at - 1500) : at + 1500]
                proc.stop()  # a crash loop only steals the other services' CPU

    def fail_if_panicked(self, jobs: set[str | None]) -> None:
        """Fail (never skip) when a service the caller depends on panicked, with its log."""
        self.find_panics()
        hit = sorted(j for j in jobs if j in self.panicked)
        if hit:
            pytest.fail(
                "\n".join(f"{j} panicked:\n{self.panicked[j]}" for j in hit),
                pytrace=False,
            )

    def tails(self, jobs: set[str | None], n: int = 3000) -> str:
        """The end of the logs of ``jobs``' processes (what a failure message shows)."""
        return "\n".join(
            f"--- {j} ---\n{self.procs[j].tail(n)}" for j in sorted(j for j in jobs if j in self.procs)
        )

    def logs(self) -> str:
        parts = [f"--- prometheus ---\n{self.prometheus.log_tail()}"]
        parts += [f"--- {p.name} ---\n{p.tail()}" for p in self.procs.values()]
        return "\n".join(parts)


def _env(tmp: Path, **settings: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BTC_ANOMALY_")}
    env.update({f"BTC_ANOMALY_{k.upper()}": str(v) for k, v in settings.items()})
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _spawn(name: str, args: list[str], env: dict[str, str], folder: Path) -> Proc:
    log = folder / f"{name}.log"
    popen = subprocess.Popen(
        [sys.executable, "-m", "btc_anomaly.cli", *args],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=folder,  # no .env of the checkout
        start_new_session=True,
    )
    return Proc(name, popen, log)


def _http(url: str, body: Any = None, timeout: float = 30.0) -> tuple[int, bytes]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (ConnectionError, http.client.HTTPException) as exc:
        return 599, repr(exc).encode()


def _wait(what: str, check: Callable[[], bool], timeout_s: float, stack_logs: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what} not within {timeout_s:.0f} s\n{stack_logs()}")


def _write_inputs(folder: Path) -> tuple[Path, Path, list[dict[str, Any]]]:
    lines = gzip.decompress(SAMPLE.read_bytes()).splitlines()
    rows = [Transaction.model_validate_json(line) for line in lines]
    table = folder / "training" / "transactions"  # not the stream's lake: its table has more columns
    write_deltalake(str(table), pa.Table.from_pylist([r.model_dump() for r in rows], schema=arrow_schema()))
    # Replay only the four big blocks: the sample's one-transaction blocks would leave gaps of 600 s /
    # speed between publishes, which the test's seconds-long stall threshold would take for a stall.
    counts: dict[Any, int] = {}
    for r in rows:
        counts[r.block_height] = counts.get(r.block_height, 0) + 1
    big = [line for line, r in zip(lines, rows, strict=True) if counts[r.block_height] > 500]
    replay = folder / "replay.jsonl.gz"
    # One record that is not a transaction: the producer sends it to the DLQ (btc_producer_dlq_total).
    replay.write_bytes(gzip.compress(b"\n".join([b'{"hash": "not-a-transaction"}', *big]) + b"\n"))
    payload = [json.loads(line) for line in lines[-400:]]
    return table, replay, payload


def _test_rules(folder: Path) -> Path:
    doc = yaml.safe_load(pc.ALERTS_FILE.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "BtcProducerStalled":
                assert "> 300" in rule["expr"]
                rule["expr"] = rule["expr"].replace("> 300", f"> {STALL_AFTER_S}")
                rule["for"] = "0s"
    path = folder / "alerts.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _trigger_dash_callback(base: str) -> None:
    """Run one Dash callback over HTTP as a browser would (the panels' live refresh on the interval)."""
    _, layout_raw = _http(f"{base}/_dash-layout")
    _, deps_raw = _http(f"{base}/_dash-dependencies")
    props: dict[str, dict[str, Any]] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            p = node.get("props")
            if isinstance(p, dict) and isinstance(p.get("id"), str):
                props[p["id"]] = p
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json.loads(layout_raw))
    for dep in json.loads(deps_raw):
        inputs = dep.get("inputs", [])
        if not any(i["property"] == "n_intervals" for i in inputs) or dep.get("clientside_function"):
            continue
        out = dep["output"]
        specs = out.strip(".").split("...") if out.startswith("..") else [out]
        outputs = [dict(zip(("id", "property"), s.rsplit(".", 1), strict=True)) for s in specs]

        def value(spec: dict[str, Any]) -> dict[str, Any]:
            return {**spec, "value": props.get(spec["id"], {}).get(spec["property"])}

        tick = next(i for i in inputs if i["property"] == "n_intervals")
        body = {
            "output": out,
            "outputs": outputs if out.startswith("..") else outputs[0],
            "inputs": [value(i) for i in inputs],
            "state": [value(s) for s in dep.get("state", [])],
            "changedPropIds": [f"{tick['id']}.n_intervals"],
        }
        _http(f"{base}/_dash-update-component", body, timeout=60)


@pytest.fixture(scope="module")
def stack(
    kafka_broker: KafkaBroker, mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    binary = find_binary("prometheus")
    if binary is None:
        pytest.skip(
            "Debian's prometheus is not installed: apt-get install prometheus (`make test` installs it)"
        )
    folder = tmp_path_factory.mktemp("observability")
    table, replay, payload = _write_inputs(folder)
    suffix = uuid.uuid4().hex[:8]
    ports = {job: free_port() for job in (*pc.JOBS, "prometheus")}
    common = {
        "state_dir": folder / "state",
        "kafka_bootstrap": kafka_broker.bootstrap,
        "topic": f"btc.transactions.obs{suffix}",
        "dlq_topic": f"btc.transactions.obs{suffix}.dlq",
        "mlflow_tracking_uri": mlflow_server.url,
        "model_name": f"btc-anomaly-obs-{suffix}",
        "lake_root": folder / "lake",
    }
    procs: dict[str, Proc] = {}
    prometheus: PrometheusServer | None = None
    try:
        procs["producer"] = _spawn(
            "producer",
            ["produce", str(replay), "--source", "replay", "--speed", "20", "--loop"],
            _env(folder, **common, producer_metrics_port=ports["producer"]),
            folder,
        )
        procs["trainer"] = _spawn(
            "trainer",
            ["train", "--every", "1h", "--by", "ci@observability"],
            _env(folder, **common, model_train_table=table, trainer_metrics_port=ports["trainer"]),
            folder,
        )
        procs["api"] = _spawn(
            "api",
            ["api", "--port", str(ports["api"]), "--log-level", "warning"],
            # Prevout lookups go to a closed port: they fail fast and are counted (result="failed").
            _env(
                folder,
                **common,
                model_reload_s=2,
                blockchain_base_url="http://127.0.0.1:9",
                api_prevout_timeout_s=1,
            ),
            folder,
        )
        from btc_anomaly.dashboard.demo import write_demo_lake

        # The bundled sample scored by a model fitted in this process: a lake the dashboard can show and
        # detect can poll (detect writes its own tables there, as in the compose stack's shared lake).
        write_demo_lake(folder / "demo")
        procs["dashboard"] = _spawn(
            "dashboard",
            ["dashboard", "--port", str(ports["dashboard"])],
            _env(folder, **{**common, "lake_root": folder / "demo"}),
            folder,
        )
        procs["stream"] = _spawn(
            "stream",
            ["stream"],
            # model_reload_s: the scoring query (btc_stream_predictions_total) starts soon after
            # the trainer's champion appears.
            _env(
                folder,
                **common,
                stream_metrics_port=ports["stream"],
                spark_driver_memory="1g",
                model_reload_s=5,
            ),
            folder,
        )
        procs["detect"] = _spawn(
            "detect",
            ["detect"],
            _env(
                folder,
                **{**common, "lake_root": folder / "demo"},
                detect_metrics_port=ports["detect"],
                detect_poll_s=2,
            ),
            folder,
        )
        jobs = [pc.Job(job, f"127.0.0.1:{ports[job]}", job) for job in pc.JOBS]
        config = folder / "prometheus.yml"
        config.write_text(
            pc.render(
                jobs,
                scrape_interval="1s",
                rule_files=[str(_test_rules(folder))],
                self_target=f"127.0.0.1:{ports['prometheus']}",
            )
        )
        prometheus = PrometheusServer(
            config_file=config, data_dir=folder / "prometheus", port=ports["prometheus"], binary=binary
        )
        prometheus.start(timeout_s=60)
        stack = Stack(prometheus=prometheus, procs=procs, ports=ports)

        for name, proc in procs.items():
            assert proc.popen.poll() is None, f"{name} exited early:\n{proc.tail()}"
        api = f"http://127.0.0.1:{ports['api']}"

        def champion_served() -> bool:
            _, body = _http(f"{api}/ready", timeout=5)
            return json.loads(body)["model"]["status"] == "ok"

        _wait("the API serving the trainer's champion", champion_served, 360, stack.logs)
        # Traffic: canonical batches, single transactions, raw hex, a 404 and a 422.
        for i in range(0, len(payload), 40):
            status, body = _http(f"{api}/predict", payload[i : i + 40])
            assert status == 200, body[:500]
        for tx in payload[:20]:
            assert _http(f"{api}/predict", tx)[0] == 200
        raw = EXAMPLE_HEX.read_text().strip()
        assert _http(f"{api}/predict/raw", [raw, "00zz"])[0] == 200
        assert _http(f"{api}/no-such-route")[0] == 404
        assert _http(f"{api}/predict", {"hash": "x"})[0] == 422
        base = f"http://127.0.0.1:{ports['dashboard']}"
        _wait("the dashboard", lambda: _http(f"{base}/healthz", timeout=5)[0] == 200, 240, stack.logs)
        # Spark needs minutes to start its queries on a busy machine: the expression deadline starts once
        # every stream query reported a micro-batch, not before (its series only appear then).
        _wait(
            "a micro-batch of every stream query",
            lambda: len(prometheus.query(STREAM_BATCHES)) >= len(STREAM_QUERIES),
            600,
            stack.logs,
        )
        try:
            _trigger_dash_callback(base)
        except (ValueError, KeyError, StopIteration) as exc:
            # Its expressions then have no callback data and fail with that; the other services still count.
            print(f"could not trigger a Dash callback: {exc!r}")
        yield stack
    finally:
        for proc in procs.values():
            proc.stop()
        if prometheus is not None:
            prometheus.stop()


@pytest.fixture(scope="module")
def evaluated(stack: Stack) -> Stack:
    """Poll every expression until the expected ones all return data (or the deadline passes)."""
    queries = _queries()
    deadline = time.monotonic() + DATA_DEADLINE_S
    while True:
        stack.find_panics()
        # A panicked service's expressions will not get data: their tests fail with its log, at once.
        expected = {q.where for q in queries if not (_services(q) & set(stack.panicked))}
        for q in queries:
            if stack.results.get(q.where):
                continue
            try:
                stack.results[q.where] = stack.prometheus.query(runnable_expr(q))
                stack.errors.pop(q.where, None)
            except RuntimeError as exc:
                stack.errors[q.where] = str(exc)
        if all(stack.results.get(w) for w in expected) or time.monotonic() > deadline:
            return stack
        time.sleep(2.0)


def test_every_target_is_scraped(evaluated: Stack) -> None:
    targets = evaluated.prometheus.api("targets")["activeTargets"]
    health = {t["labels"]["job"]: t["health"] for t in targets}
    assert set(health) == {*pc.JOBS, "prometheus"}  # every service, and Prometheus itself
    down = {job for job, h in health.items() if h != "up"}
    evaluated.fail_if_panicked(set(down))
    assert not down, f"not scraped: {down}\n{evaluated.logs()}"


def test_no_service_panicked(evaluated: Stack) -> None:
    evaluated.fail_if_panicked(set(evaluated.procs))


def test_every_rule_evaluates_without_error(evaluated: Stack) -> None:
    groups = evaluated.prometheus.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == len([q for q in _queries() if q.kind in ("alert", "record")])
    bad = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not bad, bad


@pytest.mark.parametrize("query", _params())
def test_expression_returns_data(evaluated: Stack, query: promql.Query) -> None:
    error = evaluated.errors.get(query.where)
    assert error is None, f"{query.where}: Prometheus rejected {runnable_expr(query)!r}: {error}"
    result = evaluated.results.get(query.where)
    if not result:
        evaluated.fail_if_panicked(_services(query))
    assert result, f"{query.where}: no data for {runnable_expr(query)!r}\n{evaluated.tails(_services(query))}"


# Which scrape jobs must export a service's metrics. Every process that imports monitoring/metrics.py may
# also export other services' unlabelled series at 0, so "the expression returns data" alone could be
# satisfied by the wrong process; this checks the owner.
OWNER_JOBS = {
    "producer": {"producer"},
    "stream": {"stream"},
    "trainer": {"trainer"},
    "api": {"api"},
    "dashboard": {"dashboard"},
    "detect": {"detect"},
    "notifier": {"api", "stream"},  # runs inside the scoring services
}


# Counters whose series only appear with their first event; their queries fall back to vector(0). Empty:
# monitoring/metrics.py creates every queried counter's label sets at 0 (test_monitoring_config.py).
EVENT_ONLY: dict[str, str] = {}


def _metric_params() -> list[Any]:
    names = sorted(
        {n for q in _queries() for n in promql.metric_names(q.expr) if service_of(n) in OWNER_JOBS}
    )
    return [pytest.param(name, id=name) for name in names]


@pytest.mark.parametrize("metric", _metric_params())
def test_metric_is_exported_by_its_service(evaluated: Stack, metric: str) -> None:
    service = service_of(metric)
    owners = OWNER_JOBS[service]  # type: ignore[index]
    jobs = {r["metric"].get("job") for r in evaluated.prometheus.query(f"count by (job) ({metric})")}
    if not jobs and metric in EVENT_ONLY:
        pytest.skip(EVENT_ONLY[metric])
    if not jobs & owners:
        evaluated.fail_if_panicked(set(owners))
    assert jobs & owners, (
        f"{metric} is exported by {sorted(j for j in jobs if j)}, not by {sorted(owners)}\n"
        f"{evaluated.tails(set(owners))}"
    )


def test_producer_stalled_fires_when_the_producer_stops(evaluated: Stack) -> None:
    def state() -> str:
        alerts = evaluated.prometheus.api("alerts")["alerts"]
        states = [a["state"] for a in alerts if a["labels"]["alertname"] == "BtcProducerStalled"]
        return states[0] if states else "inactive"

    assert state() == "inactive", "BtcProducerStalled fired while the producer was publishing"
    evaluated.procs["producer"].stop()
    deadline = time.monotonic() + STALL_AFTER_S + 30
    seen = state()
    while seen == "inactive" and time.monotonic() < deadline:
        time.sleep(0.5)
        seen = state()
    assert seen in ("pending", "firing"), (
        f"BtcProducerStalled still {seen}\n{evaluated.prometheus.log_tail()}"
    )
    # The producer's series went stale with the process; the alert rests on max_over_time and stays.
    time.sleep(3)
    assert state() in ("pending", "firing")
