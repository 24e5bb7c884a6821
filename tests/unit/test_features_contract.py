"""Feature contract beyond the plain per-transaction reimplementation of test_features.py: the fee market
(``market_fee_rates``) against a plain grouping of the real sample, its minimum-rows rule at exactly 20, and
the edges of the vector code (ties, zero values, null lists and addresses, clamps, Arrow input)."""

from __future__ import annotations

import copy
import datetime as dt
import math
import statistics
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from btc_anomaly import features
from btc_anomaly.features import (
    FEATURES_FULL,
    FEATURES_PREVOUT,
    INPUT_COLUMNS,
    compute_features,
    feature_matrix,
    features_from_transactions,
    has_prevouts,
    market_fee_rates,
    relative_fee_rate,
)
from btc_anomaly.schema import Transaction
from helpers.detectors import sample_records, table

COL = {name: j for j, name in enumerate(FEATURES_FULL)}


def plain_market(records: list[dict]) -> list[float]:
    """Per row: the median fee rate of its block (or 10-minute window when unconfirmed) if that group has at
    least 20 known rates, else the median of the whole frame."""

    def rate(r: dict) -> float | None:
        if r.get("is_coinbase") or r["fee"] is None or not r["vsize"]:
            return None
        return r["fee"] / r["vsize"]

    def group(r: dict) -> object:
        if r.get("block_height") is not None:
            return ("block", r["block_height"])
        if "first_seen" not in r:
            return ("none",)
        ts = pd.Timestamp(r["first_seen"])
        return ("window", ts.floor("10min"))

    known = [x for x in map(rate, records) if x is not None]
    overall = statistics.median(known) if known else math.nan
    by_group: dict[object, list[float]] = {}
    for r in records:
        if (x := rate(r)) is not None:
            by_group.setdefault(group(r), []).append(x)
    out = []
    for r in records:
        rates = by_group.get(group(r), [])
        out.append(statistics.median(rates) if len(rates) >= 20 else overall)
    return out


def test_market_of_the_sample_is_each_blocks_median() -> None:
    records = list(sample_records())
    got = market_fee_rates(pd.DataFrame(records))
    np.testing.assert_allclose(got, plain_market(records), rtol=1e-12)


def _block(n: int) -> list[dict]:
    """``n`` fee-paying transactions of the sample's largest block."""
    heights = pd.Series([r["block_height"] for r in sample_records()]).value_counts()
    height = int(heights.index[0])
    rows = [r for r in sample_records() if r["block_height"] == height and r["fee"] and not r["is_coinbase"]]
    return [copy.deepcopy(r) for r in rows[:n]]


def test_a_group_needs_exactly_20_known_rates() -> None:
    other = _block(400)[100:141]  # 41 rows, alone in their group below
    for r in other:
        r["block_height"] = 1
    for n in (19, 20):
        rows = _block(n) + other
        got = market_fee_rates(pd.DataFrame(rows))
        np.testing.assert_allclose(got, plain_market(rows), rtol=1e-12)
        head = [r["fee"] / r["vsize"] for r in rows[:n]]
        overall = statistics.median([r["fee"] / r["vsize"] for r in rows])
        assert got[0] == pytest.approx(statistics.median(head) if n == 20 else overall)
    # An unknown fee or a zero size is not a rate: 20 rows with one of those is 19 rates.
    rows = _block(20)
    rows[3]["fee"] = None
    rows[4]["vsize"] = 0
    rows += _block(40)[20:]
    for r in rows[20:]:
        r["block_height"] = 2
    np.testing.assert_allclose(market_fee_rates(pd.DataFrame(rows)), plain_market(rows), rtol=1e-12)


def test_unconfirmed_rows_group_by_ten_minute_window_and_coinbases_do_not_count() -> None:
    rows = _block(60)
    for i, r in enumerate(rows):
        r["block_height"] = None
        minute = 0 if i < 25 else 10 if i < 50 else 20  # windows of 25, 25 and 10 rows
        r["first_seen"] = f"2024-03-01T12:{minute + i % 9:02d}:{i % 60:02d}.000000Z"
    rows[0]["is_coinbase"] = True  # a coinbase in the first window: 24 rates left, still enough
    got = market_fee_rates(pd.DataFrame(rows))
    np.testing.assert_allclose(got, plain_market(rows), rtol=1e-12)
    assert got[1] != got[30]
    no_time = pd.DataFrame(rows).drop(columns=["first_seen", "block_height"])
    np.testing.assert_allclose(
        market_fee_rates(no_time),
        plain_market(
            [{k: v for k, v in r.items() if k != "first_seen"} | {"block_height": None} for r in rows]
        ),
        rtol=1e-12,
    )
    no_coinbase_column = pd.DataFrame(rows).drop(columns=["is_coinbase"])
    every = [r["fee"] / r["vsize"] for r in rows[:25]]
    assert market_fee_rates(no_coinbase_column)[0] == pytest.approx(statistics.median(every))


