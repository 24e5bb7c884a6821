"""Scoring canonical transactions with the champion: what the stream and the API call.

``load_champion(settings)`` loads ``models:/<model_name>@champion`` as data (``registry.load_version``).
``score_frame(df, model)`` turns canonical transactions into one scored row each::

    hash, first_seen, anomaly_score, is_anomaly, threshold, model_kind, reasons, top_features,
    model_name, model_version, scored_at, + TX_DISPLAY_COLUMNS (block_height, input_count, output_count,
    output_value, fee, vsize, fee_rate), + RISK_COLUMNS (risk_score, severity, signals, rule_hits,
    watchlist_hits, mahalanobis)

The risk columns come from the per-transaction detectors (``btc_anomaly.detectors``): rules, address
watchlists and the Mahalanobis distance, combined with the forest score into a 0-100 ``risk_score`` and a
``severity`` (formula: ``detectors/risk.py``). ``detectors=False`` (or ``BTC_ANOMALY_RISK_DETECTORS=false``)
keeps the columns but fills them from the forest score alone.

The display columns are copied from the transaction so `scored_transactions` alone can drive the
dashboard and /anomalies (value, fee rate, fan-in/out) without joining the transactions table.

``anomaly_score`` is in (0, 1], higher = more anomalous; ``is_anomaly = anomaly_score > threshold``
(the threshold is -offset_ of the forest that scored the row, see ``scorer.py``). ``reasons`` are
human sentences for the top features (anomalies only by default), ``top_features`` their names.

Spark (``mapInPandas``)::

    scorer = map_in_pandas_scorer(tracking_uri, model_name)        # plain strings: cheap to pickle
    scored = df.mapInPandas(scorer, schema=scored_spark_schema())

Each Python worker loads the champion once and re-checks the alias every ``Settings.model_reload_s``
seconds, so a promotion reaches the stream without a restart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa

from btc_anomaly.config import Settings, get_settings
from btc_anomaly.detectors.watchlist import HIT_TYPE, load_watchlist
from btc_anomaly.features import INPUT_COLUMNS
from btc_anomaly.model import core
from btc_anomaly.model.bundle import ModelBundle
from btc_anomaly.model.context import fee_market
from btc_anomaly.schema import arrow_schema, utc_times

log = logging.getLogger(__name__)

Explain = Literal["anomalies", "all", "none"]


def scored_arrow_schema() -> pa.Schema:
    ts = pa.timestamp("us", tz="UTC")
    return pa.schema(
        [
            pa.field("hash", pa.string(), nullable=False),
            pa.field("first_seen", ts),
            pa.field("anomaly_score", pa.float64(), nullable=False),
            pa.field("is_anomaly", pa.bool_(), nullable=False),
            pa.field("threshold", pa.float64(), nullable=False),
            pa.field("model_kind", pa.string(), nullable=False),
            pa.field("reasons", pa.list_(pa.string())),
            pa.field("top_features", pa.list_(pa.string())),
            pa.field("model_name", pa.string(), nullable=False),
            pa.field("model_version", pa.string(), nullable=False),
            pa.field("scored_at", ts, nullable=False),
            pa.field("block_height", pa.int64()),
            pa.field("input_count", pa.int64()),
            pa.field("output_count", pa.int64()),
            pa.field("output_value", pa.int64()),
            pa.field("fee", pa.int64()),
            pa.field("vsize", pa.int64()),
            pa.field("fee_rate", pa.float64()),
            pa.field("risk_score", pa.float64(), nullable=False),
            pa.field("severity", pa.string(), nullable=False),
            pa.field("signals", pa.list_(pa.string())),
            pa.field("rule_hits", pa.list_(pa.string())),
            pa.field("watchlist_hits", pa.list_(HIT_TYPE)),
            pa.field("mahalanobis", pa.float64()),
        ]
    )


RISK_COLUMNS = ("risk_score", "severity", "signals", "rule_hits", "watchlist_hits", "mahalanobis")
TX_DISPLAY_COLUMNS = ("block_height", "input_count", "output_count", "output_value", "fee", "vsize")


SCORED_COLUMNS: list[str] = scored_arrow_schema().names


def scored_spark_schema() -> Any:
    """Spark StructType of ``score_frame``'s output (needs pyspark), for ``mapInPandas(schema=...)``."""
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(scored_arrow_schema())


