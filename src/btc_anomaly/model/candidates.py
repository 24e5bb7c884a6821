"""Candidate detectors side by side on the benchmark (``btc-anomaly evaluate --compare``).

Every candidate is trained on ``data/sample/transactions.jsonl.gz`` and scored by ``evaluate.evaluate``
along the same three paths as the production model:

* ``ours``: ``model.train.fit_bundle`` on the sample as ``train`` fits it (``fit_ours``), scored by
  ``evaluate.bundle_scorer`` (the production detector, whatever it is); a second row, ``ours (risk_score)``,
  ranks by the risk score instead of the model's score;
* ``forest, same features``: sklearn ``IsolationForest`` defaults on ``FEATURES_FULL``;
* ``forest, 8 raw fields``: ``IsolationForest`` defaults on size, weight, fee, inputs_count,
  outputs_count, input_value, output_value, fee/size and fee/weight (the project's original design);
* PyOD ``ECOD``, ``COPOD``, ``HBOS`` and ``IForest`` (defaults) on ``FEATURES_FULL``.

Like the production bundle, each baseline is a pair: one model on the full column set for rows with
prevouts and one on the structural subset (``FEATURES_STRUCTURAL``; for the 8 raw fields: size, weight,
counts and output value) for rows without (the raw path). On the summary path a feature-based baseline
gets the features the 8 fields determine and the training medians for the rest (what the API does for
the production model); the 8-raw-fields forest sees exactly its inputs there. Every threshold is the
training-score quantile at ``CONTAMINATION`` (0.01), flagged = score above it. ECOD and COPOD score a
batch against their training data plus that batch (PyOD's implementation), the others row by row.

Two protocols:

* ``holdout``: train on the whole sample, evaluate on the benchmark (its canonical normals are held out
  of the sample);
* ``time``: train on the sample's rows with ``block_height < TIME_SPLIT_BLOCK`` (692,261), evaluate on the
  benchmark rows whose ``source_block`` is 692,261 plus the sample's 692,261 rows as extra normals (on
  the raw path with their prevouts removed, as a decode without lookups leaves them). The raw split holds
  no anomaly of block 692,261, so this protocol has no raw ROC-AUC ("—").
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from btc_anomaly.config import PROJECT_ROOT, Settings
from btc_anomaly.features import FEATURES_FULL, FEATURES_STRUCTURAL, compute_features
from btc_anomaly.model.evaluate import (
    SUMMARY_FIELDS,
    EvalReport,
    ScoredRows,
    Scorer,
    ScoringPath,
    bundle_scorer,
    evaluate,
    load_benchmark,
)
from btc_anomaly.schema import utc_times

SAMPLE = PROJECT_ROOT / "data" / "sample" / "transactions.jsonl.gz"
CONTAMINATION = 0.01
TIME_SPLIT_BLOCK = 692_261
PROTOCOLS = ("holdout", "time")
# The original design's 8 fields (less the hash) and its two fee ratios.
RAW8_FULL = [*SUMMARY_FIELDS[1:], "fee_per_byte", "fee_per_weight"]
RAW8_STRUCTURAL = ["size", "weight", "inputs_count", "outputs_count", "output_value"]


def load_sample() -> pd.DataFrame:
    """The bundled sample as canonical rows (file order)."""
    import gzip

    import orjson

    lines = gzip.decompress(SAMPLE.read_bytes()).splitlines()
    return pd.DataFrame([orjson.loads(line) for line in lines if line.strip()])


# --- column sets ------------------------------------------------------------------------------------------


def raw8_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """The original design's inputs from canonical rows (``input_count``...) or 8-field rows."""
    n_in = frame["inputs_count"] if "inputs_count" in frame else frame["input_count"]
    n_out = frame["outputs_count"] if "outputs_count" in frame else frame["output_count"]
    fee = pd.to_numeric(frame["fee"]).astype(np.float64)
    size = frame["size"].astype(np.float64)
    weight = frame["weight"].astype(np.float64)
    return pd.DataFrame(
        {
            "size": size,
            "weight": weight,
            "fee": fee,
            "inputs_count": n_in.astype(np.float64),
            "outputs_count": n_out.astype(np.float64),
            "input_value": pd.to_numeric(frame["input_value"]).astype(np.float64),
            "output_value": frame["output_value"].astype(np.float64),
            "fee_per_byte": fee / size.where(size > 0),
            "fee_per_weight": fee / weight.where(weight > 0),
        }
    ).reset_index(drop=True)