def test_market_without_any_known_fee_is_nan() -> None:
    rows = [dict(r, fee=None) for r in _block(5)]
    assert np.isnan(market_fee_rates(pd.DataFrame(rows))).all()


def test_first_seen_in_any_iso_form_lands_in_its_utc_window() -> None:
    """Unconfirmed rows group by the UTC 10-minute window of ``first_seen``, whatever ISO 8601 form it comes
    in: 'Z' or an offset (+05:45 floors to other windows in local time), with or without fractions."""
    rows = _block(50)
    start = dt.datetime(2024, 3, 1, 12, 0, tzinfo=dt.UTC)
    forms = [
        lambda t: t.strftime("%Y-%m-%dT%H:%M:%SZ"),
        lambda t: t.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        lambda t: t.astimezone(dt.timezone(dt.timedelta(hours=5, minutes=45))).isoformat(),
        lambda t: t.astimezone(dt.timezone(dt.timedelta(hours=-5))).isoformat(timespec="milliseconds"),
    ]
    windows: dict[int, list[float]] = {}
    for i, r in enumerate(rows):
        window = 0 if i < 25 else 1  # 25 rows in 12:00-12:10 UTC, 25 in 12:10-12:20
        t = start + dt.timedelta(minutes=10 * window + i % 10, seconds=i, microseconds=250_000 * (i % 2))
        r.update(block_height=None, first_seen=forms[i % len(forms)](t))
        windows.setdefault(window, []).append(r["fee"] / r["vsize"])
    got = market_fee_rates(pd.DataFrame(rows))
    want = [statistics.median(windows[0 if i < 25 else 1]) for i in range(len(rows))]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert want[0] != want[-1]


def test_rows_without_block_or_time_are_one_group() -> None:
    """Without a ``first_seen`` column, the unconfirmed rows are one group of their own (20 rates or more
    give their median), apart from every block."""
    rows = _block(50)
    for r in rows[25:]:
        r["block_height"] = None
    frame = pd.DataFrame(rows).drop(columns=["first_seen"])
    got = market_fee_rates(frame)
    block = statistics.median(r["fee"] / r["vsize"] for r in rows[:25])
    unknown = statistics.median(r["fee"] / r["vsize"] for r in rows[25:])
    assert block != unknown
    np.testing.assert_allclose(got, [block] * 25 + [unknown] * 25, rtol=1e-12)


def test_unconfirmed_windows_never_join_a_block() -> None:
    """Windows and blocks are separate groups even where their numbers meet: block 1 and the window of
    1970-01-01 00:00 UTC (timestamp 0, the API scores any first_seen)."""
    rows = _block(50)
    for i, r in enumerate(rows):
        if i < 25:
            r["block_height"] = 1
        else:
            r.update(block_height=None, first_seen=f"1970-01-01T00:0{i % 10}:{i:02d}Z")
    got = market_fee_rates(pd.DataFrame(rows))
    block = statistics.median(r["fee"] / r["vsize"] for r in rows[:25])
    window = statistics.median(r["fee"] / r["vsize"] for r in rows[25:])
    assert block != window
    np.testing.assert_allclose(got, [block] * 25 + [window] * 25, rtol=1e-12)


def test_market_of_a_frame_with_repeated_index_labels() -> None:
    """Two batches concatenated keep their own indexes (labels repeat): each row still gets its group's
    median, with or without ``first_seen``."""
    rows = _block(60)
    for r in rows[30:]:
        r.update(block_height=None, first_seen="2024-03-01T12:04:00.000000Z")
    block = statistics.median(r["fee"] / r["vsize"] for r in rows[:30])
    unconfirmed = statistics.median(r["fee"] / r["vsize"] for r in rows[30:])
    batches = [rows[:20] + rows[30:50], rows[20:30] + rows[50:]]  # both hold confirmed and unconfirmed rows
    frame = pd.concat([pd.DataFrame(b) for b in batches])
    assert not frame.index.is_unique
    want = [block if r["block_height"] is not None else unconfirmed for b in batches for r in b]
    for f in (frame, frame.drop(columns=["first_seen"])):
        np.testing.assert_allclose(market_fee_rates(f), want, rtol=1e-12)


def test_relative_fee_rate() -> None:
    assert relative_fee_rate(np.array([math.log1p(10.0), math.log1p(1.0)]), 10.0).tolist() == pytest.approx(
        [0.0, math.log1p(1) - math.log1p(10)]
    )
    assert relative_fee_rate([math.log1p(4.0)], np.array([1.0])).tolist() == pytest.approx([math.log(5 / 2)])
    # A float32 market (an Arrow float column, a NumPy float32 median) is read in float64, like every feature.
    market = np.float32(10.3)
    got = relative_fee_rate(np.array([math.log1p(12.0)]), np.array([market]))
    assert got.dtype == np.float64
    assert got[0] == math.log1p(12.0) - math.log1p(float(market))


