"""Training: a window of the ``transactions`` Delta table → features → two IsolationForests → MLflow.

Each run logs params, the data window and digest, row counts, anomaly rates, score quantiles, timings,
two PNGs and the model bundle (``bundle.py``) as one pyfunc with a named-column signature and an input
example; registers it as a new version of ``Settings.model_name`` with the bundle's digest
(``registry.log_bundle``: serving loads the bundle as data and checks it); points the ``challenger`` alias at
it; and (unless told not to) runs the promotion gate, which may move ``champion`` to it.

It also evaluates the new bundle on the labelled benchmark (``evaluate.py``) and logs that to the run: the
``bench.*`` metrics, ``plots/benchmark_pr.png``, ``benchmark.md``, and the headline numbers as version tags
(``bench.canonical.roc_auc``, ``bench.canonical.precision_at_50``, ``bench.summary.roc_auc``,
``bench.canonical.normal_flag_rate``). When the evaluation fails the run goes on (a warning, a
``bench.error`` tag) and the gate refuses the version with that reason.

The window is ``[since, until)`` on ``first_seen``. With ``Settings.model_train_window`` (e.g. ``24h``)
and no explicit ``since``, it ends at ``until`` or else at the newest transaction in the table, so a
replayed or paused stream still trains on its latest data rather than on an empty "last 24h".
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from btc_anomaly.config import Settings
from btc_anomaly.detectors.mahalanobis import MahalanobisModel
from btc_anomaly.features import (
    FEATURE_VERSION,
    FEATURES_FULL,
    FEATURES_STRUCTURAL,
    INPUT_COLUMNS,
    compute_features,
    market_fee_rates,
)
from btc_anomaly.model.bundle import KINDS, ModelBundle
from btc_anomaly.model.detector import KindDetector
from btc_anomaly.model.explain import FeatureStats
from btc_anomaly.model.registry import CHALLENGER, client, log_bundle, use_tracking, whoami
from btc_anomaly.schema import utc_times

log = logging.getLogger(__name__)

READ_COLUMNS = ["hash", "first_seen", "block_height", "is_coinbase", *INPUT_COLUMNS]
STATS_MAX_ROWS = 200_000  # quantiles for explanations; a sample this size pins the 99.9th percentile
PLOT_MAX_POINTS = 20_000
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> dt.timedelta:
    """``"30m"``, ``"2h"``, ``"7d"``, ``"45s"``, ``"1w"`` → timedelta."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30m, 2h, 7d)")
    return dt.timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])


def table_path(settings: Settings) -> Path:
    if settings.model_train_table is not None:
        return Path(settings.model_train_table)
    return settings.lake_table("transactions")


@dataclass
class TrainingData:
    frame: pd.DataFrame
    since: dt.datetime | None
    until: dt.datetime | None
    source: str
    table_version: int | None = None

    @property
    def digest(self) -> str:
        """sha256 of the sorted tx hashes: the same set of transactions gives the same digest."""
        h = hashlib.sha256()
        for tx in np.sort(self.frame["hash"].to_numpy(dtype=str)):
            h.update(tx.encode())
        return h.hexdigest()


@dataclass
class TrainResult:
    run_id: str
    version: str | None
    metrics: dict[str, float]
    params: dict[str, Any]
    bundle: ModelBundle
    decision: Any = None  # promotion.GateDecision when the gate ran
    timings: dict[str, float] = field(default_factory=dict)


# --- data -------------------------------------------------------------------------------------------


def _utc(ts: dt.datetime | None) -> dt.datetime | None:
    if ts is None:
        return None
    return ts.replace(tzinfo=dt.UTC) if ts.tzinfo is None else ts.astimezone(dt.UTC)


