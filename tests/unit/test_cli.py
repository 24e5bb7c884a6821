"""The seed-style CLI: `btc-anomaly decode` and `btc-anomaly config`."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from btc_anomaly.cli import app
from btc_anomaly.config import ENV_PREFIX, Settings

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

runner = CliRunner()


def test_decode_prints_one_json_object_per_transaction() -> None:
    example = (FIXTURES / "example_tx_15e10745.hex").read_text().strip()
    result = runner.invoke(app, ["decode", example, "00zz", "0100"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert lines[0]["txid"] == "15e10745f15593a899cef391191bdd3d7c12412cc4696b7bcb669d0feadc8521"
    assert (lines[0]["input_count"], lines[0]["output_count"], lines[0]["output_value"]) == (
        5,
        4,
        6_013_440_000,
    )
    assert lines[1]["valid"] is False and "non-hex" in lines[1]["reason"]
    assert lines[2]["valid"] is False and lines[2]["reason"]


def test_config_reference_lists_every_setting() -> None:
    result = runner.invoke(app, ["config", "--markdown"])
    assert result.exit_code == 0
    for name in Settings.model_fields:
        assert f"`{ENV_PREFIX}{name.upper()}`" in result.output


def test_settings_come_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv(f"{ENV_PREFIX}KAFKA_BOOTSTRAP", "10.1.2.3:9999")
    assert Settings().kafka_bootstrap == "10.1.2.3:9999"


def test_kafka_cluster_ids_never_look_like_options() -> None:
    from btc_anomaly.runtime.kafka_broker import _cluster_id

    ids = [_cluster_id() for _ in range(5000)]
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)