def test_has_prevouts_on_frames_and_tables() -> None:
    rows = _block(3)
    rows[1]["fee"] = None
    rows[2]["input_value"] = None
    assert has_prevouts(pd.DataFrame(rows)).tolist() == [True, False, False]
    assert has_prevouts(table(rows)).tolist() == [True, False, False]


def _one(rec: dict) -> dict[str, float]:
    return dict(zip(FEATURES_FULL, feature_matrix(table([rec]))[0], strict=True))


def test_top_two_with_ties_zeros_and_one_output() -> None:
    base = _block(1)[0]
    template = base["outputs"][0]

    def outs(*values: int) -> dict:
        return dict(base, outputs=[dict(template, value=v) for v in values])

    tie = _one(outs(5000, 5000, 100))
    assert tie["value_change_ratio"] == 1.0 and tie["output_max_share"] == pytest.approx(5000 / 10100)
    single = _one(outs(7000))
    assert (single["value_change_ratio"], single["output_max_share"], single["output_hhi"]) == (0.0, 1.0, 1.0)
    zeros = _one(outs(0, 0))
    assert (zeros["value_change_ratio"], zeros["output_max_share"], zeros["output_hhi"]) == (0.0, 0.0, 0.0)
    unsorted = _one(outs(100, 9000, 300, 9000 - 1))
    assert unsorted["value_change_ratio"] == pytest.approx(8999 / 9000)
    # Rows side by side keep their own top two (groups end where the next row starts).
    both = feature_matrix(table([outs(100, 200), outs(900), outs(50, 40, 30)]))
    assert both[:, COL["value_change_ratio"]].tolist() == pytest.approx([0.5, 0.0, 0.8])


def test_no_outputs_and_null_lists() -> None:
    base = _block(1)[0]
    for outputs in ([], None):
        f = _one(dict(base, outputs=outputs))
        assert f["log_output_count"] == 0.0
        assert f["dust_output_share"] == 0.0 and f["round_output_share"] == 0.0
        assert f["address_reuse_share"] == 0.0
    f = _one(dict(base, inputs=None))
    assert f["log_input_count"] == 0.0 and f["address_reuse_share"] == 0.0


def test_address_reuse_per_row_with_unknown_addresses() -> None:
    a, b = _block(2)
    a, b = copy.deepcopy(a), copy.deepcopy(b)
    own = a["inputs"][0]["address"]
    a["outputs"] = [dict(a["outputs"][0], address=own), dict(a["outputs"][0], address=None)]
    b["outputs"] = [dict(b["outputs"][0], address=own)]  # a's address, not an input of b
    b["inputs"] = [dict(i, address=None) for i in b["inputs"]]
    m = feature_matrix(table([a, b]))
    assert m[:, COL["address_reuse_share"]].tolist() == [0.5, 0.0]
    # Only null input addresses on both rows: nothing can match.
    c = dict(a, inputs=[dict(i, address=None) for i in a["inputs"]])
    assert _one(c)["address_reuse_share"] == 0.0
    # A null output address never matches a null input address.
    d = dict(c, outputs=[dict(a["outputs"][0], address=None)])
    assert _one(d)["address_reuse_share"] == 0.0


def test_clamps_and_guards_of_the_scalar_features() -> None:
    base = _block(1)[0]
    burnt = _one(dict(base, fee=base["input_value"] * 2))  # a fee above the input: the share stays 1
    assert burnt["fee_share"] == 1.0
    negative = _one(dict(base, fee=-5))
    assert negative["log_fee"] == 0.0 and negative["log_fee_rate"] == 0.0 and negative["fee_share"] == 0.0
    nothing_spent = _one(dict(base, input_value=0))
    assert nothing_spent["fee_share"] == 0.0
    no_size = _one(dict(base, size=0, vsize=0, weight=0))
    assert no_size["witness_share"] == 0.0 and no_size["log_fee_rate"] == 0.0 and no_size["log_vsize"] == 0.0
    inflated = _one(dict(base, weight=base["size"] * 5))  # weight past 4x size: the share is clamped at 0
    assert inflated["witness_share"] == 0.0
    assert _one(dict(base, locktime=1))["locktime_set"] == 1.0
    assert _one(dict(base, locktime=0))["locktime_set"] == 0.0


def test_round_levels_and_zero_values() -> None:
    base = _block(1)[0]
    template = base["outputs"][0]
    rec = dict(base, outputs=[dict(template, value=v) for v in (10_000_000, 1_000_000, 100_000, 0, 123)])
    f = _one(rec)
    assert f["round_output_share"] == pytest.approx(3 / 5)
    assert f["round_output_level"] == pytest.approx((3 + 2 + 1) / 15)