def _read_table(
    path: Path, columns: list[str], since: dt.datetime | None, until: dt.datetime | None
) -> pd.DataFrame:
    try:
        from btc_anomaly.processing.delta_reader import read_table
    except ImportError:  # the shared reader is optional for this module: fall back to deltalake directly
        read_table = None
    if read_table is not None:
        return read_table(str(path), columns=columns, since=since, until=until)
    import pyarrow as pa
    import pyarrow.dataset as ds
    from deltalake import DeltaTable

    dataset = DeltaTable(str(path)).to_pyarrow_dataset()
    expr = None
    ts = pa.timestamp("us", tz="UTC")
    if since is not None:
        expr = ds.field("first_seen") >= pa.scalar(since, ts)
    if until is not None:
        upper = ds.field("first_seen") < pa.scalar(until, ts)
        expr = upper if expr is None else expr & upper
    return dataset.to_table(columns=columns, filter=expr).to_pandas()


def read_training_data(
    settings: Settings,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    window: str | None = None,
) -> TrainingData:
    """Read ``[since, until)`` from the transactions table (see module doc for the window rules)."""
    from deltalake import DeltaTable

    path = table_path(settings)
    if not (path / "_delta_log").is_dir():
        raise FileNotFoundError(
            f"no Delta table at {path}: run the stream first, or set BTC_ANOMALY_MODEL_TRAIN_TABLE"
        )
    since, until = _utc(since), _utc(until)
    window = settings.model_train_window if window is None else window
    if since is None and window:
        end = until
        if end is None:
            stamps = _read_table(path, ["first_seen"], None, None)["first_seen"]
            end = (
                pd.Timestamp(stamps.max()).to_pydatetime() + dt.timedelta(microseconds=1)
                if len(stamps)
                else None
            )
        if end is not None:
            since, until = end - parse_duration(window), end
    frame = _read_table(path, READ_COLUMNS, since, until)
    if len(frame) > settings.model_train_max_rows:
        frame = frame.sort_values("first_seen", kind="stable").tail(settings.model_train_max_rows)
    frame = frame.reset_index(drop=True)
    return TrainingData(
        frame=frame, since=since, until=until, source=str(path), table_version=DeltaTable(str(path)).version()
    )


# --- fitting ----------------------------------------------------------------------------------------


def fit_bundle(
    features: pd.DataFrame,
    settings: Settings,
    market: np.ndarray | None = None,
    market_reference: float | None = None,
) -> tuple[ModelBundle, dict[str, float]]:
    """Both detectors from one feature frame: full on rows with prevouts, structural on every row.

    ``market`` is each row's fee market (``features.market_fee_rates`` of the canonical rows, sat/vB);
    without it every row is read against the window's overall median fee rate. ``market_reference`` is
    the market the bundle falls back to when scoring without a fresher one (default: the median of
    ``market``).
    """
    full_mask = features[FEATURES_FULL].notna().all(axis=1).to_numpy()
    if not full_mask.any():
        raise ValueError(
            "no transaction in the window has prevouts (fee/input value): cannot fit the full model"
        )
    if market is None:
        rates = np.expm1(features["log_fee_rate"].to_numpy(dtype=np.float64))
        market = np.full(len(features), float(np.nanmedian(rates)))
    market = np.asarray(market, dtype=np.float64)
    reference = float(np.nanmedian(market)) if market_reference is None else float(market_reference)
    data = {"full": features.loc[full_mask, FEATURES_FULL], "structural": features[FEATURES_STRUCTURAL]}
    markets = {"full": market[full_mask], "structural": None}
    detectors: dict[str, KindDetector] = {}
    stats: dict[str, FeatureStats] = {}
    sk: dict[str, Any] = {}
    mahalanobis: dict[str, MahalanobisModel] = {}
    metrics: dict[str, float] = {"rows": float(len(features)), "rows_full": float(full_mask.sum())}
    for kind in KINDS:
        X = data[kind]
        t0 = time.perf_counter()
        det, model, scores = KindDetector.fit(
            X.to_numpy(dtype=np.float64),
            list(X.columns),
            markets[kind],
            contamination=settings.iforest_contamination,
            n_estimators=settings.iforest_n_estimators,
            max_samples=settings.iforest_max_samples,
            random_state=settings.iforest_random_state,
            backend=settings.scorer_backend,
        )
        metrics[f"fit_seconds_{kind}"] = time.perf_counter() - t0
        detectors[kind], sk[kind] = det, model
        sample = X if len(X) <= STATS_MAX_ROWS else X.sample(STATS_MAX_ROWS, random_state=0)
        stats[kind] = FeatureStats.from_frame(sample, extremes=X)
        metrics[f"anomaly_rate_{kind}"] = float((scores > det.threshold).mean())
        metrics[f"threshold_{kind}"] = det.threshold
        for q in (50, 90, 99, 99.9):
            metrics[f"score_p{q:g}_{kind}".replace(".", "_")] = float(np.percentile(scores, q))
        metrics[f"score_max_{kind}"] = float(scores.max())
        t0 = time.perf_counter()
        # Same rows and features as the forest, so the distance means "unlike this forest's training data".
        forest_X = X[det.forest_feature_names]
        mahalanobis[kind] = MahalanobisModel.fit(forest_X.to_numpy(dtype=np.float64), list(forest_X.columns))
        metrics[f"mahalanobis_seconds_{kind}"] = time.perf_counter() - t0
        metrics[f"mahalanobis_q99_{kind}"] = mahalanobis[kind].q99
        metrics[f"mahalanobis_q999_{kind}"] = mahalanobis[kind].q999
    bundle = ModelBundle(
        detectors=detectors,
        stats=stats,
        sklearn_models=sk,
        mahalanobis=mahalanobis,
        market_reference=reference,
    )
    metrics["market_reference_fee_rate"] = reference
    routed = bundle.score_features(features, market)
    metrics["anomaly_rate"] = float(routed["is_anomaly"].mean())
    return bundle, metrics