def _summary_features(frame: pd.DataFrame) -> pd.DataFrame:
    """Features of 8-field rows before imputation (what the API computes from them)."""
    from btc_anomaly.model.evaluate import summary_table_of

    table = summary_table_of(frame)
    return compute_features(table)


# --- detectors --------------------------------------------------------------------------------------------


@dataclass
class Detector:
    """One unsupervised model on named columns; higher ``score`` = more anomalous."""

    make: Callable[[], Any]
    columns: list[str]
    model: Any = None
    threshold: float = math.nan
    medians: pd.Series | None = None

    def fit(self, X: pd.DataFrame) -> Detector:
        X = X[self.columns]
        self.model = self.make().fit(X.to_numpy(dtype=np.float64))
        self.threshold = float(np.quantile(self.score(X), 1.0 - CONTAMINATION))
        self.medians = X.median()
        return self

    def score(self, X: pd.DataFrame) -> np.ndarray:
        X = X[self.columns]
        if self.medians is not None and X.isna().to_numpy().any():
            X = X.fillna(self.medians)  # a value no feature can take (e.g. log of a negative): the median
        data = X.to_numpy(dtype=np.float64)
        if hasattr(self.model, "decision_scores_"):  # PyOD: decision_function, higher = outlier
            return np.asarray(self.model.decision_function(data), dtype=np.float64)
        return -np.asarray(self.model.score_samples(data), dtype=np.float64)  # sklearn IsolationForest


@dataclass
class Baseline:
    """A full + structural pair of detectors on one column family (``features`` or ``raw8``)."""

    name: str
    family: str
    make: Callable[[int], Any]
    seed: int = 0
    full: Detector | None = field(default=None, repr=False)
    structural: Detector | None = field(default=None, repr=False)

    def _columns(self) -> tuple[list[str], list[str]]:
        if self.family == "raw8":
            return RAW8_FULL, RAW8_STRUCTURAL
        return FEATURES_FULL, FEATURES_STRUCTURAL

    def _matrix(self, frame: pd.DataFrame, path: ScoringPath) -> pd.DataFrame:
        if self.family == "raw8":
            return raw8_columns(frame)
        if path == "summary":
            from btc_anomaly.model.core import SUMMARY_IMPUTED

            X = _summary_features(frame)
            full = self._known(X)
            for kind, mask, det in (("full", full, self.full), ("structural", ~full, self.structural)):
                names = SUMMARY_IMPUTED[kind]
                if mask.any() and det is not None and det.medians is not None:
                    X.loc[mask, names] = det.medians[names].to_numpy()
            return X
        return compute_features(frame).reset_index(drop=True)

    def _known(self, X: pd.DataFrame) -> np.ndarray:
        """Rows for the full detector: every column the structural one lacks (the prevout ones) known."""
        full_cols, structural_cols = self._columns()
        extra = [c for c in full_cols if c not in structural_cols]
        return X[extra].notna().all(axis=1).to_numpy()

    def fit(self, train: pd.DataFrame) -> Baseline:
        full_cols, structural_cols = self._columns()
        X = raw8_columns(train) if self.family == "raw8" else compute_features(train).reset_index(drop=True)
        known = self._known(X)
        self.full = Detector(lambda: self.make(self.seed), full_cols).fit(X[known])
        self.structural = Detector(lambda: self.make(self.seed), structural_cols).fit(X)
        return self

    def scorer(self) -> Scorer:
        def score(frame: pd.DataFrame, path: ScoringPath) -> ScoredRows:
            assert self.full is not None and self.structural is not None
            X = self._matrix(frame, path)
            known = self._known(X)
            s = np.empty(len(X))
            flags = np.zeros(len(X), dtype=bool)
            for det, mask in ((self.full, known), (self.structural, ~known)):
                if mask.any():
                    s[mask] = det.score(X[mask])
                    flags[mask] = s[mask] > det.threshold
            return ScoredRows(anomaly_score=s, is_anomaly=flags)

        return score


