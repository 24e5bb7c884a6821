"""The labelled benchmark: how well a detector separates known anomalies from real normal transactions.

The benchmark (``resources/benchmark.jsonl.gz``, built by ``scripts/build_benchmark.py``) holds one JSON
object per line: ``id``, ``split`` (``canonical``: prevouts known, fee known; ``raw``: what /predict/raw
decodes without lookups, ``fee``/``input_value`` null), ``label`` (1 = anomaly), ``archetype`` (``normal``,
``fee_overpayment``, ``dust_fanout``, ``past_range_<feature>``, ...), ``source_txid``, ``source_block``,
``change`` (what was done to the source transaction), ``tx`` (a canonical ``Transaction``) and ``hex``.
The canonical normals are real transactions held out of ``data/sample`` (never trained on).

``evaluate(scorer)`` scores it along three paths, each the way a production caller sends transactions:

* ``canonical``: the canonical split as full canonical transactions (the stream, /predict canonical bodies);
* ``summary``: the same rows reduced to the original 8 fields (``SUMMARY_FIELDS``), as /predict's
  8-field body (``to_summary``);
* ``raw``: the raw split (fee unknown; /predict/raw without prevout lookups).

A scorer is ``scorer(frame, path) -> ScoredRows``: ``frame`` holds the canonical columns (``canonical``,
``raw``) or the 8 summary columns (``summary``), plus ``market_fee_rate``: the median fee rate of the
row's block (``features.market_fee_rates``, what the trainer reads its rows against; the stream and the
API pass the live market the same way). ``bundle_scorer(bundle)`` is the production model's.

Metrics per path, for ``anomaly_score`` and for ``risk_score`` (sklearn.metrics; label 1 = positive):

* ``roc_auc``, ``pr_auc`` (average precision);
* ``precision_at_50`` / ``_100``: anomalies among the 50 / 100 highest scores (ties: benchmark order);
* ``normal_flag_rate``: share of label-0 rows flagged; ``recall``: share of label-1 rows flagged. Flagged
  is ``is_anomaly`` (the model's threshold) for the anomaly score and ``risk_score >= RISK_FLAG_AT``
  (severity high or severe) for the risk score;
* per archetype: ROC-AUC of that archetype's anomalies against every normal of the path, and recall;
* ``reason_agreement``: among the anomalies whose archetype has expected features available on the path
  (``EXPECTED_FEATURES``; ``past_range_<feature>`` expects ``<feature>``), the share whose ``top_features``
  name at least one of them (``past_range_fee_rate`` expects ``log_fee_rate``). Prevout features are not
  available on the raw path.

Everything is deterministic: the benchmark's row order is fixed and so are the metrics.
"""

from __future__ import annotations

import gzip
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import orjson
import pandas as pd

from btc_anomaly.features import FEATURES_FULL, FEATURES_STRUCTURAL, SPECS

if TYPE_CHECKING:
    from btc_anomaly.config import Settings
    from btc_anomaly.model.bundle import ModelBundle

ScoringPath = Literal["canonical", "summary", "raw"]
PATHS: tuple[ScoringPath, ...] = ("canonical", "summary", "raw")
BENCHMARK_FILE = "benchmark.jsonl.gz"
META_COLUMNS = ("id", "split", "label", "archetype", "source_txid", "source_block", "change", "hex")
# The original /predict body: what the "summary" path keeps of a transaction.
SUMMARY_FIELDS = (
    "hash",
    "size",
    "weight",
    "fee",
    "inputs_count",
    "outputs_count",
    "input_value",
    "output_value",
)
PRECISION_AT = (50, 100)
RISK_FLAG_AT = 50.0  # detectors.risk.SEVERITY_BANDS[1]: "high" and "severe" count as flagged
SCORES = ("anomaly_score", "risk_score")
# Context column next to a path's rows: the fee market (sat/vB) of the row's block, as the stream and the
# API pass the current one to the scoring core. Not a transaction field; scorers may ignore it.
MARKET_COLUMN = "market_fee_rate"