def fit_transactions(frame: pd.DataFrame, settings: Settings) -> tuple[ModelBundle, dict[str, float]]:
    """``fit_bundle`` on canonical transactions: their features, each row's fee market (its block or
    window) and, as the bundle's reference market, the market of the newest transaction."""
    features = compute_features(frame)
    market = market_fee_rates(frame)
    if "first_seen" in frame.columns and len(frame):
        newest = int(utc_times(frame["first_seen"]).to_numpy().argmax())
        reference: float | None = float(market[newest])
    else:
        reference = None
    return fit_bundle(features, settings, market, market_reference=reference)


# --- plots ------------------------------------------------------------------------------------------


def _plots(features: pd.DataFrame, scored: pd.DataFrame) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs: dict[str, Any] = {}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for kind, color in (("full", "tab:blue"), ("structural", "tab:orange")):
        s = scored.loc[scored["model_kind"] == kind, "anomaly_score"]
        if len(s):
            ax.hist(s, bins=80, alpha=0.6, color=color, label=f"{kind} ({len(s):,} tx)")
            ax.axvline(scored.loc[scored["model_kind"] == kind, "threshold"].iloc[0], color=color, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("anomaly_score (dashed: threshold)")
    ax.set_ylabel("transactions")
    ax.set_title("Training-window anomaly scores")
    ax.legend()
    fig.tight_layout()
    figs["plots/score_histogram.png"] = fig

    full = scored["model_kind"] == "full"
    fee_rate = np.expm1(features.loc[full, "log_fee_rate"].to_numpy())
    value_btc = np.expm1(features.loc[full, "log_output_value"].to_numpy()) / 1e8
    anomalous = scored.loc[full, "is_anomaly"].to_numpy()
    rng = np.random.default_rng(0)
    normal_idx = np.flatnonzero(~anomalous)
    if len(normal_idx) > PLOT_MAX_POINTS:
        normal_idx = rng.choice(normal_idx, PLOT_MAX_POINTS, replace=False)
    fig, ax = plt.subplots(figsize=(8, 6))
    floor_rate, floor_value = 0.1, 1e-8  # log axes: zero fees/values drawn at the floor
    ax.scatter(
        np.maximum(fee_rate[normal_idx], floor_rate),
        np.maximum(value_btc[normal_idx], floor_value),
        s=3,
        c="0.6",
        alpha=0.5,
        label="normal",
        rasterized=True,
    )
    ax.scatter(
        np.maximum(fee_rate[anomalous], floor_rate),
        np.maximum(value_btc[anomalous], floor_value),
        s=14,
        c="tab:red",
        label=f"anomaly ({int(anomalous.sum()):,})",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("fee rate (sat/vB)")
    ax.set_ylabel("output value (BTC)")
    ax.set_title("Fee rate vs value (full model)")
    ax.legend()
    fig.tight_layout()
    figs["plots/fee_rate_vs_value.png"] = fig
    return figs


# --- the run ----------------------------------------------------------------------------------------


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("mlflow", "numpy", "pandas", "pyarrow", "scikit-learn", "skops", "numba"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            continue
    return reqs


def train(
    settings: Settings,
    *,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    window: str | None = None,
    data: TrainingData | None = None,
    promote: bool = True,
    decided_by: str | None = None,
    progress: bool | None = None,
) -> TrainResult:
    """Read, fit, log, register as ``challenger`` and (``promote``) run the promotion gate."""
    import mlflow
    from mlflow.models import infer_signature
    from tqdm.auto import tqdm

    timings: dict[str, float] = {}
    # disable=None: tqdm shows the bar only on a terminal.
    bar = tqdm(total=6, desc="train", unit="step", disable=None if progress is None else not progress)
    t_all = t0 = time.perf_counter()

    bar.set_postfix_str("read")
    if data is None:
        data = read_training_data(settings, since=since, until=until, window=window)
    if data.frame.empty:
        bar.close()
        raise ValueError(
            f"no transactions in the training window [{data.since}, {data.until}) of {data.source}"
        )
    timings["read_seconds"] = time.perf_counter() - t0
    bar.update()

    bar.set_postfix_str("features")
    t0 = time.perf_counter()
    features = compute_features(data.frame)
    timings["features_seconds"] = time.perf_counter() - t0
    bar.update()

    bar.set_postfix_str("fit")
    t0 = time.perf_counter()
    market = market_fee_rates(data.frame)
    newest = int(utc_times(data.frame["first_seen"]).to_numpy().argmax())
    bundle, metrics = fit_bundle(features, settings, market, market_reference=float(market[newest]))
    timings["fit_seconds"] = time.perf_counter() - t0
    bar.update()

    first_seen = pd.to_datetime(data.frame["first_seen"], utc=True)
    window_start = data.since or first_seen.min().to_pydatetime()
    window_end = data.until or first_seen.max().to_pydatetime()
    digest = data.digest
    params: dict[str, Any] = {
        "n_estimators": settings.iforest_n_estimators,
        "max_samples": settings.iforest_max_samples,
        "contamination": settings.iforest_contamination,
        "random_state": settings.iforest_random_state,
        "feature_version": FEATURE_VERSION,
        "n_features_full": len(FEATURES_FULL),
        "n_features_structural": len(FEATURES_STRUCTURAL),
        "window_start": window_start.isoformat(),
        "window_end": window_end.isoformat(),
        "first_seen_min": first_seen.min().isoformat(),
        "first_seen_max": first_seen.max().isoformat(),
        "data_source": data.source,
        "data_table_version": data.table_version,
        "data_digest": digest,
    }
    bundle.info = {
        "trained_at": dt.datetime.now(dt.UTC).isoformat(),
        "params": params,
        "metrics": metrics,
    }

    bar.set_postfix_str("benchmark")
    t0 = time.perf_counter()
    report, bench_error = _benchmark(bundle, settings)
    timings["benchmark_seconds"] = time.perf_counter() - t0

    bar.set_postfix_str("log")
    t0 = time.perf_counter()
    use_tracking(settings)
    mlflow.set_experiment(settings.mlflow_experiment)
    scored = bundle.score_features(features, market)
    with mlflow.start_run(run_name=f"train-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}") as run:
        run_id = run.info.run_id
        bundle.info["run_id"] = run_id
        mlflow.log_params(params)
        mlflow.set_tags({"feature_version": str(FEATURE_VERSION), "trained_by": decided_by or whoami()})
        with warnings.catch_warnings():
            # A local path matches two equivalent MLflow source classes; it warns and picks one.
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(features, source=data.source, name="transactions_features")
        mlflow.log_input(dataset, context="training")
        for name, fig in _plots(features, scored).items():
            mlflow.log_figure(fig, name)
        if report is not None:
            mlflow.log_figure(report.pr_figure(), "plots/benchmark_pr.png")
            mlflow.log_text(report.table(), "benchmark.md")
        else:
            mlflow.set_tag("bench.error", bench_error[:5000])
        import matplotlib.pyplot as plt

        plt.close("all")
        example = _input_example(features)
        signature = infer_signature(example, bundle.score_features(example))
        with tempfile.TemporaryDirectory(prefix="btc-anomaly-bundle-") as tmp:
            bundle_dir = bundle.save(Path(tmp) / "bundle")
            info = log_bundle(
                settings,
                bundle_dir,
                signature=signature,
                input_example=example,
                pip_requirements=_pip_requirements(),
            )
        # Metrics after the model: MLflow's log_model reads the history of every metric the run already
        # has, one request each (hundreds for the benchmark report: minutes against a loaded server).
        if report is not None:
            mlflow.log_metrics(report.flat_metrics())
        timings["log_seconds"] = time.perf_counter() - t0
        timings["total_seconds"] = time.perf_counter() - t_all
        mlflow.log_metrics({**metrics, **timings})
    bar.update()

    bar.set_postfix_str("register")
    version = str(info.registered_model_version)
    c = client(settings)
    tags = {
        "run_id": run_id,
        "feature_version": str(FEATURE_VERSION),
        "train.rows": str(int(metrics["rows"])),
        "train.rows_full": str(int(metrics["rows_full"])),
        "train.window_start": params["window_start"],
        "train.window_end": params["window_end"],
        "train.data_digest": digest,
        "train.contamination": str(settings.iforest_contamination),
        "train.anomaly_rate_full": f"{metrics['anomaly_rate_full']:.6f}",
        "train.anomaly_rate_structural": f"{metrics['anomaly_rate_structural']:.6f}",
    }
    if report is not None:
        tags.update({k: f"{v:.6f}" for k, v in report.headline().items() if np.isfinite(v)})
    else:
        tags["bench.error"] = bench_error[:5000]
    for k, v in tags.items():
        c.set_model_version_tag(settings.model_name, version, k, v)
    c.update_model_version(
        settings.model_name,
        version,
        description=(
            f"Trained {bundle.info['trained_at']} by {decided_by or whoami()} on {int(metrics['rows']):,} "
            f"transactions ({int(metrics['rows_full']):,} with prevouts), window {params['window_start']} .. "
            f"{params['window_end']}, digest {digest[:12]}, run {run_id}."
        ),
    )
    rm = c.get_registered_model(settings.model_name)
    if not rm.description:
        c.update_registered_model(
            settings.model_name,
            description=(
                "btc-anomaly Isolation Forest bundle: a full forest (FEATURES_FULL, txs with prevouts) and a "
                "structural forest (FEATURES_STRUCTURAL, everything else) in one pyfunc. Aliases: challenger = "
                "latest trained, champion = passed the promotion gate."
            ),
        )
    c.set_registered_model_alias(settings.model_name, CHALLENGER, version)
    bar.update()

    decision = None
    if promote:
        from btc_anomaly.model.promotion import promote as run_gate

        bar.set_postfix_str("promotion gate")
        decision = run_gate(settings, version=version, decided_by=decided_by)
    bar.update()
    bar.close()
    log.info(
        "trained %s v%s on %d rows in %.1fs (anomaly rate %.4f)%s",
        settings.model_name,
        version,
        int(metrics["rows"]),
        timings["total_seconds"],
        metrics["anomaly_rate"],
        f"; gate: {decision.summary}" if decision is not None else "",
    )
    return TrainResult(
        run_id=run_id,
        version=version,
        metrics=metrics,
        params=params,
        bundle=bundle,
        decision=decision,
        timings=timings,
    )


def _benchmark(bundle: ModelBundle, settings: Settings) -> tuple[Any, str]:
    """The bundle's ``EvalReport`` on the labelled benchmark, or (None, why) when it cannot be evaluated:
    training goes on, and the promotion gate refuses the version with the same reason."""
    from btc_anomaly.model.evaluate import bundle_scorer, evaluate

    try:
        return evaluate(bundle_scorer(bundle, settings), name="challenger"), ""
    except Exception as exc:
        log.warning("benchmark evaluation failed (the promotion gate will refuse this version): %s", exc)
        return None, f"{type(exc).__name__}: {exc}"


def _input_example(features: pd.DataFrame) -> pd.DataFrame:
    """A few real rows, including one without prevouts when the window has one."""
    full = features[FEATURES_FULL].notna().all(axis=1)
    rows = list(features.index[full][:4])
    rows += list(features.index[~full][:1])
    return features.loc[rows, FEATURES_FULL].reset_index(drop=True)


def run_every(every: str, fn: Any, *, stop: Any = None) -> None:
    """Call ``fn()`` now and then every ``every`` (e.g. ``"30m"``), measured start to start.

    A failed run is logged and retried at the next tick; ``stop`` (a ``threading.Event``) ends the loop.
    """
    import threading

    period = parse_duration(every).total_seconds()
    stop = stop or threading.Event()
    while not stop.is_set():
        started = time.monotonic()
        try:
            fn()
        except Exception:
            log.exception("scheduled training failed; next attempt in %s", every)
        stop.wait(max(0.0, period - (time.monotonic() - started)))


class TrainingStopped(BaseException):
    """A training cut short by SIGTERM/SIGINT (a BaseException, so no ``except Exception``
    on the way takes it for a failed run)."""


def run_until_signalled(fn: Any, every: str | None = None) -> int | None:
    """`btc-anomaly train`: ``fn()`` once (``every`` None) or ``run_every`` until SIGTERM or SIGINT;
    returns the signal that stopped it, None when it was not stopped.

    A signal between runs ends the loop. A signal during a run cuts it short (TrainingStopped through
    it: MLflow marks its run FAILED on the way out, instead of leaving it RUNNING as a process killed by
    the default handler does) rather than let it go on for minutes against a registry that stops too
    (`make demo`'s Ctrl-C stops every process at once); from then on MLflow calls fail fast instead of
    retrying. Nothing is lost: the next start trains on the lake again."""
    import os
    import signal
    import threading

    stop = threading.Event()
    in_run = [False]
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        if stop.is_set():
            log.info("signal %d: already stopping", signum)
            return
        stop.set()
        received.append(signum)
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "5"
        log.info("signal %d: stopping%s", signum, " the running training" if in_run[0] else "")
        if in_run[0]:
            in_run[0] = False
            raise TrainingStopped(signum)

    def guarded() -> None:
        in_run[0] = True
        try:
            fn()
        except Exception:
            if not stop.is_set():
                raise
            # What failed on the way out of a stopped run (the registry stopping too): not a failure.
            raise TrainingStopped from None
        finally:
            in_run[0] = False

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if every is None:
            guarded()
        else:
            run_every(every, guarded, stop=stop)
    except TrainingStopped:
        log.info(
            "training stopped before it finished (its MLflow run is marked FAILED); the next run retrains"
        )
    return received[0] if received else None
