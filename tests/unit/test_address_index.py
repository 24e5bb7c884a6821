"""tables.address_rows / address_key: the rows of ``address_index`` derived from transactions, checked
against a pandas computation over the bundled sample's transactions."""

from __future__ import annotations

import hashlib

import pandas as pd
import pyarrow as pa

from btc_anomaly.dashboard.demo import sample_transactions
from btc_anomaly.processing import tables


def _expected(transactions: pa.Table) -> pd.DataFrame:
    rows = []
    for tx in transactions.select(["hash", "inputs", "outputs"]).to_pylist():
        for side in ("inputs", "outputs"):
            for io in tx[side]:
                if io["address"] is not None:
                    rows.append(
                        {"address": io["address"], "hash": tx["hash"], "side": side[:-1], "v": io["value"]}
                    )
    frame = pd.DataFrame(rows)
    out = frame.groupby(["address", "hash"]).agg(
        side=("side", lambda s: "both" if s.nunique() == 2 else s.iloc[0]),
        value=("v", lambda v: int(v.fillna(0).sum())),
    )
    return out.reset_index().sort_values(["address", "hash"]).reset_index(drop=True)


def test_address_rows_are_one_per_address_and_transaction() -> None:
    transactions = sample_transactions()
    rows = tables.address_rows(transactions)
    got = rows.select(["address", "hash", "side", "value"]).to_pandas()
    got = got.sort_values(["address", "hash"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, _expected(transactions), check_dtype=False)
    assert {"both", "input", "output"} <= set(got["side"])  # the sample has all three
    seen = dict(zip(transactions["hash"].to_pylist(), transactions["first_seen"].to_pylist(), strict=True))
    assert rows["first_seen"].to_pylist() == [seen[h] for h in rows["hash"].to_pylist()]
    assert rows.schema == pa.schema([tables.address_index_schema().field(n) for n in rows.column_names])


def test_one_address_and_no_rows() -> None:
    transactions = sample_transactions()
    everything = tables.address_rows(transactions).to_pandas()
    address = everything["address"].value_counts().index[0]  # the busiest: several transactions
    one = tables.address_rows(transactions, address).to_pandas()
    expected = everything[everything["address"] == address]
    assert len(one) > 1
    assert sorted(one["hash"]) == sorted(expected["hash"])
    assert tables.address_rows(transactions, "1BoatSLRHtKNngkdXEeobR76b53LETtpyT").num_rows == 0
    assert tables.address_rows(transactions.slice(0, 0)).num_rows == 0


def test_address_key_is_the_first_60_bits_of_sha256() -> None:
    address = "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq"
    assert tables.address_key(address) == int(hashlib.sha256(address.encode()).hexdigest()[:15], 16)
    assert 0 <= tables.address_key(address) < 2**60
    keys = tables.address_rows(sample_transactions())["address_key"].to_pylist()
    assert all(0 <= k < 2**60 for k in keys)