@dataclass
class ChampionModel:
    bundle: ModelBundle
    name: str
    version: str
    run_id: str | None
    alias: str = "champion"
    loaded_at: float = 0.0  # time.time()


def load_champion(settings: Settings | None = None, alias: str = "champion") -> ChampionModel:
    """Load ``models:/<name>@<alias>`` from the registry; LookupError when the alias is not set."""
    from btc_anomaly.model.registry import load_alias

    settings = settings or get_settings()
    loaded = load_alias(settings, alias)
    if loaded is None:
        raise LookupError(f"no '{alias}' version of {settings.model_name} at {settings.mlflow_tracking_uri}")
    loaded.bundle.set_backend(settings.scorer_backend)  # type: ignore[arg-type]
    return ChampionModel(
        bundle=loaded.bundle,
        name=loaded.name,
        version=loaded.version,
        run_id=loaded.run_id,
        alias=alias,
        loaded_at=time.time(),
    )


def score_frame(
    df: pd.DataFrame,
    model: ChampionModel | None = None,
    *,
    explain: Explain = "anomalies",
    top_k: int | None = None,
    settings: Settings | None = None,
    detectors: bool | None = None,
    market: np.ndarray | float | None = None,
) -> pd.DataFrame:
    """Score canonical transactions (pandas, as read from Delta, Kafka JSON or Spark) with ``model``.

    Without ``model`` the process-wide cached champion is used (loaded on first use, alias re-checked
    every ``model_reload_s``). The result has ``SCORED_COLUMNS`` and a fresh RangeIndex. ``detectors``
    (default ``Settings.risk_detectors``) runs the rules, watchlists and Mahalanobis distance. ``market``
    is the fee market to read fee rates against (sat/vB; None = the model's training reference).
    """
    settings = settings or get_settings()
    model = model or cached_champion(settings)
    top_k = settings.explain_top_k if top_k is None else top_k
    detectors = settings.risk_detectors if detectors is None else detectors
    scored_at = pd.Timestamp.now(tz="UTC")
    if len(df) == 0:
        return _empty()
    # One pandas → Arrow conversion for the features and the detectors (the nested lists dominate it).
    table = canonical_table(df)
    bundle = model.bundle
    batch = core.score_batch(
        bundle,
        table,
        market=market,
        watchlist=load_watchlist(settings.watchlist_dir) if detectors else None,
        detectors=detectors,
    )
    n = len(df)
    # One shared empty list for the unexplained rows: n fresh lists cost more than the scoring itself.
    nothing: list[str] = []
    reasons: list[list[str]] = [nothing] * n
    top: list[list[str]] = [nothing] * n
    if explain != "none":
        rows = np.arange(n) if explain == "all" else np.flatnonzero(batch.is_anomaly)
        for r, it in core.explain_batch(bundle, batch, rows, top_k).items():
            reasons[r] = [i["reason"] for i in it]
            top[r] = [i["feature"] for i in it]
    if "first_seen" in df.columns:
        first_seen = utc_times(df["first_seen"]).reset_index(drop=True)
    else:
        first_seen = pd.Series(pd.NaT, index=pd.RangeIndex(n), dtype="datetime64[us, UTC]")
    display = _display_columns(df)
    a = batch.assessment
    return pd.DataFrame(
        {
            "hash": df["hash"].to_numpy(dtype=object),
            "first_seen": first_seen,
            "anomaly_score": batch.score,
            "is_anomaly": batch.is_anomaly,
            "threshold": batch.threshold,
            "model_kind": batch.kinds,
            "reasons": reasons,
            "top_features": top,
            "model_name": model.name,
            "model_version": model.version,
            "scored_at": scored_at,
            **display,
            "risk_score": a.risk_score,
            "severity": a.severity,
            "signals": a.signals,
            "rule_hits": a.rule_hits,
            "watchlist_hits": a.watchlist_hits,
            "mahalanobis": a.mahalanobis,
        }
    )