def _sk_forest(seed: int) -> Any:
    from sklearn.ensemble import IsolationForest

    return IsolationForest(contamination=CONTAMINATION, random_state=seed)


def _pyod(name: str) -> Callable[[int], Any]:
    def make(seed: int) -> Any:
        if name == "ECOD":
            from pyod.models.ecod import ECOD

            return ECOD(contamination=CONTAMINATION)
        if name == "COPOD":
            from pyod.models.copod import COPOD

            return COPOD(contamination=CONTAMINATION)
        if name == "HBOS":
            from pyod.models.hbos import HBOS

            return HBOS(contamination=CONTAMINATION)
        from pyod.models.iforest import IForest

        return IForest(contamination=CONTAMINATION, random_state=seed)

    return make


def baselines(seed: int = 0) -> list[Baseline]:
    return [
        Baseline("forest, same features", "features", _sk_forest, seed),
        Baseline("forest, 8 raw fields", "raw8", _sk_forest, seed),
        Baseline("PyOD ECOD", "features", _pyod("ECOD"), seed),
        Baseline("PyOD COPOD", "features", _pyod("COPOD"), seed),
        Baseline("PyOD HBOS", "features", _pyod("HBOS"), seed),
        Baseline("PyOD IForest", "features", _pyod("IForest"), seed),
    ]


# --- protocols --------------------------------------------------------------------------------------------


def as_raw(frame: pd.DataFrame) -> pd.DataFrame:
    """Canonical rows as a decode without prevout lookups leaves them: fee, input value and inputs unknown."""
    out = frame.copy()
    out["fee"] = pd.array([None] * len(out), dtype="Int64")
    out["input_value"] = pd.array([None] * len(out), dtype="Int64")
    out["inputs"] = [
        [{"address": None, "value": None, "script_type": "unknown"} for _ in ins] for ins in out["inputs"]
    ]
    return out


