"""Scoring cost of the detectors: ``score_frame`` with every detector vs the forest alone, same run.

``forest only`` is ``score_frame(..., detectors=False)`` (features, both forests, reasons for the
anomalies; the risk score from the forest alone). ``all detectors`` adds the rules, the watchlists
(21k real listed addresses, data/labels), the Mahalanobis distance and the combined risk score with its
signals: what the stream and the API run by default. The batch is the bundled 5,274 real transactions
tiled to 100,000; one transaction is the sample's median row. Cases are interleaved and reported as
the median of their repeats; ``cost`` is all detectors' time divided by the forest's (goal: at most 2x).
The detector parts are also timed alone on the 100k batch (their inputs precomputed).

    python -m bench.bench_detectors [--repeats R] [--rows N]
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import time
from collections.abc import Callable
from typing import Any

import orjson
import pandas as pd

from btc_anomaly.config import PROJECT_ROOT, Settings
from btc_anomaly.detectors import rules
from btc_anomaly.detectors.assess import mahalanobis_distances
from btc_anomaly.detectors.watchlist import load_watchlist
from btc_anomaly.features import compute_features
from btc_anomaly.model.scoring import ChampionModel, canonical_table, score_frame
from btc_anomaly.model.train import fit_bundle

SAMPLE = PROJECT_ROOT / "data" / "sample" / "transactions.jsonl.gz"
LABELS = PROJECT_ROOT / "data" / "labels"
BATCH = 100_000


def _seconds(fn: Callable[[], Any], inner: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def main(repeats: int = 7, rows: int = BATCH) -> list[dict[str, Any]]:
    """``rows``: size of the big batch (the table's "100k" columns; smaller for the smoke test)."""
    records = [orjson.loads(line) for line in gzip.decompress(SAMPLE.read_bytes()).splitlines()]
    txs = pd.DataFrame(records)
    bundle, _ = fit_bundle(compute_features(txs), Settings())
    model = ChampionModel(bundle=bundle, name="bench", version="0", run_id=None)
    settings = Settings(watchlist_dir=LABELS)
    tx_one = txs.iloc[[len(txs) // 2]]
    tx_big = pd.concat([txs] * (-(-rows // len(txs))), ignore_index=True).iloc[:rows]
    t0 = time.perf_counter()
    watchlist = load_watchlist(LABELS)
    load_s = time.perf_counter() - t0

    def frame(df: pd.DataFrame, detectors: bool) -> Callable[[], Any]:
        return lambda: score_frame(df, model, settings=settings, detectors=detectors)

    cases = {
        "forest only": (frame(tx_one, False), frame(tx_big, False)),
        "all detectors": (frame(tx_one, True), frame(tx_big, True)),
    }
    table = canonical_table(tx_big)
    matrix = compute_features(table).to_numpy()
    kinds = bundle.score_features(compute_features(table))["model_kind"].to_numpy()
    inputs, outputs = table.column("inputs").combine_chunks(), table.column("outputs").combine_chunks()
    parts = {
        "rules (8)": lambda: rules.evaluate(table),
        "watchlists (is_in over addresses)": lambda: watchlist.match(inputs, outputs),
        "Mahalanobis": lambda: mahalanobis_distances(bundle.mahalanobis, matrix, kinds),
    }
    for one_fn, big_fn in cases.values():  # warm-up
        one_fn()
        big_fn()
    one: dict[str, list[float]] = {k: [] for k in cases}
    big: dict[str, list[float]] = {k: [] for k in cases}
    part_t: dict[str, list[float]] = {k: [] for k in parts}
    for _ in range(repeats):  # interleaved, so machine noise hits every case alike
        for name, (one_fn, big_fn) in cases.items():
            one[name].append(_seconds(one_fn, inner=50))
            big[name].append(_seconds(big_fn))
        for name, fn in parts.items():
            part_t[name].append(_seconds(fn))
    base1, baseb = statistics.median(one["forest only"]), statistics.median(big["forest only"])
    out: list[dict[str, Any]] = []
    for name in cases:
        t1, tb = statistics.median(one[name]), statistics.median(big[name])
        out.append(
            {
                "case": f"score_frame, {name}",
                "1 tx (ms)": round(t1 * 1e3, 3),
                "1 tx cost": round(t1 / base1, 2),
                "100k tx (ms)": round(tb * 1e3, 1),
                "100k cost": round(tb / baseb, 2),
                "100k tx/s": int(rows / tb),
            }
        )
    for name, ts in part_t.items():
        out.append({"case": f"part: {name}", "100k tx (ms)": round(statistics.median(ts) * 1e3, 1)})
    out.append(
        {
            "case": f"watchlist load ({len(watchlist):,} addresses, once per process)",
            "1 tx (ms)": round(load_s * 1e3),
        }
    )
    return out


if __name__ == "__main__":
    from bench.run_all import format_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rows", type=int, default=BATCH, help="big batch size (smoke test: small)")
    args = parser.parse_args()
    print(format_table(main(args.repeats, args.rows)))
