"""The one scoring core: canonical transactions (Arrow) → scores, labels, reasons and risk.

The stream (``scoring.score_frame``), the API (``api/inference.py``), the promotion gate and the
benchmark evaluation all score through these functions, in this order::

    batch = score_batch(bundle, table, market=..., summary=..., watchlist=..., detectors=...)
    reasons = explain_batch(bundle, batch, rows, top_k)        # only the rows to explain

``score_batch`` computes the features once (``features.feature_matrix``), fills in what an 8-field body
cannot know (``impute_summary``), scores every row with its kind's detector against the fee market
(``ModelBundle.score_matrix``) and runs the per-transaction detectors (rules, watchlists, Mahalanobis)
into the risk score (``detectors.assess``). Callers only choose which rows to explain (the API may apply
a request's own threshold) and shape the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from btc_anomaly.detectors.assess import Assessment, assess, forest_only
from btc_anomaly.detectors.watchlist import Watchlist
from btc_anomaly.features import (
    FEATURES_FULL,
    FEATURES_PREVOUT,
    FEATURES_STRUCTURAL,
    INPUT_COLUMNS,
    feature_matrix,
)
from btc_anomaly.model.bundle import MatrixScores, ModelBundle
from btc_anomaly.model.explain import explain
from btc_anomaly.schema import arrow_schema

INPUT_SCHEMA = pa.schema([arrow_schema().field(c) for c in INPUT_COLUMNS])
_IN_STRUCT = INPUT_SCHEMA.field("inputs").type.value_type
_OUT_STRUCT = INPUT_SCHEMA.field("outputs").type.value_type
_COL = {name: i for i, name in enumerate(FEATURES_FULL)}
_PREVOUT_COLS = [_COL[f] for f in FEATURES_PREVOUT]

# What the 8 fields of the original design determine exactly (through compute_features); every other
# feature of an 8-field body is the scoring kind's training median.
SUMMARY_KNOWN = frozenset(
    {
        "log_vsize",
        "witness_share",
        "is_segwit",
        "log_input_count",
        "log_output_count",
        "log_output_value",
        "log_fee_rate",
        "log_fee",
        "log_input_value",
        "fee_share",
    }
)
SUMMARY_IMPUTED: dict[str, list[str]] = {
    "full": [f for f in FEATURES_FULL if f not in SUMMARY_KNOWN],
    "structural": [f for f in FEATURES_STRUCTURAL if f not in SUMMARY_KNOWN],
}


class BatchTooLarge(ValueError):
    """More inputs + outputs than one batch may hold."""


@dataclass
class Batch:
    """A scored batch: its Arrow columns, feature matrix, scores and detector assessment."""

    table: pa.Table
    matrix: np.ndarray
    scores: MatrixScores
    assessment: Assessment
    summary: np.ndarray  # bool per row: an 8-field body (imputed features, header-only rules)

    @property
    def score(self) -> np.ndarray:
        return self.scores.score

    @property
    def threshold(self) -> np.ndarray:
        return self.scores.threshold

    @property
    def kinds(self) -> np.ndarray:
        return self.scores.kinds

    @property
    def is_anomaly(self) -> np.ndarray:
        return self.scores.score > self.scores.threshold


def score_batch(
    bundle: ModelBundle,
    table: pa.Table,
    *,
    market: np.ndarray | float | None = None,
    summary: np.ndarray | None = None,
    watchlist: Watchlist | None = None,
    detectors: bool = True,
) -> Batch:
    """Score canonical transactions (``INPUT_COLUMNS`` as Arrow) with ``bundle``.

    ``market``: the fee market (median fee rate, sat/vB) per row or for all rows; None = the bundle's
    training reference. ``summary``: rows that are 8-field bodies (their lists are placeholders, see
    ``summary_table``). ``detectors=False`` or no ``watchlist`` leaves the risk score to the model alone.
    """
    n = table.num_rows
    summary = np.zeros(n, dtype=bool) if summary is None else np.asarray(summary, dtype=bool)
    matrix = feature_matrix(table)
    if summary.any():
        impute_summary(matrix, np.flatnonzero(summary), bundle)
    scores = bundle.score_matrix(matrix, market)
    if detectors and watchlist is not None:
        a = assess(
            table,
            matrix,
            scores.score,
            scores.threshold,
            scores.kinds,
            mahalanobis=bundle.mahalanobis,
            watchlist=watchlist,
            header_only=summary,
        )
    else:
        a = forest_only(scores.score, scores.threshold)
    return Batch(table, matrix, scores, a, summary)


def explain_batch(
    bundle: ModelBundle, batch: Batch, rows: np.ndarray, top_k: int
) -> dict[int, list[dict[str, Any]]]:
    """Reason items (``explain.explain``) for ``rows`` of a batch: row → items, each with its kind's model."""
    rows = np.asarray(rows, dtype=np.int64)
    out: dict[int, list[dict[str, Any]]] = {}
    if not len(rows):
        return out
    wanted = np.zeros(len(batch.matrix), dtype=bool)
    wanted[rows] = True
    for kind, (kind_rows, parts) in batch.scores.parts.items():
        pick = np.flatnonzero(wanted[kind_rows])
        if not len(pick):
            continue
        det = bundle.detectors[kind]
        idx = kind_rows[pick]
        X = batch.matrix[np.ix_(idx, [_COL[f] for f in det.feature_names])]
        items = explain(det, bundle.stats[kind], X, parts.take(pick), batch.scores.market[idx], top_k=top_k)
        for r, it in zip(idx.tolist(), items, strict=True):
            out[r] = it
    return out