# Features a correct explanation of an archetype names (at least one of them). ``past_range_<quantity>`` rows
# expect that quantity's feature (``PAST_RANGE_FEATURES``, else ``<quantity>`` or ``log_<quantity>`` when it
# is a feature). Archetypes not listed here are left out of reason agreement.
EXPECTED_FEATURES: dict[str, tuple[str, ...]] = {
    "fee_overpayment": ("log_fee_rate", "fee_share", "log_fee"),
    "fee_share_burn": ("fee_share", "log_fee", "log_fee_rate"),
    "zero_fee": ("log_fee_rate", "log_fee", "fee_share"),
    "below_relay_fee": ("log_fee_rate", "log_fee", "fee_share"),
    "dust_fanout": (
        "log_dust_output_count",
        "dust_output_share",
        "log_output_count",
        "output_hhi",
        "output_max_share",
    ),
    "consolidation": ("log_input_count", "log_vsize", "log_input_value"),
    "huge_transfer": ("log_output_value", "log_input_value"),
    # Many OP_RETURN outputs, or one of 1-50 kB: the count or the size of the transaction.
    "op_return_spam": (
        "log_nulldata_output_count",
        "has_op_return",
        "out_share_nulldata",
        "log_output_count",
        "log_vsize",
    ),
    # Real oddities (scripts/build_benchmark.py: CANONICAL_HISTORICAL, FIRST_TAPROOT, RAW_ODDITIES).
    "historical_annex_fee_burn": ("fee_share", "log_fee_rate", "has_op_return", "out_share_nulldata"),
    "historical_every_script_type": (
        "out_share_legacy",
        "out_share_multisig",
        "out_share_nonstandard",
        "out_share_nulldata",
        "has_op_return",
        "log_dust_output_count",
        "dust_output_share",
    ),
    "historical_unknown_witness_output": ("out_share_nonstandard", "has_op_return", "out_share_nulldata"),
    "historical_first_taproot_spend": ("fee_share", "log_fee_rate", "has_op_return", "out_share_nulldata"),
    "historical_dust_fanout": ("log_dust_output_count", "dust_output_share", "log_output_count"),
    "historical_bare_multisig": ("out_share_multisig",),
    "historical_nonstandard_multisig_data": ("out_share_nonstandard",),
    "historical_large_sweep": ("log_input_count", "log_vsize"),
    "historical_sweep_wave": ("log_input_count", "log_vsize", "witness_share"),
}
# The build script's past_range quantities whose feature is not simply ``log_<quantity>``.
PAST_RANGE_FEATURES: dict[str, tuple[str, ...]] = {
    "dust_outputs": ("log_dust_output_count",),
    "size": ("log_vsize",),
}
_AVAILABLE: dict[str, frozenset[str]] = {
    "canonical": frozenset(FEATURES_FULL),
    "summary": frozenset(FEATURES_FULL),
    "raw": frozenset(FEATURES_STRUCTURAL),
}


def expected_features(archetype: str) -> tuple[str, ...]:
    """The features a reason for ``archetype`` should name (empty: not judged)."""
    if archetype.startswith("past_range_"):
        quantity = archetype.removeprefix("past_range_")
        if quantity in PAST_RANGE_FEATURES:
            return PAST_RANGE_FEATURES[quantity]
        return next(((f,) for f in (quantity, f"log_{quantity}") if f in SPECS), ())
    return EXPECTED_FEATURES.get(archetype, ())


# --- data -------------------------------------------------------------------------------------------------


def benchmark_path() -> Path:
    return Path(str(resources.files("btc_anomaly") / "resources" / BENCHMARK_FILE))


def load_benchmark(path: str | Path | None = None) -> pd.DataFrame:
    """The benchmark as one frame: ``META_COLUMNS`` plus the canonical transaction columns, file order.

    Cached per file (path, size, mtime); treat the frame as read-only. FileNotFoundError when the file
    has not been built (``scripts/build_benchmark.py``).
    """
    p = Path(path) if path is not None else benchmark_path()
    st = p.stat()
    return _load(str(p), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=4)