_INPUT_SCHEMA = pa.schema([arrow_schema().field(c) for c in INPUT_COLUMNS])


def canonical_table(df: pd.DataFrame) -> pa.Table:
    """The ``features.INPUT_COLUMNS`` of a canonical pandas frame as Arrow (what features and detectors read).

    ``inputs``/``outputs`` may be lists of dicts (JSON) or arrays of dicts (Delta/Spark via Arrow).
    """
    missing = [c for c in INPUT_COLUMNS if c not in df.columns]
    if missing:
        raise KeyError(f"score_frame needs canonical columns, missing: {missing}")
    arrays = []
    for f in _INPUT_SCHEMA:
        col = df[f.name]
        if pa.types.is_list(f.type):
            arrays.append(pa.array(col.to_numpy(dtype=object), type=f.type, from_pandas=True))
        else:
            arr = pa.Array.from_pandas(col)
            arrays.append(arr if arr.type == f.type else arr.cast(f.type))
    return pa.Table.from_arrays(arrays, schema=_INPUT_SCHEMA)


def _display_columns(df: pd.DataFrame) -> dict[str, Any]:
    """Transaction fields shown next to a score; nullable Int64 where the source may lack them."""
    n = len(df)
    out: dict[str, Any] = {}
    for col in TX_DISPLAY_COLUMNS:
        if col in df.columns:
            out[col] = pd.array(pd.to_numeric(df[col]).to_numpy(dtype=np.float64, na_value=np.nan)).astype(
                "Int64"
            )
        else:
            out[col] = pd.array([pd.NA] * n, dtype="Int64")
    fee = out["fee"].to_numpy(dtype=np.float64, na_value=np.nan)
    vsize = out["vsize"].to_numpy(dtype=np.float64, na_value=np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["fee_rate"] = np.where(vsize > 0, fee / vsize, np.nan)
    return out


def score_records(
    records: Iterable[Any], model: ChampionModel | None = None, *, explain: Explain = "all", **kwargs: Any
) -> list[dict[str, Any]]:
    """``score_frame`` for ``Transaction`` objects or canonical dicts, as JSON-ready dicts (API)."""
    rows = [r.model_dump() if hasattr(r, "model_dump") else dict(r) for r in records]
    out = score_frame(pd.DataFrame(rows), model, explain=explain, **kwargs)
    result = out.to_dict(orient="records")
    for r in result:
        r["first_seen"] = r["first_seen"].isoformat() if pd.notna(r["first_seen"]) else None
        r["scored_at"] = r["scored_at"].isoformat()
        r["reason"] = "; ".join(r["reasons"])
        for col in (*TX_DISPLAY_COLUMNS, "fee_rate", "mahalanobis"):
            v = r[col]
            r[col] = None if v is pd.NA or (isinstance(v, float) and np.isnan(v)) else v
    return result


def _empty() -> pd.DataFrame:
    return scored_arrow_schema().empty_table().to_pandas()


# --- process-wide champion cache (stream workers, API) ------------------------------------------------

_lock = threading.Lock()
_cache: dict[tuple[str, str, str], tuple[ChampionModel, float]] = {}


def cached_champion(settings: Settings | None = None, alias: str = "champion") -> ChampionModel:
    """The champion for this process; re-resolves the alias at most every ``model_reload_s`` seconds
    and reloads only when it points to another version. A registry outage or a version that fails to
    load (``registry.BundleRefused``: no or wrong digest) keeps the loaded model."""
    from btc_anomaly.model.registry import version_by_alias

    settings = settings or get_settings()
    key = (settings.mlflow_tracking_uri, settings.model_name, alias)
    with _lock:
        hit = _cache.get(key)
        now = time.monotonic()
        if hit is not None and now - hit[1] < settings.model_reload_s:
            return hit[0]
        if hit is not None:
            try:
                mv = version_by_alias(settings, alias)
            except Exception as exc:  # registry unreachable: keep scoring with what we have
                log.warning(
                    "cannot re-check %s@%s (%s); keeping v%s", settings.model_name, alias, exc, hit[0].version
                )
                _cache[key] = (hit[0], now)
                return hit[0]
            if mv is not None and str(mv.version) == hit[0].version:
                _cache[key] = (hit[0], now)
                return hit[0]
        try:
            model = load_champion(settings, alias)
        except Exception as exc:
            if hit is None:
                raise
            # A refused (digest) or broken version must not stop scoring: keep the loaded one, retry later.
            log.error("cannot load %s@%s (%s); keeping v%s", settings.model_name, alias, exc, hit[0].version)
            _cache[key] = (hit[0], now)
            return hit[0]
        if hit is not None:
            log.info("%s@%s moved v%s -> v%s", settings.model_name, alias, hit[0].version, model.version)
        _cache[key] = (model, now)
        return model


def map_in_pandas_scorer(
    tracking_uri: str | None = None,
    model_name: str | None = None,
    *,
    alias: str = "champion",
    explain: Explain = "anomalies",
    overrides: Mapping[str, Any] | None = None,
) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """A function for ``DataFrame.mapInPandas``: canonical rows in, ``scored_spark_schema()`` rows out.

    Only plain values are captured, so it pickles cheaply to the executors; each Python worker builds
    its own Settings and shares one cached champion across tasks.
    """
    values = dict(overrides or {})
    if tracking_uri:
        values["mlflow_tracking_uri"] = tracking_uri
    if model_name:
        values["model_name"] = model_name

    def score_batches(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        settings = Settings(**values)
        model = cached_champion(settings, alias)
        market = fee_market(settings)  # the API reads the same table the same way
        for pdf in batches:
            yield score_frame(pdf, model, explain=explain, settings=settings, market=market())

    return score_batches


def describe(model: ChampionModel) -> dict[str, Any]:
    """What the API's /model shows: name, version, thresholds, training window and metrics."""
    info = model.bundle.info
    return {
        "name": model.name,
        "version": model.version,
        "alias": model.alias,
        "run_id": model.run_id,
        "loaded_at": model.loaded_at,
        "thresholds": model.bundle.thresholds,
        "features": {k: d.feature_names for k, d in model.bundle.detectors.items()},
        "market_reference_fee_rate": model.bundle.market_reference,
        "trained_at": info.get("trained_at"),
        "params": info.get("params", {}),
        "metrics": info.get("metrics", {}),
    }


def top_reasons(scored: pd.DataFrame, n: int = 10) -> list[str]:
    """Human lines for the ``n`` highest scores of a ``score_frame`` result (reports, CLI)."""
    rows = scored.sort_values("anomaly_score", ascending=False).head(n)
    return [
        f"{r.anomaly_score:.3f} {'ANOMALY' if r.is_anomaly else 'normal '} {r.hash[:16]}… "
        f"({r.model_kind}): {'; '.join(r.reasons) or '-'}"
        for r in rows.itertuples()
    ]


__all__ = [
    "RISK_COLUMNS",
    "SCORED_COLUMNS",
    "ChampionModel",
    "cached_champion",
    "canonical_table",
    "describe",
    "load_champion",
    "map_in_pandas_scorer",
    "score_frame",
    "score_records",
    "scored_arrow_schema",
    "scored_spark_schema",
    "top_reasons",
]
