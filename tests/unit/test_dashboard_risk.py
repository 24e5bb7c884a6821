"""The dashboard's anomalies table shows the risk score and severity and filters by severity; tables written
before the detectors (no risk_score column) still load."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from deltalake import write_deltalake

from btc_anomaly.config import Settings
from btc_anomaly.dashboard import data
from btc_anomaly.dashboard.demo import DemoLake, fit_model, sample_transactions, write_demo_lake
from btc_anomaly.dashboard.lake import ScoredCache
from btc_anomaly.dashboard.layout import TABLE_COLUMNS
from btc_anomaly.model.scoring import RISK_COLUMNS

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
OFAC_SPENDER = "dbf58d5997f746c1b28d0466d0981d27d8dd1b3b75cc1fd64fa8803d3f94afe1"


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> DemoLake:
    model = fit_model(sample_transactions().to_pandas(), Settings())
    return write_demo_lake(
        tmp_path_factory.mktemp("risk-lake"), model=model, start=NOW - dt.timedelta(hours=2), end=NOW
    )


def _selection(path: Path) -> data.Selection:
    snap = ScoredCache(path, max_rows=1_000_000).ensure(None)
    return data.select(snap, data.Filters(window="all"), NOW)


def test_table_rows_carry_risk_and_severity(lake: DemoLake) -> None:
    assert {"risk", "severity"} <= {c["id"] for c in TABLE_COLUMNS}
    sel = _selection(lake.scored_path)
    page = data.anomalies_page(sel, sort_by="risk", page_size=10)
    risks = [r["risk"] for r in page.rows]
    assert risks == sorted(risks, reverse=True) and all(r is not None for r in risks)
    scored = lake.scored.set_index("hash")
    for r in page.rows:
        assert r["risk"] == pytest.approx(scored.loc[r["hash"], "risk_score"])
        assert r["severity"] == scored.loc[r["hash"], "severity"]


def test_severity_filter_lists_risky_rows_even_when_the_forest_did_not_flag_them(lake: DemoLake) -> None:
    sel = _selection(lake.scored_path)
    severe = data.anomalies_page(sel, min_severity="severe", page_size=100)
    expected = lake.scored[lake.scored["severity"] == "severe"]
    assert severe.total == len(expected) >= 1
    assert {r["severity"] for r in severe.rows} == {"severe"}
    assert OFAC_SPENDER in {r["hash"] for r in severe.rows}
    high = data.anomalies_page(sel, min_severity="high", page_size=100)
    assert high.total == int(lake.scored["severity"].isin(["high", "severe"]).sum())


def test_a_table_without_risk_columns_still_loads(tmp_path: Path, lake: DemoLake) -> None:
    old = lake.scored.drop(columns=list(RISK_COLUMNS))
    path = tmp_path / "scored_transactions"
    write_deltalake(str(path), pa.Table.from_pandas(old, preserve_index=False))
    sel = _selection(path)
    assert sel.n == len(old) and np.isnan(sel.risk).all()
    page = data.anomalies_page(sel, page_size=5)
    assert page.total > 0 and all(r["risk"] is None and r["severity"] is None for r in page.rows)
    assert data.anomalies_page(sel, min_severity="medium").total == 0


def test_detail_panel_names_the_detectors_findings(tmp_path: Path, lake: DemoLake) -> None:
    from btc_anomaly.dashboard.views import DashboardState, render_detail

    state = DashboardState.from_settings(
        Settings(lake_root=lake.root, state_dir=tmp_path, mlflow_tracking_uri="http://127.0.0.1:9")
    )
    text = str(render_detail(state, OFAC_SPENDER, None))
    assert "severe" in text and "watchlist ofac_sdn: spends from 3HqA7i3ttECLvgqvq69HNxxUP5BL7Z5YgA" in text