# --- 8-field bodies ---------------------------------------------------------------------------------------


def summary_table(
    size: np.ndarray,
    weight: np.ndarray,
    fee: list[int | None],
    inputs_count: np.ndarray,
    outputs_count: np.ndarray,
    input_value: list[int | None],
    output_value: list[int | None],
) -> pa.Table:
    """Canonical rows for 8-field bodies (the original design's fields): known columns filled, lists of
    the declared lengths.

    List entries carry no information (unknown addresses, input values and scripts; zero output values):
    every feature computed from them is overwritten by ``impute_summary``. Built from NumPy, not Python
    dicts, because a declared count can be in the hundred thousands.
    """
    size = np.asarray(size, dtype=np.int64)
    weight = np.asarray(weight, dtype=np.int64)
    n_in = np.asarray(inputs_count, dtype=np.int64)
    n_out = np.asarray(outputs_count, dtype=np.int64)
    n = len(size)
    columns: dict[str, pa.Array] = {
        "size": pa.array(size),
        "vsize": pa.array((weight + 3) // 4),
        "weight": pa.array(weight),
        "locktime": pa.array(np.zeros(n, np.int64)),
        "fee": pa.array(fee, pa.int64()),
        "input_value": pa.array(input_value, pa.int64()),
        "output_value": pa.array(output_value, pa.int64()),
        "is_segwit": pa.array(weight < 4 * size),
        "rbf": pa.array(np.zeros(n, bool)),
        "has_op_return": pa.array(np.zeros(n, bool)),
        "inputs": _blank_lists(n_in, _IN_STRUCT, {"script_type": "unknown"}),
        "outputs": _blank_lists(n_out, _OUT_STRUCT, {"script_type": "nonstandard", "value": 0}),
    }
    return pa.Table.from_arrays([columns[c] for c in INPUT_COLUMNS], schema=INPUT_SCHEMA)


def _blank_lists(counts: np.ndarray, struct: pa.StructType, fill: dict[str, Any]) -> pa.ListArray:
    total = int(counts.sum())
    if total >= 2**31:  # Arrow list offsets are int32
        raise BatchTooLarge(f"{total:,} declared inputs or outputs in one request")
    children = []
    for f in struct:
        if f.name in fill:
            children.append(pa.repeat(pa.scalar(fill[f.name], f.type), total))
        else:
            children.append(pa.nulls(total, f.type))
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    values = pa.StructArray.from_arrays(children, fields=list(struct))
    return pa.ListArray.from_arrays(offsets, values)


def impute_summary(matrix: np.ndarray, rows: np.ndarray, bundle: ModelBundle) -> None:
    """Replace the features the 8 fields cannot determine by the scoring kind's training median (in place)."""
    full = ~np.isnan(matrix[np.ix_(rows, _PREVOUT_COLS)]).any(axis=1)
    for kind, mask in (("full", full), ("structural", ~full)):
        if not mask.any():
            continue
        names = SUMMARY_IMPUTED[kind]
        stats = bundle.stats[kind]
        medians = np.array([stats.q(f, 0.5) for f in names])
        matrix[np.ix_(rows[mask], [_COL[f] for f in names])] = medians
