"""features.compute_features: one definition, identical from every input path, checked against a plain
per-transaction reimplementation on real sample transactions."""

from __future__ import annotations

import gzip
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from btc_anomaly.config import PROJECT_ROOT
from btc_anomaly.features import (
    DUST_LIMIT_SAT,
    FEATURE_SPECS,
    FEATURES_FULL,
    FEATURES_PREVOUT,
    FEATURES_STRUCTURAL,
    INPUT_COLUMNS,
    SCRIPT_GROUPS,
    SPECS,
    compute_features,
    features_from_transactions,
    has_prevouts,
)
from btc_anomaly.ingestion.decode import decode_transaction
from btc_anomaly.schema import Transaction, arrow_schema

SAMPLE = PROJECT_ROOT / "data" / "sample" / "transactions.jsonl.gz"
HEX = Path(__file__).resolve().parents[1] / "fixtures" / "example_tx_15e10745.hex"


@lru_cache(maxsize=1)
def _records() -> tuple[dict, ...]:
    return tuple(orjson.loads(line) for line in gzip.decompress(SAMPLE.read_bytes()).splitlines())


@lru_cache(maxsize=1)
def _transactions() -> tuple[Transaction, ...]:
    return tuple(Transaction.model_validate(r) for r in _records())


def _assert_same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns) == FEATURES_FULL
    assert a.shape == b.shape
    assert np.array_equal(a.to_numpy(), b.to_numpy(), equal_nan=True)


def test_feature_lists_and_docs() -> None:
    assert FEATURES_FULL == FEATURES_STRUCTURAL + FEATURES_PREVOUT
    assert len(set(FEATURES_FULL)) == len(FEATURES_FULL) == len(FEATURE_SPECS)
    assert set(FEATURES_PREVOUT) == {s.name for s in FEATURE_SPECS if s.needs_prevouts}
    for spec in FEATURE_SPECS:
        assert spec.doc and spec.label and spec.kind in ("log1p", "linear", "share", "flag")


def test_three_paths_give_identical_features(tmp_path: Path) -> None:
    """List of Transaction, the sample's pandas frame (JSON dicts) and a frame read back from Delta."""
    from_objects = features_from_transactions(_transactions())
    from_json_frame = compute_features(pd.DataFrame(list(_records())))

    table = pa.Table.from_pylist([t.model_dump() for t in _transactions()], schema=arrow_schema())
    write_deltalake(str(tmp_path / "transactions"), table)
    from_delta = DeltaTable(str(tmp_path / "transactions")).to_pyarrow_table().to_pandas()
    # Delta hands back nested lists as NumPy arrays of dicts: the shape Spark's Arrow path produces too.
    assert isinstance(from_delta["outputs"].iloc[0], np.ndarray)
    from_delta_frame = compute_features(from_delta)

    _assert_same(from_objects, from_json_frame)
    _assert_same(from_objects, from_delta_frame)
    _assert_same(from_objects, compute_features(table))
    assert len(from_objects) == len(_records())


def test_dicts_and_pandas_index_are_kept() -> None:
    records = list(_records()[:50])
    df = pd.DataFrame(records, index=range(100, 150))
    out = compute_features(df)
    assert list(out.index) == list(range(100, 150))
    _assert_same(out.reset_index(drop=True), features_from_transactions(records))
    assert all(out[c].dtype == np.float64 for c in out.columns)


