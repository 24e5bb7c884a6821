"""Real data for the detector tests: the bundled sample, a bundle fitted on it, single real transactions."""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import orjson
import pandas as pd
import pyarrow as pa

from btc_anomaly.config import PROJECT_ROOT, Settings
from btc_anomaly.model.bundle import ModelBundle
from btc_anomaly.model.train import fit_transactions
from btc_anomaly.schema import arrow_schema

SAMPLE = PROJECT_ROOT / "data" / "sample" / "transactions.jsonl.gz"
LABELS = PROJECT_ROOT / "data" / "labels"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@lru_cache(maxsize=1)
def sample_records() -> tuple[dict, ...]:
    return tuple(orjson.loads(line) for line in gzip.decompress(SAMPLE.read_bytes()).splitlines())


def sample_frame() -> pd.DataFrame:
    return pd.DataFrame(list(sample_records()))


def record(tx_hash: str) -> dict:
    """One real sample transaction by hash (a prefix is enough)."""
    found = [r for r in sample_records() if r["hash"].startswith(tx_hash)]
    assert len(found) == 1, f"{tx_hash}: {len(found)} matches in the sample"
    return found[0]


def table(records: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(
        [{**r, "first_seen": pd.Timestamp(r["first_seen"]).to_pydatetime()} for r in records],
        schema=arrow_schema(),
    )


@lru_cache(maxsize=1)
def fitted_bundle() -> ModelBundle:
    return fit_transactions(sample_frame(), Settings())[0]


def settings(**overrides: object) -> Settings:
    return Settings(watchlist_dir=LABELS, **overrides)


def restamp(records: list[dict], start: pd.Timestamp, step_s: float) -> list[dict]:
    """Real transactions re-stamped ``step_s`` apart from ``start`` (what the replay producer does)."""
    return [
        {**r, "first_seen": (start + pd.Timedelta(milliseconds=round(i * step_s * 1000))).isoformat()}
        for i, r in enumerate(records)
    ]


def stats_1m(records: list[dict]) -> pd.DataFrame:
    """tx_stats_1m rows as the stream's window aggregates compute them (processing/aggregates.py)."""
    df = pd.DataFrame(records)
    df["first_seen"] = pd.to_datetime(df["first_seen"], utc=True, format="ISO8601")
    df["fee_rate"] = df["fee"] / df["vsize"].where(df["vsize"] > 0)
    g = df.groupby(df["first_seen"].dt.floor("1min"))
    out = pd.DataFrame(
        {
            "tx_count": g.size(),
            "total_value": g["output_value"].sum(),
            "fee_rate_p50": g["fee_rate"].median(),
            "fan_in_count": g["input_count"].apply(lambda s: int((s >= 10).sum())),
            "fan_out_count": g["output_count"].apply(lambda s: int((s >= 10).sum())),
        }
    ).reset_index(names="window_start")
    out["window_end"] = out["window_start"] + pd.Timedelta(minutes=1)
    return out


# --- a real lake for the detect service (deltalake, as `btc-anomaly detect` and the demo write it) -------

# The real fan-outs (36-59 outputs each) that one exchange wallet sent in block 692,261: a real batch-payout
# burst (ten in the block; the sample may hold some of them out for the benchmark).
FUNDER = "1NDyJtNTjmwk5xPNhjgAMu4HDHigtobu1s"


def block(height: int) -> list[dict]:
    return [r for r in sample_records() if r["block_height"] == height and r["fee"] is not None]


def burst_members() -> list[dict]:
    out = [
        r
        for r in block(692261)
        if r["output_count"] >= 10 and any(i["address"] == FUNDER for i in r["inputs"])
    ]
    assert len(out) >= 8, f"{len(out)} fan-outs of {FUNDER} in the sample"
    return out


def write_transactions(lake: Path, records: list[dict]) -> None:
    """Append ``records`` to ``<lake>/transactions`` with the stream's schema and date partitions
    (deltalake, not Spark)."""
    from deltalake import write_deltalake

    from btc_anomaly.processing import tables

    rows = []
    for r in records:
        ts = pd.Timestamp(r["first_seen"])
        rows.append(
            {**r, "first_seen": ts.to_pydatetime(), "date": ts.date(), "ingested_at": ts.to_pydatetime()}
        )
    write_deltalake(
        str(lake / tables.TRANSACTIONS),
        pa.Table.from_pylist(rows, schema=tables.transactions_schema()),
        mode="append",
        partition_by=[tables.DATE_COLUMN],
    )


class RecordingNotifier:
    """A notifier that keeps the alert texts instead of posting them (the webhook is the outside world)."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def notify_text(self, text: str, kind: str = "alert") -> bool:
        self.texts.append(text)
        return True


def run_detect_once(monkeypatch: object, lake_root: object) -> object:
    """``btc-anomaly detect --once`` over ``lake_root`` through the CLI (webhook off); the CliRunner result."""
    from typer.testing import CliRunner

    from btc_anomaly.cli import app
    from btc_anomaly.config import get_settings

    monkeypatch.setenv("BTC_ANOMALY_LAKE_ROOT", str(lake_root))  # type: ignore[attr-defined]
    monkeypatch.delenv("BTC_ANOMALY_NOTIFY_WEBHOOK_URL", raising=False)  # type: ignore[attr-defined]
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(app, ["detect", "--once"])
    finally:
        get_settings.cache_clear()