def protocol_data(
    protocol: str, sample: pd.DataFrame, benchmark: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training rows, benchmark rows) of a protocol."""
    if protocol == "holdout":
        return sample, benchmark
    if protocol != "time":
        raise ValueError(f"unknown protocol {protocol!r}: use one of {PROTOCOLS}")
    heights = pd.to_numeric(sample["block_height"])
    train = sample[heights < TIME_SPLIT_BLOCK].reset_index(drop=True)
    extra = sample[heights == TIME_SPLIT_BLOCK].reset_index(drop=True)
    meta = {
        "label": 0,
        "archetype": "normal",
        "source_txid": extra["hash"],
        "source_block": TIME_SPLIT_BLOCK,
        "change": "none (sample row)",
        "hex": "",
    }
    canonical = extra.assign(split="canonical", id=[f"sample-{i}" for i in range(len(extra))], **meta)
    raw = as_raw(extra).assign(split="raw", id=[f"sample-raw-{i}" for i in range(len(extra))], **meta)
    held = benchmark[(benchmark["source_block"] == TIME_SPLIT_BLOCK).fillna(False).astype(bool)]
    # Records, not pd.concat: the raw rows' all-null fee columns would make concat guess dtypes.
    rows = pd.DataFrame([r for f in (held, canonical, raw) for r in f.to_dict("records")])
    rows["label"] = rows["label"].astype(np.int8)
    rows["source_block"] = rows["source_block"].astype("Int64")
    return train, rows


# --- the comparison ---------------------------------------------------------------------------------------


# Comparison columns: label → (path, metric).
COMPARED: dict[str, tuple[str, str]] = {
    "canonical ROC-AUC": ("canonical", "roc_auc"),
    "PR-AUC": ("canonical", "pr_auc"),
    "P@50": ("canonical", "precision_at_50"),
    "P@100": ("canonical", "precision_at_100"),
    "normal flag rate": ("canonical", "normal_flag_rate"),
    "recall": ("canonical", "recall"),
    "8-field ROC-AUC": ("summary", "roc_auc"),
    "raw ROC-AUC": ("raw", "roc_auc"),
}


@dataclass
class Row:
    protocol: str
    candidate: str
    report: EvalReport
    fit_seconds: float
    use_risk: bool = False
    train_rows: int = 0


@dataclass
class Comparison:
    rows: list[Row]
    seconds: float
    seed: int

    def records(self) -> list[dict[str, Any]]:
        """One dict per protocol and candidate: the table's numbers (NaN where a metric does not apply)."""
        out = []
        for r in self.rows:
            pre = "risk_" if r.use_risk else ""
            out.append(
                {
                    "protocol": r.protocol,
                    "detector": r.candidate,
                    "train rows": r.train_rows,
                    **{
                        label: r.report.metric(f"{path}.{pre}{name}")
                        for label, (path, name) in COMPARED.items()
                    },
                    "reason agreement": math.nan
                    if r.use_risk
                    else r.report.metric("canonical.reason_agreement"),
                    "fit s": r.fit_seconds,
                }
            )
        return out

    def table(self) -> str:
        """One markdown row per protocol and candidate (— where a metric does not apply)."""
        records = self.records()
        columns = list(records[0]) if records else []
        lines = ["| " + " | ".join(columns) + " |", "|---|---|" + "---:|" * (len(columns) - 2)]
        for rec in records:
            cells = []
            for c in columns:
                v = rec[c]
                if isinstance(v, str):
                    cells.append(v)
                elif isinstance(v, int):
                    cells.append(f"{v:,}")
                elif not math.isfinite(v):
                    cells.append("—")
                else:
                    cells.append(
                        f"{v:.1f}" if c == "fit s" else f"{v:.2f}" if c.startswith("P@") else f"{v:.3f}"
                    )
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def fit_ours(train: pd.DataFrame, settings: Settings) -> Any:
    """The production bundle of ``train`` rows, fit as ``model.train.train`` fits it: features, each row's
    fee market (its block's median fee rate), the newest row's market as the bundle's reference."""
    from btc_anomaly.features import market_fee_rates
    from btc_anomaly.model.train import fit_bundle

    train = train.reset_index(drop=True)
    market = market_fee_rates(train)
    newest = utc_times(train["first_seen"]).to_numpy().argmax()
    bundle, _ = fit_bundle(compute_features(train), settings, market, market_reference=float(market[newest]))
    return bundle


def compare(
    *,
    seed: int = 0,
    protocols: tuple[str, ...] = PROTOCOLS,
    benchmark: pd.DataFrame | None = None,
    settings: Settings | None = None,
    sample: pd.DataFrame | None = None,
    progress: Callable[[str], None] | None = None,
) -> Comparison:
    """Train every candidate under each protocol and evaluate it (see the module doc)."""
    t_all = time.perf_counter()
    settings = (settings or Settings()).model_copy(
        update={"iforest_contamination": CONTAMINATION, "iforest_random_state": seed}
    )
    sample = load_sample() if sample is None else sample
    benchmark = load_benchmark() if benchmark is None else benchmark
    rows: list[Row] = []
    for protocol in protocols:
        train, bench = protocol_data(protocol, sample, benchmark)
        t0 = time.perf_counter()
        bundle = fit_ours(train, settings)
        fit_s = time.perf_counter() - t0
        report = evaluate(bundle_scorer(bundle, settings), bench, name="ours")
        rows.append(Row(protocol, "ours", report, fit_s, train_rows=len(train)))
        rows.append(Row(protocol, "ours (risk_score)", report, fit_s, use_risk=True, train_rows=len(train)))
        if progress:
            progress(f"{protocol}: ours")
        for base in baselines(seed):
            t0 = time.perf_counter()
            base.fit(train)
            fit_s = time.perf_counter() - t0
            report = evaluate(base.scorer(), bench, name=base.name)
            rows.append(Row(protocol, base.name, report, fit_s, train_rows=len(train)))
            if progress:
                progress(f"{protocol}: {base.name}")
    return Comparison(rows=rows, seconds=time.perf_counter() - t_all, seed=seed)


__all__ = ["CONTAMINATION", "PROTOCOLS", "TIME_SPLIT_BLOCK", "Comparison", "baselines", "compare"]
