"""Lake endpoints of the API on 1M and 10M scored rows: bounded reads vs the whole-table read, same run.

Lake (per size, in a temporary folder): the bundled sample scored by the detector fitted in-process
(``dashboard.demo.fit_model``), repeated to ``rows`` rows: each row is a real scored row drawn at random,
with a new hash (the original's first 56 hex digits + the row number: unique) and a ``first_seen`` spread
evenly over ``rows / RATE`` seconds ending now (``RATE`` = 3.86 tx/s, 10M rows in 30 days: a steady
Bitcoin mempool), ``scored_at`` a second later. ``scored_transactions`` and ``transactions`` (the same
transactions, for ``/addresses``; ``ingested_at`` = ``scored_at``) are written in the stream's layout:
``date`` partitions, one file per day (``compacted``, as compaction leaves a day behind it), and
``address_index`` is built from ``transactions`` by the stream's own function
(sinks.build_address_index). So a bigger lake is a longer history at the same rate, and a 24 h window
holds the same ~333k rows at every size: the bounded reads should stay flat. The rows are real
transactions and their real scores; only hashes, times and one address (below) are made up.

Cases, through the real app (``create_app``, in-process ASGI with Starlette's TestClient; the model is
not loaded, the lake routes do not need it), ``requests`` each, p50/p95 client-side:

* ``/anomalies`` (default window), ``/anomalies?rule=excessive_fee_share`` (risk-ordered, list filter),
  ``/addresses/{a}`` (default window; an address of the newest day that is in one sample transaction, so
  it recurs in ~63 transactions a day), ``/addresses/{busiest}`` (the address in the most sample
  transactions), ``/addresses/{fresh}`` (an address of the newest transaction
  only, made up: ``FRESH_ADDRESS``), ``/transactions/{hash}`` (a hash of the newest day; default: the
  maximum window back);
* ``naive``: what the endpoints did before the bounds, in the same process on the same lake: the whole
  table, every column (``delta_reader.read_arrow(path)``), then the same filter / latest-per-hash / top
  100 (``/anomalies``) or the address match over every transaction (``/addresses``). Fewer repeats.

    python -m bench.bench_lake [--rows 1000000,10000000] [--requests 30] [--naive-requests 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import itertools
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from btc_anomaly.config import Settings
from btc_anomaly.processing import tables

RATE = 10_000_000 / (30 * 86_400)  # transactions per second of first_seen
GOAL_MS = 200.0
CHUNK = 500_000  # rows generated and written at a time (bounded memory at 10M)


def scored_sample() -> tuple[pd.DataFrame, pa.Table]:
    """The sample scored by a detector fitted on it in-process, and the sample's canonical rows."""
    from btc_anomaly.dashboard.demo import fit_model, sample_transactions
    from btc_anomaly.model.scoring import score_frame

    settings = Settings()
    canonical = sample_transactions()
    frame = canonical.to_pandas()
    return score_frame(frame, fit_model(frame, settings), settings=settings), canonical  # type: ignore[arg-type]


LAYOUTS = ("compacted", "appended")


def _seen_us(i: np.ndarray, rows: int, start_us: int, span_us: int) -> np.ndarray:
    """first_seen (µs) of rows ``i``: evenly spread over ``span_us``; split so that ``i * span_us`` never
    overflows int64 (10M rows x 30 days of µs would)."""
    q, r = divmod(span_us, rows)
    return start_us + i * q + (i * r) // rows


