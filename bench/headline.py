"""The headline benchmark table (README "Benchmarks", ``bench/RESULTS.md``), from ``bench/results.json``.

``bench.run_all`` writes every benchmark's rows of one full run to ``results.json``; ``headline_markdown``
picks the figures a reader looks for out of those rows and puts the machine's load beside them.
``scripts/update_readme.py`` writes the result between the ``<!-- BEGIN benchmarks -->`` markers of both
files, and ``tests/unit/test_readme.py`` fails when either is stale relative to ``results.json``.

A figure whose benchmark failed or lacks the row says so in its cell instead of keeping an old number.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results.json"
Results = dict[str, Any]


class Missing(LookupError):
    """A figure's benchmark failed in that run, or its row is not in the results."""


# What reading a figure raises when the run lacks it (a failed benchmark, a renamed row or column).
UNREADABLE = (Missing, KeyError, ZeroDivisionError, TypeError)


def _rows(results: Results, bench: str) -> list[dict[str, Any]]:
    entry = results.get("benchmarks", {}).get(bench)
    if entry is None:
        raise Missing(f"{bench} not run" if results.get("finished", True) else "the run stopped before it")
    if entry.get("error"):
        raise Missing(f"{bench} failed: {entry['error'][:80]}")
    return list(entry["rows"])


def row(
    results: Results, bench: str, prefix: str, key: str = "case", target: str | None = None
) -> dict[str, Any]:
    """The first row of ``bench`` whose ``key`` column starts with ``prefix`` (and, for the API
    benchmark, whose ``target`` column starts with ``target``)."""
    for r in _rows(results, bench):
        if str(r.get(key, "")).startswith(prefix) and (
            target is None or str(r.get("target", "")).startswith(target)
        ):
            return r
    raise Missing(f"{bench}: no row {prefix!r}" + (f" for {target!r}" if target else ""))


def num(value: Any, digits: int = 0) -> str:
    """``1,234`` / ``0.39``: thousands separators, ``digits`` decimals."""
    if value is None or value != value:  # None or NaN
        return "-"
    return f"{float(value):,.{digits}f}"


def _load(results: Results, bench: str) -> str:
    entry = results.get("benchmarks", {}).get(bench, {})
    start, end = entry.get("machine_at_start"), entry.get("machine_at_end")
    if not start or not end:
        return "-"
    return f"{start['loadavg'][0]:.1f} → {end['loadavg'][0]:.1f}"


@dataclass(frozen=True)
class Figure:
    name: str
    bench: str
    goal: str
    # (ours, baseline, met) from the results; raises Missing when the run has no such figure.
    read: Callable[[Results], tuple[str, str, bool | None]]


def _producer(r: Results) -> tuple[str, str, bool | None]:
    ours = row(r, "bench_producer", "ours")
    bare = row(r, "bench_producer", "bare", target=None)
    part = row(r, "bench_producer", "bare+partition")
    return (
        f"{num(ours['tx_per_s'])} tx/s ({num(ours['vs_bare'], 2)}x bare)",
        f"bare kafka-python loop {num(bare['tx_per_s'])} tx/s; with partitions computed up front "
        f"{num(part['tx_per_s'])} tx/s",
        ours["tx_per_s"] >= 20_000,
    )


def _stream_backfill(r: Results) -> tuple[str, str, bool | None]:
    ours = row(r, "bench_stream", "backfill: index + append")
    plain = row(r, "bench_stream", "backfill: plain Delta append")
    merge = row(r, "bench_stream", "backfill: every row through the MERGE")
    return (
        f"{num(ours['tx/s'])} tx/s ({num(ours['tx/s'] / plain['tx/s'], 2)}x the plain append), "
        f"{num(ours['messages'])} tx",
        f"plain Delta append {num(plain['tx/s'])} tx/s; every row through the MERGE {num(merge['tx/s'])}",
        ours["tx/s"] >= 20_000,
    )


def _stream_latency(r: Results) -> tuple[str, str, bool | None]:
    ours = row(r, "bench_stream", "latency, index + append")
    plain = row(r, "bench_stream", "latency, plain Delta append")
    return (
        f"{num(ours['p50 s'], 2)} / {num(ours['p95 s'], 2)} s",
        f"plain Delta append {num(plain['p50 s'], 2)} / {num(plain['p95 s'], 2)} s",
        ours["p95 s"] <= 3.0,
    )


def _compiled(r: Results) -> dict[str, Any]:
    try:
        return row(r, "bench_scoring", "compiled, numba")
    except Missing:
        return row(r, "bench_scoring", "compiled, numpy")


def _scoring_one(r: Results) -> tuple[str, str, bool | None]:
    forest, det = _compiled(r), row(r, "bench_scoring", "detector (tails + forest)")
    sk = row(r, "bench_scoring", "sklearn score_samples")
    pyfunc = row(r, "bench_scoring", "MLflow pyfunc (sklearn flavor)")
    return (
        f"{num(forest['1 tx (ms)'], 3)} / {num(det['1 tx (ms)'], 2)} ms",
        f"sklearn {num(sk['1 tx (ms)'], 1)} ms, MLflow pyfunc {num(pyfunc['1 tx (ms)'], 1)} ms",
        det["1 tx (ms)"] <= 0.3,
    )


