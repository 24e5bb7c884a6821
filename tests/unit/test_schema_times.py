"""`schema.utc_times`: every first_seen form a batch can carry, each read at its own offset.

Expectations come from ``datetime.fromisoformat`` element by element (naive = UTC, the schema's rule),
not from pandas, whose vectorised ISO 8601 parser reads a naive string after an offset one at that offset.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd

from btc_anomaly.features import MARKET_MIN_ROWS, MARKET_WINDOW, market_fee_rates
from btc_anomaly.schema import utc_times

MIXED = [
    "2024-03-01T12:00:00-05:00",
    "2024-03-01T12:03:07",
    "2024-03-01T12:03:07.250Z",
    "2024-03-01T12:03:07+05:45",
    "2024-03-01 12:03:07.123456",
    "2024-03-01T12:03:07+0100",
]


def _expected(text: str) -> pd.Timestamp:
    parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return pd.Timestamp(parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)).tz_convert("UTC")


def test_each_string_is_read_at_its_own_offset_in_any_order() -> None:
    for order in (MIXED, MIXED[::-1]):
        assert utc_times(pd.Series(order)).tolist() == [_expected(t) for t in order]


def test_datetimes_timestamps_and_missing_values() -> None:
    aware = dt.datetime(2024, 3, 1, 17, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    naive = dt.datetime(2024, 3, 1, 12, 3, 7)
    got = utc_times(pd.Series([aware, naive, None, pd.Timestamp("2024-03-01T01:02:03Z")], dtype=object))
    assert got.iloc[0] == pd.Timestamp("2024-03-01T15:00:00Z")
    assert got.iloc[1] == pd.Timestamp("2024-03-01T12:03:07Z")
    assert pd.isna(got.iloc[2])
    assert got.iloc[3] == pd.Timestamp("2024-03-01T01:02:03Z")


def test_a_datetime64_column_keeps_its_index() -> None:
    column = pd.Series(pd.to_datetime(["2024-03-01T12:00:00"]).as_unit("us"), index=[7])
    got = utc_times(column)
    assert list(got.index) == [7]
    assert got.iloc[0] == pd.Timestamp("2024-03-01T12:00:00Z")


def test_unconfirmed_rows_of_a_mixed_batch_share_their_true_fee_market_window() -> None:
    """Rows seen in the same minute, half written with a -05:00 offset (fee rate 10 sat/vB), half naive
    (30 sat/vB): one market window, median 20, for every row. Read at the wrong offset, the naive half
    would form a window of its own five hours later (10 and 30)."""
    k = MARKET_MIN_ROWS
    first_seen = ["2024-03-01T07:00:30-05:00"] * k + ["2024-03-01T12:00:40"] * k
    assert len({_expected(t).floor(MARKET_WINDOW) for t in first_seen}) == 1  # the test's own premise
    frame = pd.DataFrame(
        {
            "fee": [1_000] * k + [3_000] * k,
            "vsize": [100] * (2 * k),
            "block_height": [None] * (2 * k),
            "first_seen": first_seen,
        }
    )
    np.testing.assert_array_equal(market_fee_rates(frame), np.full(2 * k, 20.0))