def _load(path: str, _size: int, _mtime: int) -> pd.DataFrame:
    data = Path(path).read_bytes()
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    rows = []
    for line in data.splitlines():
        if not line.strip():
            continue
        rec = orjson.loads(line)
        tx = rec.pop("tx")
        rows.append({**{c: rec.get(c) for c in META_COLUMNS}, **tx})
    if not rows:
        raise ValueError(f"{path} holds no benchmark rows")
    frame = pd.DataFrame(rows)
    frame["label"] = frame["label"].astype(np.int8)
    frame["source_block"] = frame["source_block"].astype("Int64")
    return frame


def to_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Canonical rows → the 8 fields of /predict's original body (``SUMMARY_FIELDS``), nothing else."""
    return pd.DataFrame(
        {
            "hash": frame["hash"].to_numpy(dtype=object),
            "size": frame["size"].to_numpy(dtype=np.int64),
            "weight": frame["weight"].to_numpy(dtype=np.int64),
            "fee": frame["fee"].astype("Int64").to_numpy(dtype=object, na_value=None),
            "inputs_count": frame["input_count"].to_numpy(dtype=np.int64),
            "outputs_count": frame["output_count"].to_numpy(dtype=np.int64),
            "input_value": frame["input_value"].astype("Int64").to_numpy(dtype=object, na_value=None),
            "output_value": frame["output_value"].to_numpy(dtype=np.int64),
        },
        columns=list(SUMMARY_FIELDS),
    )