def _scoring_big(r: Results) -> tuple[str, str, bool | None]:
    forest, det = _compiled(r), row(r, "bench_scoring", "detector (tails + forest)")
    sk = row(r, "bench_scoring", "sklearn score_samples")
    return (
        f"{num(forest['100k tx (ms)'])} / {num(det['100k tx (ms)'])} ms "
        f"(detector {num(det['100k tx (ms)'] / forest['100k tx (ms)'], 1)}x the forest)",
        f"sklearn {num(sk['100k tx (ms)'])} ms",
        forest["100k tx (ms)"] <= 120,
    )


def _training(r: Results) -> tuple[str, str, bool | None]:
    total = row(r, "bench_training", "features + fit", key="step")
    base = row(r, "bench_training", "baseline: sklearn fit", key="step")
    return (
        f"{num(total['seconds'], 1)} s",
        f"sklearn fit of the full forest alone {num(base['seconds'], 1)} s",
        total["seconds"] <= 60,
    )


def _dashboard(r: Results) -> tuple[str, str, bool | None]:
    refresh = row(r, "bench_dashboard", "refresh, lake unchanged")
    appended = row(r, "bench_dashboard", "refresh after a 1,000-row append")
    base = row(r, "bench_dashboard", "baseline:")
    return (
        f"{num(refresh['median ms'])} ms; after a 1,000-row append {num(appended['median ms'])} ms",
        f"`to_pandas()` + pandas {num(base['median ms'] / 1000, 1)} s",
        max(refresh["median ms"], appended["median ms"]) <= 500,
    )


def _api_one(r: Results) -> tuple[str, str, bool | None]:
    ours = row(r, "bench_api", "single tx, sequential", target="ours (1 worker, numpy)")
    naive = row(r, "bench_api", "single tx, sequential", target="naive")
    return (
        f"{num(ours['p50 ms'], 2)} / {num(ours['p99 ms'], 1)} ms",
        f"naive pyfunc app {num(naive['p50 ms'], 1)} / {num(naive['p99 ms'], 1)} ms",
        ours["p50 ms"] <= 2 and ours["p99 ms"] <= 10,
    )


def _api_throughput(r: Results) -> tuple[str, str, bool | None]:
    one = row(r, "bench_api", "throughput", target="ours (1 worker, numpy)")
    two = row(r, "bench_api", "throughput", target="ours (2 workers")
    naive = row(r, "bench_api", "throughput", target="naive")
    return (
        f"{num(one['req/s'])} (1 worker) to {num(two['req/s'])} (2 workers) req/s",
        f"naive {num(naive['req/s'])} req/s",
        one["req/s"] >= 1000,
    )


def _api_batch(r: Results) -> tuple[str, str, bool | None]:
    summary = row(r, "bench_api", "batch 1,000 8-field", target="ours (1 worker, numpy)")
    canonical = row(r, "bench_api", "batch 1,000 canonical", target="ours (1 worker, numpy)")
    naive = row(r, "bench_api", "batch 1,000 canonical", target="naive")
    return (
        f"{num(summary['p50 ms'], 1)} / {num(canonical['p50 ms'], 1)} ms",
        f"naive {num(naive['p50 ms'] / 1000, 1)} s",
        max(summary["p50 ms"], canonical["p50 ms"]) <= 20,
    )


def _detectors(r: Results) -> tuple[str, str, bool | None]:
    det = row(r, "bench_detectors", "score_frame, all detectors")
    return (
        f"{num(det['100k cost'], 2)}x the forest alone on 100k tx, {num(det['1 tx cost'], 2)}x on 1 tx",
        "forest only, same run",
        det["100k cost"] <= 2,
    )


def _big_tx(r: Results) -> tuple[str, str, bool | None]:
    big = row(r, "bench_api_big_tx", "/predict, 1 MB tx x 8")
    return (
        f"p99 {num(big['p99 ms'], 1)} ms over {num(big['/health n'])} probes",
        f"the 8 x 1 MB request itself {num(big['request s'], 2)} s",
        big["p99 ms"] < 50,
    )


def _lake(r: Results) -> tuple[str, str, bool | None]:
    rows = [x for x in _rows(r, "bench_lake") if x.get("layout", "compacted") == "compacted"]
    if not rows:
        raise Missing("bench_lake: no compacted-layout rows")
    size = max(x["rows"] for x in rows)

    def p95(case: str, target: str) -> float:
        for x in rows:
            if x["rows"] == size and x["case"] == case and x["target"] == target:
                return float(x["p95_ms"])
        raise Missing(f"bench_lake: no {target} row {case!r} at {size:,} rows")

    anomalies, address = p95("/anomalies", "bounded"), p95("/addresses/{a}", "bounded")
    return (
        f"{num(anomalies)} / {num(address)} ms at {num(size / 1e6)}M rows",
        f"whole-table read {num(p95('/anomalies', 'naive whole table') / 1000, 1)} / "
        f"{num(p95('/addresses/{a}', 'naive whole table') / 1000, 1)} s",
        max(anomalies, address) <= 200,
    )