def _reference(tx: dict) -> dict[str, float]:
    """The features of one transaction, written out plainly (the specification the vector code must meet)."""
    outs, ins = tx["outputs"], tx["inputs"]
    values = [o["value"] for o in outs]
    total = sum(values)
    n_out = max(len(outs), 1)
    f: dict[str, float] = {}
    f["log_vsize"] = math.log1p(tx["vsize"])
    f["witness_share"] = min(max((4 * tx["size"] - tx["weight"]) / (3 * tx["size"]), 0.0), 1.0)
    f["is_segwit"] = float(tx["is_segwit"])
    f["rbf"] = float(tx["rbf"])
    f["locktime_set"] = float(tx["locktime"] > 0)
    f["has_op_return"] = float(tx["has_op_return"])
    f["log_input_count"] = math.log1p(len(ins))
    f["log_output_count"] = math.log1p(len(outs))
    f["log_output_value"] = math.log1p(tx["output_value"])
    top = [*sorted(values, reverse=True), 0, 0]
    f["output_max_share"] = top[0] / total if total else 0.0
    f["output_hhi"] = sum((v / total) ** 2 for v in values) if total else 0.0
    f["value_change_ratio"] = top[1] / top[0] if top[0] else 0.0
    dust = sum(1 for o in outs if o["value"] < DUST_LIMIT_SAT and o["script_type"] != "nulldata")
    f["log_dust_output_count"] = math.log1p(dust)
    f["log_nulldata_output_count"] = math.log1p(sum(1 for o in outs if o["script_type"] == "nulldata"))
    f["dust_output_share"] = dust / n_out
    levels = [sum(v > 0 and v % u == 0 for u in (100_000, 1_000_000, 10_000_000)) for v in values]
    f["round_output_share"] = sum(lv > 0 for lv in levels) / n_out
    f["round_output_level"] = sum(levels) / (3 * n_out)
    for group, names in SCRIPT_GROUPS.items():
        if group == "nonstandard":
            known = {n for g, ns in SCRIPT_GROUPS.items() if g != "nonstandard" for n in ns}
            count = sum(o["script_type"] not in known for o in outs)
        else:
            count = sum(o["script_type"] in names for o in outs)
        f[f"out_share_{group}"] = count / n_out
    if tx["fee"] is None or tx["input_value"] is None:
        f.update(dict.fromkeys(FEATURES_PREVOUT, math.nan))
        return f
    fee, vin = tx["fee"], tx["input_value"]
    f["log_fee_rate"] = math.log1p(fee / tx["vsize"])
    f["log_fee"] = math.log1p(fee)
    f["log_input_value"] = math.log1p(vin)
    f["fee_share"] = fee / vin if vin else 0.0
    in_addrs = {i["address"] for i in ins if i["address"] is not None}
    f["address_reuse_share"] = sum(o["address"] in in_addrs for o in outs if o["address"]) / n_out
    return f


def test_matches_plain_reimplementation_on_real_transactions() -> None:
    records = list(_records())
    # Every 10th transaction plus the extremes (largest fan-in/out, coinbases, OP_RETURNs) of the sample.
    picked = records[::10]
    picked += sorted(records, key=lambda t: len(t["outputs"]))[-3:]
    picked += sorted(records, key=lambda t: len(t["inputs"]))[-3:]
    picked += [t for t in records if t["is_coinbase"] or t["has_op_return"]][:40]
    got = features_from_transactions(picked)
    want = pd.DataFrame([_reference(t) for t in picked])[FEATURES_FULL]
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-12, atol=1e-12, equal_nan=True)


def test_transaction_without_prevouts_gets_structural_features() -> None:
    """A raw hex transaction decoded without a prevout lookup: prevout features NaN, the rest defined."""
    tx = decode_transaction(HEX.read_text())
    assert tx.fee is None and tx.input_value is None
    f = features_from_transactions([tx])
    assert not has_prevouts(pd.DataFrame([tx.model_dump()]))[0]
    assert f[FEATURES_PREVOUT].isna().all(axis=None)
    assert f[FEATURES_STRUCTURAL].notna().all(axis=None)
    assert f.loc[0, "log_output_count"] == pytest.approx(math.log1p(4))
    assert f.loc[0, "log_output_value"] == pytest.approx(math.log1p(6_013_440_000))


def test_coinbase_has_no_prevout_features() -> None:
    coinbase = next(t for t in _records() if t["is_coinbase"])
    f = features_from_transactions([coinbase])
    assert f[FEATURES_PREVOUT].isna().all(axis=None)
    assert f[FEATURES_STRUCTURAL].notna().all(axis=None)


