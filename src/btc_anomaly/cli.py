"""`btc-anomaly <component>`: the one entry point of every service and tool.

Heavy imports stay inside the commands so `btc-anomaly --help` is instant and each service only
loads what it runs.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from typing import Annotated

import typer

from btc_anomaly.config import get_settings, settings_reference_markdown

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
    )

    def _stop(signum: int, _frame: object) -> None:
        broker.stop()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    broker.start(timeout_s=120)
    logging.getLogger("btc_anomaly.kafka").info(
        "kafka broker ready on %s (logs in %s)", broker.bootstrap, broker.log_dir
    )
    while broker.running:
        signal.pause()


@app.command()
def decode(
    hexes: Annotated[list[str], typer.Argument(help="Raw transactions as hex.", show_default=False)],
) -> None:
    """Decode raw hex transactions and print one JSON object per transaction."""
    from btc_anomaly.ingestion.decode import decode_summary

    for raw in hexes:
        typer.echo(json.dumps(decode_summary(raw)))


if __name__ == "__main__":
    app()