def test_arrow_tables_in_any_column_order_and_frames_keep_their_index() -> None:
    rows = _block(4)
    t = table(rows)
    reordered = t.select(list(reversed(t.column_names)))
    expected = feature_matrix(t)
    assert np.array_equal(feature_matrix(reordered), expected, equal_nan=True)
    exact = t.select(list(INPUT_COLUMNS))
    assert np.array_equal(feature_matrix(exact), expected, equal_nan=True)
    out = compute_features(t)
    assert list(out.index) == [0, 1, 2, 3] and list(out.columns) == FEATURES_FULL
    framed = compute_features(pd.DataFrame(rows, index=[7, 5, 3, 1]))
    assert list(framed.index) == [7, 5, 3, 1]
    assert np.array_equal(framed.to_numpy(), expected, equal_nan=True)
    with pytest.raises(
        KeyError, match=r"compute_features needs canonical columns, missing: \['fee', 'inputs'\]"
    ):
        compute_features(t.drop_columns(["fee", "inputs"]))
    with pytest.raises(KeyError, match=r"missing: \['outputs'\]"):
        feature_matrix(pd.DataFrame(rows).drop(columns=["outputs"]))


def test_transactions_and_dicts_give_the_same_rows() -> None:
    rows = _block(3)
    models = [Transaction.model_validate(r) for r in rows]
    a = features_from_transactions(models)
    b = features_from_transactions(rows)
    c = features_from_transactions([models[0], rows[1], models[2]])
    assert np.array_equal(a.to_numpy(), b.to_numpy(), equal_nan=True)
    assert np.array_equal(a.to_numpy(), c.to_numpy(), equal_nan=True)
    no_prevouts = features_from_transactions([dict(rows[0], fee=None)])
    assert no_prevouts[FEATURES_PREVOUT].isna().all(axis=None)


def test_numeric_columns_and_lists_with_nulls() -> None:
    t = pa.table({"x": pa.array([1, None, 3], pa.int64()), "flag": pa.array([True, None, False])})
    assert np.array_equal(features.numeric_column(t, "x"), [1.0, np.nan, 3.0], equal_nan=True)
    assert np.array_equal(features.numeric_column(t, "flag"), [1.0, np.nan, 0.0], equal_nan=True)
    lists = pa.table(
        {
            "l": pa.chunked_array(
                [pa.array([[1], None], pa.list_(pa.int64())), pa.array([[2, 3]], pa.list_(pa.int64()))]
            )
        }
    )
    col = features.list_column(lists, "l")
    assert col.null_count == 0 and col.to_pylist() == [[1], [], [2, 3]]
    assert features.list_lengths(col).tolist() == [1, 0, 2]


def test_has_prevouts_on_nullable_integer_columns() -> None:
    """Pandas' nullable Int64 (what Arrow gives with nullable types, and the benchmark's frames) reads as NaN."""
    rows = _block(3)
    rows[1]["fee"] = None
    rows[2]["input_value"] = None
    frame = pd.DataFrame(rows).astype({"fee": "Int64", "input_value": "Int64"})
    assert frame["fee"].dtype == "Int64"
    assert has_prevouts(frame).tolist() == [True, False, False]
    np.testing.assert_allclose(market_fee_rates(frame), market_fee_rates(pd.DataFrame(rows)), rtol=0)


def test_an_unknown_coinbase_flag_is_not_a_coinbase() -> None:
    """A row whose ``is_coinbase`` is unknown (None) is read as an ordinary transaction: its fee rate counts
    towards its block's 20 rates. Reading the object column warns nothing (no pandas downcast)."""
    other = _block(400)[100:141]
    for r in other:
        r["block_height"] = 1
    rows = _block(20) + other
    rows[0]["is_coinbase"] = None
    frame = pd.DataFrame(rows)
    assert frame["is_coinbase"].dtype == object
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = market_fee_rates(frame)
    np.testing.assert_allclose(got, plain_market(rows), rtol=1e-12)
    assert got[0] == pytest.approx(statistics.median(r["fee"] / r["vsize"] for r in rows[:20]))


def test_any_positive_size_is_a_rate_and_zero_sizes_warn_nothing() -> None:
    """A size of 1 vB gives a fee rate like any other; a zero size or unknown fee is no rate, decided without
    NumPy's divide-by-zero warnings."""
    rows = _block(20)
    for r in rows:
        r["vsize"] = 1
    assert market_fee_rates(pd.DataFrame(rows))[0] == pytest.approx(statistics.median(r["fee"] for r in rows))
    odd = _block(3)
    odd[0]["vsize"] = 0
    odd[1]["fee"] = None
    odd[2].update(vsize=0, fee=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = market_fee_rates(pd.DataFrame(odd))
    assert np.isnan(got).all()  # no row has a rate
