"""A lake the dashboard can show without Kafka or Spark: the bundled real sample, scored by a real model.

Used by the dashboard tests, the benchmark and ``btc-anomaly dashboard --demo``. The tables are laid
out as the stream lays them out: ``transactions`` partitioned by ``date`` (UTC date of ``first_seen``)
with ``ingested_at``, ``scored_transactions`` with ``scored_arrow_schema()``.

Timestamps. The sample carries real block times from 2011-2025, which no "last hour" window would
show. ``restamp`` spreads the rows over a recent interval in file order, as the stream's replay does
(it re-stamps ``first_seen`` to the wall clock); the scores do not depend on ``first_seen``.

The model is an IsolationForest bundle fitted in-process with ``btc_anomaly.model.train.fit_transactions``
(needs the ``model`` extra) unless a ``ChampionModel`` is passed, e.g. one loaded from MLflow.
"""

from __future__ import annotations

import datetime as dt
import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from btc_anomaly.config import PROJECT_ROOT, Settings
from btc_anomaly.schema import Transaction, arrow_schema

SAMPLE_PATH = PROJECT_ROOT / "data" / "sample" / "transactions.jsonl.gz"
TRANSACTIONS = "transactions"
SCORED = "scored_transactions"


@dataclass
class DemoLake:
    root: Path
    transactions: pd.DataFrame  # canonical rows as written (first_seen re-stamped)
    scored: pd.DataFrame  # score_frame output as written
    model_version: str

    @property
    def scored_path(self) -> Path:
        return self.root / SCORED

    @property
    def transactions_path(self) -> Path:
        return self.root / TRANSACTIONS


def sample_transactions(path: Path = SAMPLE_PATH) -> pa.Table:
    """The bundled sample as canonical Arrow rows (validated with the pydantic model)."""
    lines = gzip.decompress(path.read_bytes()).splitlines()
    rows = [Transaction.model_validate_json(line).model_dump() for line in lines if line.strip()]
    return pa.Table.from_pylist(rows, schema=arrow_schema())


def fit_model(transactions: pd.DataFrame, settings: Settings, version: str = "0") -> object:
    """A ``ChampionModel`` fitted in-process on ``transactions`` (no MLflow)."""
    from btc_anomaly.model.scoring import ChampionModel
    from btc_anomaly.model.train import fit_transactions

    bundle, _ = fit_transactions(transactions, settings)
    bundle.set_backend(settings.scorer_backend)  # type: ignore[arg-type]
    return ChampionModel(bundle=bundle, name=settings.model_name, version=version, run_id=None)


def restamp(n: int, start: dt.datetime, end: dt.datetime) -> pd.Series:
    """``n`` timestamps spread evenly over ``[start, end)`` in order (microsecond precision, UTC)."""
    t0 = pd.Timestamp(start).tz_convert("UTC").as_unit("us")
    span_us = int((pd.Timestamp(end) - pd.Timestamp(start)) / pd.Timedelta(microseconds=1))
    offsets = (np.arange(n, dtype=np.int64) * span_us) // max(n, 1)
    return pd.Series(t0 + pd.to_timedelta(offsets, unit="us"), name="first_seen")


def transactions_table(frame: pd.DataFrame, ingested_at: dt.datetime | None = None) -> pa.Table:
    """Canonical rows + ``date`` and ``ingested_at``: the columns of the stream's ``transactions`` table."""
    table = pa.Table.from_pandas(frame, schema=arrow_schema(), preserve_index=False)
    date = pc.cast(table["first_seen"], pa.date32())
    stamp = pd.Timestamp(ingested_at or dt.datetime.now(dt.UTC))
    ingested = pa.array([stamp] * len(table), pa.timestamp("us", tz="UTC"))
    return table.append_column("date", date).append_column("ingested_at", ingested)


def scored_table(scored: pd.DataFrame) -> pa.Table:
    from btc_anomaly.model.scoring import scored_arrow_schema

    return pa.Table.from_pandas(scored, schema=scored_arrow_schema(), preserve_index=False)


def write_demo_lake(
    root: Path,
    settings: Settings | None = None,
    *,
    model: object | None = None,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
    restamped: bool = True,
) -> DemoLake:
    """Write ``transactions`` and ``scored_transactions`` under ``root`` from the bundled sample.

    With ``restamped`` (default) ``first_seen`` is spread over ``[start, end)``, by default the hour
    before now; otherwise the sample's real block times are kept.
    """
    from deltalake import write_deltalake

    from btc_anomaly.model.scoring import score_frame

    settings = settings or Settings()
    frame = sample_transactions().to_pandas()
    if restamped:
        end = end or dt.datetime.now(dt.UTC)
        start = start or end - dt.timedelta(hours=1)
        frame["first_seen"] = restamp(len(frame), start, end)
    model = model or fit_model(frame, settings)
    scored = score_frame(frame, model, settings=settings)  # type: ignore[arg-type]
    root.mkdir(parents=True, exist_ok=True)
    write_deltalake(
        str(root / TRANSACTIONS), transactions_table(frame), partition_by=["date"], mode="overwrite"
    )
    write_deltalake(str(root / SCORED), scored_table(scored), mode="overwrite")
    return DemoLake(root=root, transactions=frame, scored=scored, model_version=str(model.version))  # type: ignore[attr-defined]


def looped_scored(
    scored: pd.DataFrame, n_rows: int, start: dt.datetime, end: dt.datetime, *, seed: int = 0
) -> pa.Table:
    """``n_rows`` scored rows: ``scored`` repeated with fresh hashes (the replay's ``loop_hash``), their
    ``first_seen`` spread over ``[start, end)`` in a shuffled order so every stretch of time mixes all
    kinds of transactions, and ``scored_at`` a second after ``first_seen``."""
    from btc_anomaly.ingestion.replay_source import loop_hash

    base = scored_table(scored)
    reps = -(-n_rows // len(base))
    rng = np.random.default_rng(seed)
    # A permutation of (loop, row) pairs: each original row appears at most once per loop, so every
    # hash is unique.
    pairs = rng.permutation(reps * len(base))[:n_rows]
    order, loops = pairs % len(base), pairs // len(base)
    table = base.take(pa.array(order))
    originals = base["hash"].to_pylist()
    hashes = [
        originals[i] if loop == 0 else loop_hash(originals[i], int(loop))
        for i, loop in zip(order, loops, strict=True)
    ]
    first_seen = restamp(n_rows, start, end)
    scored_at = first_seen + pd.Timedelta(seconds=1)
    ts = pa.timestamp("us", tz="UTC")
    table = table.set_column(table.schema.get_field_index("hash"), "hash", pa.array(hashes, pa.string()))
    table = table.set_column(
        table.schema.get_field_index("first_seen"), "first_seen", pa.array(first_seen, ts)
    )
    return table.set_column(table.schema.get_field_index("scored_at"), "scored_at", pa.array(scored_at, ts))


__all__ = [
    "DemoLake",
    "fit_model",
    "looped_scored",
    "restamp",
    "sample_transactions",
    "scored_table",
    "transactions_table",
    "write_demo_lake",
]