def _chunks(rows: int, start_us: int, span_us: int, layout: str) -> list[tuple[int, int]]:
    """Row ranges written as one file each: a UTC day (``compacted``: one file per day, as the stream's
    compaction leaves it) or ``CHUNK`` rows (``appended``: the layout before clustering)."""
    if layout == "appended":
        return [(lo, min(lo + CHUNK, rows)) for lo in range(0, rows, CHUNK)]
    seen_us = _seen_us(np.arange(rows, dtype=np.int64), rows, start_us, span_us)
    cuts = np.flatnonzero(np.diff(seen_us // 86_400_000_000)) + 1
    edges = [0, *cuts.tolist(), rows]
    return list(itertools.pairwise(edges))


def build_lake(
    root: Path,
    rows: int,
    scored: pd.DataFrame,
    canonical: pa.Table,
    now: dt.datetime,
    layout: str = "compacted",
) -> float:
    """``rows`` scored rows and their transactions (module doc: how they are made), in ``layout``; returns
    the seconds the address index took to build (0 for ``appended``: a lake without one)."""
    from deltalake import WriterProperties, write_deltalake

    from btc_anomaly.dashboard.demo import scored_table

    base = scored_table(scored)
    by_hash = {h: i for i, h in enumerate(canonical["hash"].to_pylist())}
    tx_of = pa.array([by_hash[h] for h in base["hash"].to_pylist()])
    tx_base = canonical.take(tx_of)  # the transaction of each scored row, same order
    ts = pa.timestamp("us", tz="UTC")
    span_us = int(rows / RATE * 1e6)
    start_us = int(now.timestamp() * 1e6) - span_us
    rng = np.random.default_rng(0)
    compacted = layout == "compacted"
    # What sinks.compact writes: row groups of Settings.lake_row_group_rows, scored rows clustered.
    properties = (
        WriterProperties(max_row_group_size=Settings().lake_row_group_rows, compression="SNAPPY")
        if compacted
        else None
    )
    for lo, hi in _chunks(rows, start_us, span_us, layout):
        n = hi - lo
        pick = pa.array(rng.integers(0, len(base), n))
        number = pc.utf8_lpad(pa.array(np.arange(lo, lo + n)).cast(pa.string()), 8, "0")
        hashes = pc.binary_join_element_wise(
            pc.utf8_slice_codeunits(base["hash"].take(pick), 0, 56), number, ""
        )
        seen_us = _seen_us(np.arange(lo, lo + n, dtype=np.int64), rows, start_us, span_us)
        first_seen = pa.array(seen_us, pa.int64()).cast(ts)
        date = pc.cast(first_seen, pa.date32())
        s = base.take(pick)
        s = s.set_column(s.schema.get_field_index("hash"), "hash", hashes)
        s = s.set_column(s.schema.get_field_index("first_seen"), "first_seen", first_seen)
        scored_at = pa.array(seen_us + 1_000_000, pa.int64()).cast(ts)
        s = s.set_column(s.schema.get_field_index("scored_at"), "scored_at", scored_at)
        s = s.append_column(tables.DATE_COLUMN, date)
        if compacted:
            s = s.sort_by(tables.CLUSTERING[tables.SCORED])
        write_deltalake(
            str(root / tables.SCORED),
            s,
            mode="append",
            partition_by=[tables.DATE_COLUMN],
            writer_properties=properties,
        )
        t = tx_base.take(pick)
        t = t.set_column(t.schema.get_field_index("hash"), "hash", hashes)
        t = t.set_column(t.schema.get_field_index("first_seen"), "first_seen", first_seen)
        t = t.append_column(tables.DATE_COLUMN, date).append_column("ingested_at", scored_at)
        if hi == rows:
            t = _with_fresh_address(t)
        write_deltalake(
            str(root / tables.TRANSACTIONS),
            t.cast(tables.transactions_schema()),
            mode="append",
            partition_by=[tables.DATE_COLUMN],
            writer_properties=properties,
        )
        del s, t
        gc.collect()
    if not compacted:
        return 0.0
    # The index the transactions query's compaction keeps, by the same function (every date: as the
    # first compaction of a lake without one builds it).
    from btc_anomaly.processing.sinks import build_address_index

    started = time.perf_counter()
    build_address_index(
        str(root / tables.TRANSACTIONS),
        str(root / tables.ADDRESS_INDEX),
        None,
        Settings().lake_row_group_rows,
    )
    return time.perf_counter() - started


# Paid by the lake's newest transaction only (made up): every real address of the sample recurs in
# rows / 5,274 transactions of the lake, ~63 in a 24 h window, an address used once does not.
FRESH_ADDRESS = "bc1qbenchlakefreshaddress0000000000000000"


def _with_fresh_address(t: pa.Table) -> pa.Table:
    """``t`` with its last transaction's first output paid to ``FRESH_ADDRESS``."""
    last = t.slice(t.num_rows - 1).to_pylist()[0]
    last["outputs"][0]["address"] = FRESH_ADDRESS
    return pa.concat_tables([t.slice(0, t.num_rows - 1), pa.Table.from_pylist([last], schema=t.schema)])


def _addresses(canonical: pa.Table, newest: pa.Table) -> tuple[str, str]:
    """An address of the newest transactions that is in one sample transaction only (so it recurs in
    ~63 transactions a day), and the address in the most sample transactions (the busiest)."""
    rows = tables.address_rows(canonical)
    counts = rows.group_by("address").aggregate([("hash", "count")])
    once = set(counts.filter(pc.equal(counts["hash_count"], 1))["address"].to_pylist())
    address = next(
        o["address"] for outputs in newest["outputs"].to_pylist() for o in outputs if o["address"] in once
    )
    busiest = counts.sort_by([("hash_count", "descending"), ("address", "ascending")])["address"][0]
    return address, busiest.as_py()


def _times_ms(fn: Callable[[], Any], n: int) -> list[float]:
    fn()  # warm-up (first open of the table, caches)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def naive_anomalies(path: Path) -> int:
    """The pre-bounds /anomalies: every file, every column, then filter, latest per hash, top 100."""
    from btc_anomaly.api.lake import _latest_per_hash
    from btc_anomaly.processing.delta_reader import read_arrow

    table = read_arrow(path)
    table = _latest_per_hash(table.filter(pc.field("is_anomaly")))
    top = pc.select_k_unstable(table, 100, sort_keys=[("anomaly_score", "descending")])
    return len(table.take(top).to_pylist())


def naive_address(path: Path, address: str) -> int:
    """The pre-bounds /addresses without since: every transaction's inputs and outputs."""
    from btc_anomaly.processing.delta_reader import read_arrow

    table = read_arrow(path, columns=["hash", "first_seen", "block_height", "inputs", "outputs"])
    hits = 0
    for side in ("inputs", "outputs"):
        flat = table[side].combine_chunks().flatten()
        hits += int(pc.sum(pc.fill_null(pc.equal(flat.field("address"), address), False)).as_py() or 0)
    return hits


def run_size(
    rows: int,
    scored: pd.DataFrame,
    canonical: pa.Table,
    requests: int,
    naive_requests: int,
    layout: str = "compacted",
) -> list[dict[str, Any]]:
    """The four cases on a lake of ``rows`` in ``layout``, and the naive reads (``naive_requests`` > 0)."""
    from fastapi.testclient import TestClient

    from btc_anomaly.api.app import create_app
    from btc_anomaly.processing.delta_reader import read_arrow, row_groups_read

    tmp = Path(tempfile.mkdtemp(prefix="bench-lake-"))
    try:
        now = dt.datetime.now(dt.UTC)
        t0 = time.perf_counter()
        index_s = build_lake(tmp, rows, scored, canonical, now, layout)
        build_s = time.perf_counter() - t0
        settings = Settings(
            state_dir=tmp / "state",
            lake_root=tmp,
            mlflow_tracking_uri="http://127.0.0.1:9",
            api_resolve_prevouts=False,
            allowed_hosts="*",
        )
        newest = read_arrow(
            tmp / tables.TRANSACTIONS, columns=["hash", "outputs"], since=now - dt.timedelta(minutes=10)
        )
        tx_hash = newest["hash"][0].as_py()
        address, busiest = _addresses(canonical, newest)
        out: list[dict[str, Any]] = []
        days = rows / RATE / 86_400
        with TestClient(create_app(settings, watch_model=False)) as client:

            def get(url: str) -> Callable[[], Any]:
                def call() -> Any:
                    r = client.get(url)
                    assert r.status_code == 200, (url, r.status_code, r.text[:300])
                    return r

                return call

            cases = {
                "/anomalies": "/anomalies",
                "/anomalies?rule=": "/anomalies?rule=excessive_fee_share",
                "/addresses/{a}": f"/addresses/{address}",
                "/addresses/{busiest}": f"/addresses/{busiest}",
                "/addresses/{fresh}": f"/addresses/{FRESH_ADDRESS}",
                "/transactions/{hash}": f"/transactions/{tx_hash}",
            }
            found = {
                case: client.get(url).json()["count"] for case, url in cases.items() if "addresses" in case
            }
            assert found["/addresses/{fresh}"] == 1, found
            for case, url in cases.items():
                times = _times_ms(get(url), requests)
                out.append(
                    {
                        "rows": rows,
                        "days": round(days, 1),
                        "case": case,
                        "target": "bounded",
                        "layout": layout,
                        "p50_ms": _pct(times, 50),
                        "p95_ms": _pct(times, 95),
                        "n": len(times),
                        **({"transactions": found[case]} if case in found else {}),
                    }
                )
        # Row groups /anomalies' choosing read scans: the window's, less those statistics skip.
        window = {"since": now - dt.timedelta(hours=settings.api_lake_window_h), "until": now}
        read, _ = row_groups_read(tmp / tables.SCORED, **window, filters=[("is_anomaly", "=", True)])
        in_window, _ = row_groups_read(tmp / tables.SCORED, **window)
        out[0]["row_groups"] = f"{read}/{in_window}"
        for case, fn in (
            ("/anomalies", lambda: naive_anomalies(tmp / tables.SCORED)),
            ("/addresses/{a}", lambda: naive_address(tmp / tables.TRANSACTIONS, address)),
        ):
            if naive_requests <= 0:
                break
            times = _times_ms(fn, naive_requests)
            out.append(
                {
                    "rows": rows,
                    "days": round(days, 1),
                    "case": case,
                    "target": "naive whole table",
                    "layout": layout,
                    "p50_ms": _pct(times, 50),
                    "p95_ms": _pct(times, 95),
                    "n": len(times),
                }
            )
        for r in out:
            r["build_s"] = round(build_s, 1)
            r["index_s"] = round(index_s, 1)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


SIZES = (1_000_000, 4_000_000, 10_000_000)


def main(
    sizes: tuple[int, ...] | list[int] = SIZES,
    requests: int = 30,
    naive_requests: int = 3,
    scored: pd.DataFrame | None = None,
    layouts: tuple[str, ...] | list[str] = ("compacted",),
) -> list[dict[str, Any]]:
    """``scored``: the sample already scored (a caller that has it saves fitting a detector). The naive
    reads run on the first layout only (they read every row whatever the layout)."""
    from btc_anomaly.dashboard.demo import sample_transactions

    if scored is None:
        scored, canonical = scored_sample()
    else:
        canonical = sample_transactions()
    results: list[dict[str, Any]] = []
    for rows in sizes:
        for i, layout in enumerate(layouts):
            batch = run_size(rows, scored, canonical, requests, naive_requests if i == 0 else 0, layout)
            for r in batch:
                print(json.dumps(r), flush=True)
            results += batch
    _report(results)
    return results


def _report(results: list[dict[str, Any]]) -> None:
    print(
        "\n| rows | history | layout | case | bounded p50 / p95 ms | naive p95 ms | naive / bounded (p95) |"
    )
    print("|---:|---:|---|---|---:|---:|---:|")
    for r in results:
        if r["target"] != "bounded":
            continue
        naive = next(
            (
                x
                for x in results
                if x["rows"] == r["rows"] and x["case"] == r["case"] and x["target"] != "bounded"
            ),
            None,
        )
        ratio = f"{naive['p95_ms'] / r['p95_ms']:.0f}x" if naive else ""
        naive_ms = f"{naive['p95_ms']:,.0f}" if naive else ""
        groups = f" (row groups {r['row_groups']})" if "row_groups" in r else ""
        groups += f" ({r['transactions']} tx)" if "transactions" in r else ""
        print(
            f"| {r['rows']:,} | {r['days']} d | {r['layout']} | `{r['case']}`{groups} | "
            f"{r['p50_ms']:,.0f} / {r['p95_ms']:,.0f} | {naive_ms} | {ratio} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(map(str, SIZES)), help="comma-separated lake sizes")
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--naive-requests", type=int, default=3)
    parser.add_argument(
        "--layouts",
        default="compacted",
        help=f"comma-separated, of {', '.join(LAYOUTS)}: compacted = what the stream's compaction leaves",
    )
    a = parser.parse_args()
    main([int(x) for x in a.rows.split(",")], a.requests, a.naive_requests, layouts=a.layouts.split(","))