def path_frames(benchmark: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The rows of each path (index reset), with the metadata columns; summary rows = canonical rows."""
    canonical = benchmark[benchmark["split"] == "canonical"].reset_index(drop=True)
    raw = benchmark[benchmark["split"] == "raw"].reset_index(drop=True)
    return {"canonical": canonical, "summary": canonical, "raw": raw}


# --- scoring ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoredRows:
    """A scorer's answer for ``n`` rows, in row order. ``risk_score`` None: the detector has none."""

    anomaly_score: np.ndarray
    is_anomaly: np.ndarray
    risk_score: np.ndarray | None = None
    top_features: list[list[str]] | None = None  # None: the detector does not explain

    def __post_init__(self) -> None:
        n = len(self.anomaly_score)
        lengths = [len(self.is_anomaly)]
        if self.risk_score is not None:
            lengths.append(len(self.risk_score))
        if self.top_features is not None:
            lengths.append(len(self.top_features))
        if any(m != n for m in lengths):
            raise ValueError(f"scorer returned columns of different lengths: {n} and {lengths}")


Scorer = Callable[[pd.DataFrame, ScoringPath], ScoredRows]


def bundle_scorer(bundle: ModelBundle, settings: Settings | None = None) -> Scorer:
    """The production scoring of ``bundle``: the scoring core (``model/core.py``) the stream, the API and
    the gate share, with every row explained; 8-field rows as the API builds them (``core.summary_table``,
    imputed features, header-only rules). Rows are read against their ``MARKET_COLUMN`` when the frame
    has one (else the bundle's training reference)."""
    from btc_anomaly.config import get_settings
    from btc_anomaly.detectors.watchlist import load_watchlist
    from btc_anomaly.model import core
    from btc_anomaly.model.scoring import canonical_table

    settings = settings or get_settings()
    detectors = settings.risk_detectors
    watchlist = load_watchlist(settings.watchlist_dir) if detectors else None

    def score(frame: pd.DataFrame, path: ScoringPath) -> ScoredRows:
        n = len(frame)
        market = frame[MARKET_COLUMN].to_numpy(dtype=np.float64) if MARKET_COLUMN in frame else None
        if path == "summary":
            table = summary_table_of(frame)
            summary = np.ones(n, dtype=bool)
        else:
            table, summary = canonical_table(frame), None
        batch = core.score_batch(
            bundle, table, market=market, summary=summary, watchlist=watchlist, detectors=detectors
        )
        reasons = core.explain_batch(bundle, batch, np.arange(n), settings.explain_top_k)
        return ScoredRows(
            anomaly_score=np.asarray(batch.score, dtype=np.float64),
            is_anomaly=np.asarray(batch.is_anomaly, dtype=bool),
            risk_score=np.asarray(batch.assessment.risk_score, dtype=np.float64),
            top_features=[[it["feature"] for it in reasons.get(i, [])] for i in range(n)],
        )

    return score


def summary_table_of(frame: pd.DataFrame) -> Any:
    """The canonical Arrow rows /predict builds for a frame of 8-field bodies (``core.summary_table``)."""
    from btc_anomaly.model import core

    return core.summary_table(
        frame["size"].to_numpy(),
        frame["weight"].to_numpy(),
        _ints(frame["fee"]),
        frame["inputs_count"].to_numpy(),
        frame["outputs_count"].to_numpy(),
        _ints(frame["input_value"]),
        _ints(frame["output_value"]),
    )


def _ints(col: pd.Series) -> list[int | None]:
    return [None if v is None or v != v else int(v) for v in col.tolist()]


def with_market(frame: pd.DataFrame) -> pd.Series:
    """Each canonical row's fee market: the median fee rate of its block (``features.market_fee_rates``, what
    the trainer reads its own rows against; NaN where no fee is known, i.e. the raw split)."""
    from btc_anomaly.features import market_fee_rates

    return pd.Series(market_fee_rates(frame), index=frame.index, name=MARKET_COLUMN)


# --- metrics ----------------------------------------------------------------------------------------------


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC; NaN unless both classes are present."""
    from sklearn.metrics import roc_auc_score

    if len(np.unique(labels)) < 2:
        return math.nan
    return float(roc_auc_score(labels, scores))


def pr_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision; NaN without positives or negatives."""
    from sklearn.metrics import average_precision_score

    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return math.nan
    return float(average_precision_score(labels, scores))


def precision_at(labels: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Share of anomalies among the ``k`` highest scores (all rows when fewer); ties keep row order."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        return math.nan
    top = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]
    return float(labels[top].mean())


def _share(mask: np.ndarray) -> float:
    return float(mask.mean()) if len(mask) else math.nan


@dataclass(frozen=True)
class ScoreMetrics:
    roc_auc: float
    pr_auc: float
    precision_at_50: float
    precision_at_100: float
    normal_flag_rate: float
    recall: float

    @classmethod
    def of(cls, labels: np.ndarray, scores: np.ndarray, flagged: np.ndarray) -> ScoreMetrics:
        labels = np.asarray(labels, dtype=np.int8)
        flagged = np.asarray(flagged, dtype=bool)
        return cls(
            roc_auc=roc_auc(labels, scores),
            pr_auc=pr_auc(labels, scores),
            precision_at_50=precision_at(labels, scores, 50),
            precision_at_100=precision_at(labels, scores, 100),
            normal_flag_rate=_share(flagged[labels == 0]),
            recall=_share(flagged[labels == 1]),
        )

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {prefix + k: v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class ArchetypeMetrics:
    n: int
    roc_auc: float
    recall: float
    risk_roc_auc: float
    risk_recall: float
    reason_agreement: float


@dataclass
class PathReport:
    path: str
    n: int
    n_anomalies: int
    score: ScoreMetrics
    risk: ScoreMetrics | None
    reason_agreement: float
    archetypes: dict[str, ArchetypeMetrics]
    labels: np.ndarray = field(repr=False)
    anomaly_score: np.ndarray = field(repr=False)
    risk_score: np.ndarray | None = field(default=None, repr=False)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {"n": float(self.n), "n_anomalies": float(self.n_anomalies)}
        out.update(self.score.as_dict())
        if self.risk is not None:
            out.update(self.risk.as_dict("risk_"))
        out["reason_agreement"] = self.reason_agreement
        return out


def reason_agreement(
    labels: np.ndarray, archetypes: np.ndarray, top_features: list[list[str]] | None, path: str
) -> tuple[float, dict[str, float]]:
    """(overall, per archetype) share of judged anomalies whose top features name an expected feature."""
    if top_features is None:
        return math.nan, {}
    available = _AVAILABLE[path]
    hits: dict[str, list[bool]] = {}
    for label, arch, top in zip(labels.tolist(), archetypes.tolist(), top_features, strict=True):
        if label != 1:
            continue
        expected = [f for f in expected_features(arch) if f in available]
        if not expected:
            continue
        hits.setdefault(arch, []).append(any(f in expected for f in top))
    per = {a: float(np.mean(h)) for a, h in hits.items()}
    every = [x for h in hits.values() for x in h]
    return (float(np.mean(every)) if every else math.nan), per


def path_report(path: str, frame: pd.DataFrame, scored: ScoredRows) -> PathReport:
    """Every metric of one path from its rows (``label``, ``archetype``) and a scorer's answer."""
    if len(scored.anomaly_score) != len(frame):
        raise ValueError(f"{path}: scorer returned {len(scored.anomaly_score)} rows for {len(frame)}")
    labels = frame["label"].to_numpy(dtype=np.int8)
    archetypes = frame["archetype"].to_numpy(dtype=object)
    score = np.asarray(scored.anomaly_score, dtype=np.float64)
    flags = np.asarray(scored.is_anomaly, dtype=bool)
    risk = None if scored.risk_score is None else np.asarray(scored.risk_score, dtype=np.float64)
    risk_flags = None if risk is None else risk >= RISK_FLAG_AT
    overall, per_reason = reason_agreement(labels, archetypes, scored.top_features, path)
    normal = labels == 0
    per: dict[str, ArchetypeMetrics] = {}
    for arch in sorted({a for a, lab in zip(archetypes, labels, strict=True) if lab == 1}):
        rows = (archetypes == arch) & (labels == 1)
        sel = rows | normal
        per[arch] = ArchetypeMetrics(
            n=int(rows.sum()),
            roc_auc=roc_auc(labels[sel], score[sel]),
            recall=_share(flags[rows]),
            risk_roc_auc=math.nan if risk is None else roc_auc(labels[sel], risk[sel]),
            risk_recall=math.nan if risk_flags is None else _share(risk_flags[rows]),
            reason_agreement=per_reason.get(arch, math.nan),
        )
    return PathReport(
        path=path,
        n=len(frame),
        n_anomalies=int(labels.sum()),
        score=ScoreMetrics.of(labels, score, flags),
        risk=None if risk is None else ScoreMetrics.of(labels, risk, risk_flags),
        reason_agreement=overall,
        archetypes=per,
        labels=labels,
        anomaly_score=score,
        risk_score=risk,
    )


# --- the report -------------------------------------------------------------------------------------------


def _fmt(v: float, digits: int = 3) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


HEADLINE = (
    "canonical.roc_auc",
    "canonical.precision_at_50",
    "summary.roc_auc",
    "canonical.normal_flag_rate",
)


@dataclass
class EvalReport:
    paths: dict[str, PathReport]
    seconds: float = 0.0
    name: str = ""

    def metric(self, key: str) -> float:
        """``"<path>.<metric>"`` (e.g. ``canonical.roc_auc``, ``summary.risk_pr_auc``); NaN when absent."""
        path, _, name = key.partition(".")
        p = self.paths.get(path)
        return math.nan if p is None else p.metrics().get(name, math.nan)

    def flat_metrics(self) -> dict[str, float]:
        """``bench.<path>.<metric>`` and ``bench.<path>.archetype.<archetype>.<metric>``, finite values only
        (what MLflow gets)."""
        out: dict[str, float] = {}
        for path, p in self.paths.items():
            for k, v in p.metrics().items():
                out[f"bench.{path}.{k}"] = v
            for arch, a in p.archetypes.items():
                for k, v in a.__dict__.items():
                    out[f"bench.{path}.archetype.{arch}.{k}"] = float(v)
        out["bench.seconds"] = self.seconds
        return {k: float(v) for k, v in out.items() if math.isfinite(v)}

    def headline(self) -> dict[str, float]:
        """The numbers tagged on a model version: ``bench.canonical.roc_auc`` and three more."""
        return {f"bench.{k}": self.metric(k) for k in HEADLINE}

    def table(self, archetypes: bool = True) -> str:
        """Markdown: one row per path and score, then (``archetypes``) one row per archetype."""
        lines = [
            "| path | score | rows | anomalies | ROC-AUC | PR-AUC | P@50 | P@100 | normal flag rate | recall "
            "| reason agreement |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for path, p in self.paths.items():
            for name, m in (("anomaly_score", p.score), ("risk_score", p.risk)):
                if m is None:
                    continue
                reasons = _fmt(p.reason_agreement) if name == "anomaly_score" else ""
                lines.append(
                    f"| {path} | {name} | {p.n:,} | {p.n_anomalies:,} | {_fmt(m.roc_auc)} | {_fmt(m.pr_auc)} "
                    f"| {_fmt(m.precision_at_50, 2)} | {_fmt(m.precision_at_100, 2)} "
                    f"| {_fmt(m.normal_flag_rate)} | {_fmt(m.recall)} | {reasons} |"
                )
        if not archetypes:
            return "\n".join(lines) + "\n"
        arch_names = sorted({a for p in self.paths.values() for a in p.archetypes})
        paths = list(self.paths)
        head = "| archetype | " + " | ".join(
            f"{p} n | {p} ROC-AUC | {p} recall | {p} risk recall | {p} reasons" for p in paths
        )
        lines += ["", head + " |", "|---|" + "---:|" * (5 * len(paths))]
        for arch in arch_names:
            cells = []
            for path in paths:
                a = self.paths[path].archetypes.get(arch)
                if a is None:
                    cells += ["0", "—", "—", "—", "—"]
                else:
                    cells += [
                        f"{a.n}",
                        _fmt(a.roc_auc),
                        _fmt(a.recall, 2),
                        _fmt(a.risk_recall, 2),
                        _fmt(a.reason_agreement, 2),
                    ]
            lines.append(f"| {arch} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def pr_figure(self) -> Any:
        """Precision-recall curves: anomaly_score per path (solid), risk_score (dashed)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from sklearn.metrics import precision_recall_curve

        fig, ax = plt.subplots(figsize=(7, 5))
        colors = {"canonical": "tab:blue", "summary": "tab:orange", "raw": "tab:green"}
        for path, p in self.paths.items():
            if len(np.unique(p.labels)) < 2:
                continue
            for name, scores, style, m in (
                ("anomaly_score", p.anomaly_score, "-", p.score),
                ("risk_score", p.risk_score, "--", p.risk),
            ):
                if scores is None or m is None:
                    continue
                precision, recall, _ = precision_recall_curve(p.labels, scores)
                ax.plot(
                    recall,
                    precision,
                    style,
                    color=colors.get(path),
                    label=f"{path} {name} (AP {m.pr_auc:.3f})",
                    drawstyle="steps-post",
                )
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"Benchmark precision-recall{' — ' + self.name if self.name else ''}")
        ax.legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        return fig


def evaluate(
    scorer: Scorer,
    benchmark: pd.DataFrame | str | Path | None = None,
    *,
    paths: tuple[ScoringPath, ...] = PATHS,
    name: str = "",
) -> EvalReport:
    """Score the benchmark along ``paths`` with ``scorer`` and measure (see the module doc)."""
    t0 = time.perf_counter()
    frame = benchmark if isinstance(benchmark, pd.DataFrame) else load_benchmark(benchmark)
    frames = path_frames(frame)
    reports: dict[str, PathReport] = {}
    for path in paths:
        rows = frames[path]
        if rows.empty:
            continue
        if MARKET_COLUMN not in rows:
            rows = rows.assign(**{MARKET_COLUMN: with_market(rows)})
        given = (
            to_summary(rows).assign(**{MARKET_COLUMN: rows[MARKET_COLUMN].to_numpy()})
            if path == "summary"
            else rows
        )
        scored = scorer(given, path)
        reports[path] = path_report(path, rows, scored)
    return EvalReport(paths=reports, seconds=time.perf_counter() - t0, name=name)


__all__ = [
    "BENCHMARK_FILE",
    "EXPECTED_FEATURES",
    "PATHS",
    "SUMMARY_FIELDS",
    "EvalReport",
    "PathReport",
    "ScoreMetrics",
    "ScoredRows",
    "Scorer",
    "bundle_scorer",
    "evaluate",
    "expected_features",
    "load_benchmark",
    "path_frames",
    "precision_at",
    "to_summary",
]
