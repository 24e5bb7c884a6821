"""`btc-anomaly <component>`: the one entry point of every service and tool.

Heavy imports stay inside the commands so `btc-anomaly --help` is instant and each service only
loads what it runs.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from btc_anomaly.config import get_settings, settings_reference_markdown

if TYPE_CHECKING:
    from btc_anomaly.runtime.process import ManagedProcess

app = typer.Typer(
    name="btc-anomaly",
    help="Real-time Bitcoin transaction anomaly detection.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


def _logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


@app.command()
def config(
    markdown: Annotated[bool, typer.Option(help="Print the reference table instead of the values.")] = False,
) -> None:
    """Print the settings in force (or the configuration reference)."""
    if markdown:
        typer.echo(settings_reference_markdown())
        return
    typer.echo(get_settings().model_dump_json(indent=2))


def _run_in_foreground(proc: ManagedProcess, timeout_s: float, ready: str) -> None:
    """`btc-anomaly kafka|mlflow|prometheus`: start ``proc``, log ``ready`` once it answers, block until
    SIGTERM/SIGINT (exit 0) or until the process dies (exit with its log's path); always stop it, after
    its clients have disconnected (``ManagedProcess.drain``; a second signal stops it at once)."""
    import time

    signals: list[int] = []
    starting = [True]

    def _note(signum: int, _frame: object) -> None:
        # Noted, and the main loop stops the server (stopping here would re-enter Popen.wait() of the
        # main thread); a server that is still starting has no clients to wait for: unwind at once.
        signals.append(signum)
        if starting[0]:
            starting[0] = False
            raise SystemExit(0)

    signal.signal(signal.SIGTERM, _note)
    signal.signal(signal.SIGINT, _note)
    log = logging.getLogger(f"btc_anomaly.{proc.name.split()[0]}")
    try:
        proc.start(timeout_s=timeout_s)
        starting[0] = False
        log.info("%s", ready)
        watch = proc.client_watch()
        next_sample = 0.0
        while proc.running and not signals:
            if watch is not None and time.monotonic() >= next_sample:
                watch.sample()
                next_sample = time.monotonic() + watch.every_s
            time.sleep(0.25)
        if not signals:
            raise SystemExit(f"{proc.name} exited; see {proc.log_path}")
        log.info("signal %d: stopping %s", signals[0], proc.name)
        proc.drain(give_up=lambda: len(signals) > 1, watch=watch)
    finally:
        starting[0] = False
        proc.stop()


@app.command()
def kafka() -> None:
    """Run a single-node Kafka broker (KRaft) from the Maven-resolved jars, in the foreground."""
    from btc_anomaly.runtime.kafka_broker import KafkaBroker

    _logging()
    s = get_settings()
    broker = KafkaBroker(
        data_dir=s.state_dir / "kafka",
        jars_root=s.jars_dir,
        host=s.kafka_host,
        port=s.kafka_port,
        controller_port=s.kafka_controller_port,
        heap=s.kafka_heap,
        num_partitions=s.topic_partitions,
        console_level="INFO",
        retention_hours=s.kafka_retention_hours,
        retention_bytes=s.kafka_retention_bytes,
    )

    _run_in_foreground(broker, 120, f"kafka broker ready on {broker.bootstrap} (logs in {broker.log_dir})")


@app.command()
def decode(
    hexes: Annotated[list[str], typer.Argument(help="Raw transactions as hex.", show_default=False)],
) -> None:
    """Decode raw hex transactions and print one JSON object per transaction."""
    from btc_anomaly.ingestion.decode import decode_summary

    for raw in hexes:
        typer.echo(json.dumps(decode_summary(raw)))


@app.command()
def produce(
    paths: Annotated[
        list[str] | None,
        typer.Argument(
            help="replay: canonical JSONL(.gz) files (default: the bundled sample); blocks: raw block files; "
            "rest: tx hashes to fetch once with /rawtx.",
            show_default=False,
        ),
    ] = None,
    source: Annotated[
        str | None, typer.Option(help="rest | ws | replay | blocks (default: BTC_ANOMALY_PRODUCER_SOURCE).")
    ] = None,
    speed: Annotated[
        float | None, typer.Option(help="Replay speed: 0 = as fast as possible, 1 = real time, N = N x.")
    ] = None,
    loop: Annotated[
        bool | None, typer.Option("--loop/--no-loop", help="Replay forever, fresh hashes per loop.")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Stop after sending this many transactions.")] = None,
    prevouts: Annotated[
        list[Path] | None, typer.Option(help="blocks: *.utxos.json prevout files, for exact fees.")
    ] = None,
) -> None:
    """Publish Bitcoin transactions to Kafka (REST poll, WebSocket push, sample replay or block files)."""
    import threading

    from btc_anomaly.ingestion.producer import run_producer

    _logging()
    s = get_settings()
    chosen = source or s.producer_source
    if chosen not in ("rest", "ws", "replay", "blocks"):
        raise typer.BadParameter(f"{chosen!r}: expected rest, ws, replay or blocks", param_hint="--source")
    if chosen == "blocks" and not paths:
        raise typer.BadParameter("--source blocks needs one or more block files", param_hint="PATHS")
    if chosen == "ws" and paths:
        raise typer.BadParameter("--source ws takes no paths", param_hint="PATHS")
    stop = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        logging.getLogger("btc_anomaly.produce").info("signal %d: flushing and stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if s.producer_metrics_port:
        from btc_anomaly.monitoring.exposition import serve_metrics

        serve_metrics(s.producer_metrics_port, "btc_producer_")
    stats = run_producer(
        s, chosen, paths=paths, speed=speed, loop=loop, limit=limit, prevouts=prevouts, stop=stop
    )
    typer.echo(json.dumps(stats.as_dict()))


@app.command("latest-block")
def latest_block(
    n: Annotated[int, typer.Option("--n", help="How many transactions (the block's last n).")] = 10,
) -> None:
    """Print the latest n transactions of the current block as canonical JSON lines (REST)."""
    import asyncio

    from btc_anomaly.ingestion.rest_source import BlockchainClient, latest_block_transactions

    _logging("WARNING")
    s = get_settings()

    async def fetch() -> list[bytes]:
        async with BlockchainClient(s) as client:
            return [tx.to_json_bytes() for tx in await latest_block_transactions(client, n)]

    for line in asyncio.run(fetch()):
        typer.echo(line.decode())


@app.command()
def stream(
    available_now: Annotated[
        bool,
        typer.Option("--available-now", help="Drain what the topic holds now into the lake, then exit."),
    ] = False,
) -> None:
    """Stream the transactions topic into the Delta lake (Spark Structured Streaming), until stopped."""
    import threading

    from btc_anomaly.processing.stream import StreamFailed, run_stream

    _logging()
    logging.getLogger("py4j").setLevel(logging.WARNING)
    stop = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        # A second signal (an impatient Ctrl-C) must not cut the shutdown short: the queries stop
        # between micro-batches, then the JVM (processing/stream.run_stream).
        if stop.is_set():
            logging.getLogger("btc_anomaly.stream").info("signal %d: already stopping", signum)
            return
        logging.getLogger("btc_anomaly.stream").info("signal %d: stopping the queries", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        run_stream(get_settings(), available_now=available_now, stop=stop)
    except StreamFailed:
        raise typer.Exit(2) from None  # logged with the operator's way out where it was detected
    finally:
        # Stopped: a late second signal (honcho's SIGTERM 0.5 s after Ctrl-C) must not kill the exiting
        # interpreter, which puts SIG_DFL back for Python handlers (not for SIG_IGN) while it finalizes.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)


# --- model lifecycle ------------------------------------------------------------------------------------


@app.command()
def mlflow(
    workers: Annotated[int, typer.Option(help="Server worker processes.")] = 1,
    allowed_hosts: Annotated[
        str | None, typer.Option(help="Extra allowed Host headers (containers), comma-separated.")
    ] = None,
) -> None:
    """Run the MLflow tracking + registry server (sqlite + local artifacts), in the foreground."""
    from btc_anomaly.runtime.mlflow_server import MlflowServer

    _logging()
    s = get_settings()
    server = MlflowServer(
        data_dir=s.mlflow_dir or s.state_dir / "mlflow",
        host=s.mlflow_host,
        port=s.mlflow_port,
        workers=workers,
        allowed_hosts=allowed_hosts,
    )

    _run_in_foreground(
        server,
        180,
        f"mlflow server ready on {server.url} (state in {server.data_dir}, log {server.log_path})",
    )


def _parse_time(value: str | None) -> object:
    import datetime as dt

    return None if value is None else dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


@app.command()
def train(
    since: Annotated[str | None, typer.Option(help="Window start (ISO 8601, UTC if no offset).")] = None,
    until: Annotated[str | None, typer.Option(help="Window end, exclusive (ISO 8601).")] = None,
    window: Annotated[
        str | None, typer.Option(help="Window length, e.g. 24h (default: BTC_ANOMALY_MODEL_TRAIN_WINDOW).")
    ] = None,
    every: Annotated[
        str | None, typer.Option(help="Retrain on a schedule, e.g. 30m; runs until stopped.")
    ] = None,
    no_promote: Annotated[bool, typer.Option("--no-promote", help="Register only; skip the gate.")] = False,
    by: Annotated[str | None, typer.Option(help="Who is training (recorded); default user@host.")] = None,
) -> None:
    """Train on the transactions Delta table, log to MLflow, register a challenger, run the promotion gate."""
    from btc_anomaly.model.train import run_until_signalled
    from btc_anomaly.model.train import train as run_train

    _logging()
    s = get_settings()

    def once() -> object:
        result = run_train(
            s,
            since=_parse_time(since),  # type: ignore[arg-type]
            until=_parse_time(until),  # type: ignore[arg-type]
            window=window,
            promote=not no_promote,
            decided_by=by,
        )
        typer.echo(
            json.dumps(
                {
                    "model": s.model_name,
                    "version": result.version,
                    "run_id": result.run_id,
                    "rows": int(result.metrics["rows"]),
                    "anomaly_rate": round(result.metrics["anomaly_rate"], 5),
                    "seconds": round(result.timings["total_seconds"], 2),
                    "gate": result.decision.summary if result.decision is not None else None,
                }
            )
        )
        return result

    if every is None:
        # Stopped by a signal: the shell's 128 + signal, so a script's `train && ...` goes no further.
        stopped = run_until_signalled(once)
        if stopped is not None:
            raise typer.Exit(128 + stopped)
        return
    from btc_anomaly.monitoring import trainer as trainer_metrics

    trainer_metrics.serve(s)
    run_until_signalled(trainer_metrics.scheduled(s, once), every)


@app.command()
def promote(
    version: Annotated[str | None, typer.Argument(help="Version to gate (default: the challenger).")] = None,
    force: Annotated[bool, typer.Option(help="Promote even if checks fail (recorded as forced).")] = False,
    by: Annotated[str | None, typer.Option(help="Who decides (recorded); default user@host.")] = None,
    history: Annotated[
        bool, typer.Option("--history", help="Print every recorded decision instead.")
    ] = False,
) -> None:
    """Run the promotion gate: challenger -> champion only if every check passes. Exit 1 when refused."""
    from btc_anomaly.model.promotion import promote as run_gate
    from btc_anomaly.model.promotion import promotion_history

    _logging("WARNING")
    s = get_settings()
    if history:
        for event in promotion_history(s):
            typer.echo(json.dumps(event))
        return
    from btc_anomaly.model.registry import BundleRefused

    try:
        decision = run_gate(s, version, decided_by=by, force=force)
    except BundleRefused as exc:  # a version whose files do not match their training digest
        typer.echo(f"refused: {exc}", err=True)
        raise typer.Exit(1) from None
    for check in decision.checks:
        typer.echo(f"{'PASS' if check.passed else 'FAIL'}  {check.name:<20} {check.detail}")
    typer.echo(decision.summary)
    if not decision.promoted:
        raise typer.Exit(1)


@app.command()
def evaluate(
    alias: Annotated[str, typer.Option(help="Registered version to evaluate, by alias.")] = "champion",
    version: Annotated[
        str | None, typer.Option(help="Registered version number (instead of --alias).")
    ] = None,
    compare: Annotated[
        bool,
        typer.Option(
            "--compare", help="Train candidate detectors on the bundled sample and compare them instead."
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of every candidate (--compare).")] = 0,
    benchmark: Annotated[
        Path | None, typer.Option(help="Benchmark file (default: the bundled resources/benchmark.jsonl.gz).")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the flat metrics as JSON instead.")] = False,
) -> None:
    """Score the labelled benchmark with a registered model (or, --compare, candidate detectors) and print
    ROC-AUC, PR-AUC, precision at 50/100, flag rates, per-archetype recall and reason agreement."""
    import time

    from btc_anomaly.model.evaluate import bundle_scorer, load_benchmark
    from btc_anomaly.model.evaluate import evaluate as run_eval

    _logging("WARNING")
    s = get_settings()
    bench = load_benchmark(benchmark)
    t0 = time.perf_counter()
    if compare:
        from btc_anomaly.model.candidates import compare as run_compare

        result = run_compare(seed=seed, benchmark=bench, settings=s)
        typer.echo(result.table())
        typer.echo(f"{len(result.rows)} rows, seed {seed}, {time.perf_counter() - t0:.1f} s")
        return
    from btc_anomaly.model.registry import BundleRefused, load_alias, load_version

    try:
        loaded = load_version(s, version) if version is not None else load_alias(s, alias)
    except BundleRefused as exc:
        typer.echo(f"refused: {exc}", err=True)
        raise typer.Exit(1) from None
    if loaded is None:
        typer.echo(f"{s.model_name} has no '{alias}' version at {s.mlflow_tracking_uri}", err=True)
        raise typer.Exit(1)
    report = run_eval(bundle_scorer(loaded.bundle, s), bench, name=f"{loaded.name} v{loaded.version}")
    if json_out:
        typer.echo(json.dumps(report.flat_metrics(), indent=1, sort_keys=True))
        return
    typer.echo(f"{loaded.name} v{loaded.version}\n")
    typer.echo(report.table())
    typer.echo(f"evaluated in {report.seconds:.1f} s")


# --- serving --------------------------------------------------------------------------------------------


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Bind address (default: BTC_ANOMALY_API_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: BTC_ANOMALY_API_PORT, 5001).")] = None,
    workers: Annotated[
        int | None, typer.Option(help="uvicorn worker processes (default: BTC_ANOMALY_API_WORKERS).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn and service log level.")] = "info",
) -> None:
    """Serve the prediction API (FastAPI + uvicorn): /predict, /predict/raw, /anomalies, /metrics, ..."""
    # Import nothing that imports prometheus_client before serve() has set PROMETHEUS_MULTIPROC_DIR.
    from btc_anomaly.api.server import serve

    serve(get_settings(), host=host, port=port, workers=workers, log_level=log_level)


@app.command()
def dashboard(
    host: Annotated[
        str | None, typer.Option(help="Bind address (default: BTC_ANOMALY_DASHBOARD_HOST).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port (default: BTC_ANOMALY_DASHBOARD_PORT, 8050).")
    ] = None,
    demo: Annotated[
        Path | None,
        typer.Option(
            help="Write a demo lake here first (the bundled sample scored by a model fitted in-process, "
            "first_seen spread over the last hour) and show it; needs the model extra.",
        ),
    ] = None,
) -> None:
    """Serve the Dash dashboard: live KPIs, charts and top anomalies from the lake; model page from MLflow."""
    import os

    _logging()
    overrides: dict[str, object] = {}
    if host is not None:
        overrides["dashboard_host"] = host
    if port is not None:
        overrides["dashboard_port"] = port
    if demo is not None:
        overrides["lake_root"] = demo
    s = get_settings().model_copy(update=overrides)
    # This process only reads the registry for display: fail fast rather than retry for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(1, s.dashboard_mlflow_timeout_s))))
    if demo is not None:
        import multiprocessing

        from btc_anomaly.dashboard.demo import write_demo_lake

        # Written in a spawned child: delta-rs panics in gunicorn's forked worker if this process has
        # already used it.
        writer = multiprocessing.get_context("spawn").Process(target=write_demo_lake, args=(demo, s))
        writer.start()
        writer.join()
        if writer.exitcode != 0:
            raise typer.Exit(f"writing the demo lake failed (exit {writer.exitcode})")
        logging.getLogger("btc_anomaly.dashboard").info("demo lake written at %s", demo)
    from btc_anomaly.dashboard.app import serve

    serve(s)


# --- monitoring -----------------------------------------------------------------------------------------


@app.command()
def metrics(
    markdown: Annotated[
        bool, typer.Option(help="Print the README table (name, type, labels, help).")
    ] = False,
) -> None:
    """List every Prometheus metric of every service (from monitoring/metrics.py)."""
    from btc_anomaly.monitoring.catalogue import catalogue_markdown, catalogue_text

    typer.echo(catalogue_markdown() if markdown else catalogue_text())


@app.command()
def prometheus(
    print_config: Annotated[
        bool, typer.Option("--print-config", help="Print the rendered prometheus.yml and exit.")
    ] = False,
    compose: Annotated[
        bool, typer.Option(help="With --print-config: the compose variant (service names as hosts).")
    ] = False,
) -> None:
    """Run Prometheus (Debian binary) on the local stack's targets and alert rules, in the foreground."""
    from btc_anomaly.monitoring import prometheus_config as pc
    from btc_anomaly.runtime.prometheus_server import PrometheusServer

    s = get_settings()
    if print_config:
        typer.echo(pc.compose_config(s) if compose else pc.local_config(s), nl=False)
        return
    _logging()
    folder = s.prometheus_dir or s.state_dir / "prometheus"
    server = PrometheusServer(
        config_file=pc.write_runtime_config(s, folder),
        data_dir=folder,
        host=s.prometheus_host,
        port=s.prometheus_port,
        binary=s.prometheus_binary,
        retention=s.prometheus_retention,
    )

    _run_in_foreground(
        server,
        60,
        f"prometheus ready on {server.url} (config {server.config_file}, log {server.log_path})",
    )


@app.command("alert-relay")
def alert_relay(
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[
        int | None, typer.Option(help="Port (default: BTC_ANOMALY_ALERT_RELAY_PORT, 9096).")
    ] = None,
) -> None:
    """Relay Alertmanager webhooks to the Slack-compatible BTC_ANOMALY_NOTIFY_WEBHOOK_URL (rate limited)."""
    from btc_anomaly.monitoring.alert_relay import make_server
    from btc_anomaly.monitoring.notifier import from_settings

    _logging()
    s = get_settings()
    notifier = from_settings(s)
    if not notifier.enabled:
        typer.echo("BTC_ANOMALY_NOTIFY_WEBHOOK_URL is not set: nothing to relay to", err=True)
        raise typer.Exit(2)
    server = make_server(notifier, host, s.alert_relay_port if port is None else port)

    def _exit(signum: int, _frame: object) -> None:
        # Unwind serve_forever() in this thread; server.shutdown() here would wait for itself.
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _exit)
    logging.getLogger("btc_anomaly.alert_relay").info(
        "relaying Alertmanager webhooks on http://%s:%d/", host, server.server_address[1]
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        notifier.flush(5.0)
        notifier.close()


@app.command()
def detect(
    once: Annotated[bool, typer.Option("--once", help="Poll once, print what was found, exit.")] = False,
    healthcheck: Annotated[
        bool,
        typer.Option(
            "--healthcheck",
            help="Check the running detect through its metrics port: exit 1 when it does not answer or has "
            "had no successful poll for BTC_ANOMALY_DETECT_HEALTHCHECK_MAX_AGE_S (compose healthcheck).",
        ),
    ] = False,
) -> None:
    """Window (EWMA) and coordinated-burst detectors over the lake, plus alerts for risky transactions (no JVM)."""
    import threading

    s = get_settings()
    if healthcheck:
        from btc_anomaly.monitoring.detect_health import healthcheck as check

        ok, why = check(s)
        typer.echo(f"detect {'healthy' if ok else 'UNHEALTHY'}: {why}", err=not ok)
        raise typer.Exit(0 if ok else 1)

    from btc_anomaly.detectors.service import DetectService
    from btc_anomaly.monitoring.notifier import from_settings

    _logging()
    notifier = from_settings(s)
    service = DetectService(s, notifier)
    try:
        if once:
            r = service.poll()
            typer.echo(
                json.dumps(
                    {
                        "window_anomalies_new": r.windows_new,
                        "bursts_new": r.bursts_new,
                        "bursts_updated": r.bursts_updated,
                        "risky_transactions": r.risky_transactions,
                        "alerts": len(r.alerts),
                        "failed_stages": sorted(r.failures),
                    }
                )
            )
            if r.failures:
                raise typer.Exit(1)
            return
        if s.detect_metrics_port:
            from btc_anomaly.monitoring.exposition import serve_metrics

            serve_metrics(s.detect_metrics_port, "btc_detect_", "btc_notifier_")
            logging.getLogger("btc_anomaly.detectors.service").info(
                "detect metrics on :%d/metrics", s.detect_metrics_port
            )
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        service.run(stop)
    finally:
        notifier.flush(5.0)
        notifier.close()


if __name__ == "__main__":
    app()