def test_known_transactions() -> None:
    by_hash = {t["hash"]: t for t in _records()}
    burn = by_hash["eb4d2def800c4993928a6f8cc3dd350933a1fb71e6706902025f29a061e5547f"]  # OP_RETURN only
    fan_out = by_hash["1a37b544476a1928356e20a35156a1ff0c105e9218abb301431ebe31630d5286"]  # 1,109 outputs
    f = features_from_transactions([burn, fan_out])
    assert f.loc[0, "has_op_return"] == 1.0
    assert f.loc[0, "out_share_nulldata"] == 1.0
    assert f.loc[0, "fee_share"] == 1.0
    assert f.loc[1, "log_output_count"] == pytest.approx(math.log1p(1109))
    assert f.loc[1, "output_hhi"] < 0.2


def test_empty_and_missing_columns() -> None:
    empty = compute_features(pd.DataFrame(list(_records()[:1])).iloc[:0])
    assert list(empty.columns) == FEATURES_FULL and len(empty) == 0
    with pytest.raises(KeyError, match="outputs"):
        compute_features(pd.DataFrame(list(_records()[:2])).drop(columns=["outputs"]))


def test_every_feature_has_a_spec() -> None:
    assert set(SPECS) == set(FEATURES_FULL)


def _null_script_records() -> tuple[list[dict], list[dict]]:
    """Real transactions with mixed output script types, each with one output's script type left null:
    (records with None, the same records with the schema's default "nonstandard")."""
    picked = [
        r
        for r in _records()
        if len({o["script_type"] for o in r["outputs"]}) > 1
        and r["outputs"][0]["script_type"] != "nonstandard"
    ][:20]
    assert len(picked) == 20
    with_none, with_default = [], []
    for r in picked:
        a = orjson.loads(orjson.dumps(r))
        b = orjson.loads(orjson.dumps(r))
        a["outputs"][-1]["script_type"] = None
        a["inputs"][0]["script_type"] = None
        b["outputs"][-1]["script_type"] = "nonstandard"
        b["inputs"][0]["script_type"] = "unknown"
        with_none.append(a)
        with_default.append(b)
    return with_none, with_default


def test_null_script_type_counts_as_the_schema_default() -> None:
    """Regression: a null script type was grouped with the dictionary's first script type (e.g. legacy)."""
    with_none, with_default = _null_script_records()
    expected = features_from_transactions(with_default)
    assert expected["out_share_nonstandard"].gt(0).all()
    schema = pa.schema([arrow_schema().field(c) for c in INPUT_COLUMNS])
    paths = {
        "dicts": features_from_transactions(with_none),
        "pandas": compute_features(pd.DataFrame(with_none)),
        "arrow": compute_features(pa.Table.from_pylist(with_none, schema=schema)),
        # a missing key reads as null too
        "missing key": features_from_transactions(
            [
                dict(r, outputs=[{k: v for k, v in o.items() if v is not None} for o in r["outputs"]])
                for r in with_none
            ]
        ),
    }
    for name, got in paths.items():
        pd.testing.assert_frame_equal(got, expected, check_exact=True, obj=name)


def test_null_script_type_in_a_chunked_column_and_alone() -> None:
    with_none, with_default = _null_script_records()
    schema = pa.schema([arrow_schema().field(c) for c in INPUT_COLUMNS])
    chunked = pa.concat_tables(
        [
            pa.Table.from_pylist(with_none[:7], schema=schema),
            pa.Table.from_pylist(with_none[7:], schema=schema),
        ]
    )
    pd.testing.assert_frame_equal(compute_features(chunked), features_from_transactions(with_default))
    only_null = orjson.loads(orjson.dumps(with_none[0]))
    for o in only_null["outputs"]:
        o["script_type"] = None
    got = features_from_transactions([only_null])
    assert got["out_share_nonstandard"].iloc[0] == 1.0