def _quality(r: Results) -> tuple[str, str, bool | None]:
    def auc(detector: str) -> float:
        for x in _rows(r, "bench_quality"):
            if x.get("protocol") == "holdout" and x.get("detector") == detector:
                return float(x["canonical ROC-AUC"])
        raise Missing(f"bench_quality: no holdout row for {detector!r}")

    ours = auc("ours")
    return (
        f"{num(ours, 3)}",
        f"IsolationForest, same features {num(auc('forest, same features'), 3)}; "
        f"8 raw fields {num(auc('forest, 8 raw fields'), 3)}",
        ours >= 0.95,
    )


FIGURES: tuple[Figure, ...] = (
    Figure("producer, replay → Kafka", "bench_producer", "≥ 20k tx/s", _producer),
    Figure("stream backfill, Kafka → Spark → Delta (dedup)", "bench_stream", "≥ 20k tx/s", _stream_backfill),
    Figure(
        "stream latency publish → Delta, 1 s trigger, p50 / p95", "bench_stream", "p95 ≤ 3 s", _stream_latency
    ),
    Figure(
        "scoring 1 tx: compiled forest / whole detector (tails + forest + calibration)",
        "bench_scoring",
        "≤ 0.3 ms",
        _scoring_one,
    ),
    Figure(
        "scoring 100k tx: compiled forest / whole detector", "bench_scoring", "forest ≤ 120 ms", _scoring_big
    ),
    Figure("training on 1M tx (features + both forests)", "bench_training", "≤ 60 s", _training),
    Figure("dashboard refresh, 1M rows (panels + table)", "bench_dashboard", "≤ 500 ms", _dashboard),
    Figure("API `POST /predict`, one tx, p50 / p99", "bench_api", "≤ 2 / ≤ 10 ms", _api_one),
    Figure("API throughput, keep-alive (wrk)", "bench_api", "≥ 1,000 req/s", _api_throughput),
    Figure("API batch of 1,000 (8-field / canonical), p50", "bench_api", "≤ 20 ms", _api_batch),
    Figure(
        "risk detectors (rules, watchlists, Mahalanobis, risk score) in `score_frame`",
        "bench_detectors",
        "≤ 2x",
        _detectors,
    ),
    Figure(
        "API `/health` while 8 x 1 MB transactions are scored", "bench_api_big_tx", "p99 < 50 ms", _big_tx
    ),
    Figure(
        "API lake reads, p95: `/anomalies` / `/addresses/{a}` (~60 tx a day)",
        "bench_lake",
        "≤ 200 ms",
        _lake,
    ),
    Figure("detection quality: canonical ROC-AUC, holdout", "bench_quality", "≥ 0.95", _quality),
)


def load(path: Path = RESULTS) -> Results:
    return json.loads(path.read_text()) if path.exists() else {}


def headline_markdown(results: Results | None = None) -> str:
    """The generated table and the line saying which run and machine it comes from."""
    results = load() if results is None else results
    if not results:
        return "No benchmark results yet: run `make bench`."
    lines = [
        "| figure | ours | baseline | goal | met | load avg (1 min) during the benchmark |",
        "|---|---|---|---|---|---|",
    ]
    for fig in FIGURES:
        try:
            ours, baseline, met = fig.read(results)
            verdict = "-" if met is None else ("yes" if met else "**no**")
        except UNREADABLE as exc:
            ours, baseline, verdict = f"not measured ({exc})", "", "-"
        lines.append(
            f"| {fig.name} | {ours} | {baseline} | {fig.goal} | {verdict} | {_load(results, fig.bench)} |"
        )
    start, end = results.get("machine_at_start", {}), results.get("machine_at_end", {})
    unfinished = (
        ""
        if results.get("finished", True)
        else " (the run did not finish: figures of the benchmarks it did not reach say so)"
    )
    lines += [
        "",
        f"Generated from `bench/results.json`: one `make bench` run{unfinished} started {results.get('started', '?')} "
        f"on {start.get('cores', '?')} cores; load average (1/5/15 min) "
        f"{'/'.join(f'{x:.1f}' for x in start.get('loadavg', []))} at the start, "
        f"{'/'.join(f'{x:.1f}' for x in end.get('loadavg', []))} at the end; speed probe (a fixed Python loop) "
        f"{start.get('speed_probe_ms', '?')} → {end.get('speed_probe_ms', '?')} ms. Each benchmark's own "
        "tables and the history of the figures are in `bench/RESULTS.md`.",
    ]
    return "\n".join(lines)
