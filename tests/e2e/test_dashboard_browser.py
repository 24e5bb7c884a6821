"""The dashboard in real headless Chromium (Selenium + /usr/bin/chromedriver), served on 127.0.0.1.

The lake holds the bundled sample (5,274 real transactions, first_seen spread over the last hour as the
replay does) scored by the session's champion: a model trained on the sample, registered in a real
MLflow server and promoted by the gate (``champion_settings`` in conftest). Screenshots go to
``artifacts/screenshots/``; with ``UPDATE_DOCS_SCREENSHOTS=1`` (``make screenshots``) the overview is also
copied to ``docs/dashboard.png``, the README's picture.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from btc_anomaly.config import PROJECT_ROOT, Settings
from btc_anomaly.dashboard.app import create_app
from btc_anomaly.dashboard.demo import DemoLake, write_demo_lake
from btc_anomaly.detectors.risk import SEVERITIES
from helpers.dashboard import browser_errors, chromium, screenshot, serve_app

pytestmark = pytest.mark.e2e

WAIT_S = 60
DOCS = PROJECT_ROOT / "docs"


def publish(path: Path, name: str) -> None:
    """``make screenshots``: the browser test's picture becomes the documentation's."""
    if os.environ.get("UPDATE_DOCS_SCREENSHOTS") == "1":
        shutil.copyfile(path, DOCS / name)


@pytest.fixture(scope="module")
def lake(champion_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> DemoLake:
    from btc_anomaly.model.scoring import load_champion

    champion = load_champion(champion_settings)
    return write_demo_lake(tmp_path_factory.mktemp("dash-e2e") / "lake", champion_settings, model=champion)


@pytest.fixture(scope="module")
def settings(champion_settings: Settings, lake: DemoLake) -> Settings:
    return champion_settings.model_copy(
        update={
            "lake_root": lake.root,
            "dashboard_refresh_s": 2.0,
            "dashboard_mlflow_refresh_s": 5.0,
            "dashboard_default_window": "1h",
        }
    )


@pytest.fixture(scope="module")
def url(settings: Settings) -> Iterator[str]:
    app = create_app(settings)
    with serve_app(app) as base:
        yield base
    app.dashboard_state.models.stop()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    with chromium() as d:
        yield d


def wait_for(driver: Any, condition: Callable[[Any], Any], message: str, timeout: float = WAIT_S) -> Any:
    # Live refreshes replace DOM nodes under the test: a stale node means "look again".
    wait = WebDriverWait(
        driver, timeout, poll_frequency=0.25, ignored_exceptions=(StaleElementReferenceException,)
    )
    return wait.until(condition, message)


def text_of(driver: Any, css: str) -> str:
    for _ in range(5):
        try:
            found = driver.find_elements(By.CSS_SELECTOR, css)
            return found[0].text if found else ""
        except StaleElementReferenceException:
            time.sleep(0.1)
    return ""


def kpi_number(driver: Any, name: str) -> int | None:
    text = text_of(driver, f"#kpi-{name} .kpi-value").replace(",", "")
    return int(text) if text.isdigit() else None


def open_overview(driver: Any, url: str) -> None:
    driver.get(url + "/")
    wait_for(driver, lambda d: kpi_number(d, "anomalies") is not None, "anomaly KPI never rendered")


def choose_window(driver: Any, value: str) -> None:
    driver.find_element(By.CSS_SELECTOR, f"#window input[value='{value}']").find_element(
        By.XPATH, "./ancestor::label"
    ).click()


def set_threshold(driver: Any, value: float) -> None:
    box = driver.find_element(By.CSS_SELECTOR, "#threshold input[type='number']")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(f"{value}", Keys.ENTER)
    box.send_keys(Keys.TAB)


def test_every_panel_renders_with_data(driver: Any, url: str, lake: DemoLake, settings: Settings) -> None:
    open_overview(driver, url)
    for graph in ("timeseries", "histogram", "scatter"):
        wait_for(
            driver,
            lambda d, g=graph: d.find_elements(By.CSS_SELECTOR, f"#{g} .main-svg .trace"),
            f"{graph} has no traces",
        )
    wait_for(
        driver,
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#scatter .scatterlayer path.point")) > 1000,
        "scatter points missing",
    )
    n_points = len(driver.find_elements(By.CSS_SELECTOR, "#scatter .scatterlayer path.point"))
    assert n_points <= settings.dashboard_max_points
    assert driver.find_elements(By.CSS_SELECTOR, "#histogram .barlayer .point")
    assert "threshold" in text_of(driver, "#histogram")
    assert "tx / min" in text_of(driver, "#timeseries") and "anomalous %" in text_of(driver, "#timeseries")
    rows = wait_for(
        driver,
        lambda d: d.find_elements(By.CSS_SELECTOR, "#anomalies td[data-dash-column='score']"),
        "anomaly table is empty",
    )
    assert len(rows) == settings.dashboard_page_size
    scores = [float(r.text) for r in rows]
    assert scores == sorted(scores, reverse=True)
    link = driver.find_element(By.CSS_SELECTOR, "#anomalies td[data-dash-column='hash_link'] a")
    assert re.fullmatch(r"https://mempool\.space/tx/[0-9a-f]{64}", link.get_attribute("href"))
    # Champion version and age from MLflow, pipeline freshness from the newest scored row.
    wait_for(driver, lambda d: text_of(d, "#kpi-model .kpi-value").startswith("v"), "no champion KPI")
    assert "age" in text_of(driver, "#kpi-model .kpi-sub")
    assert text_of(driver, "#kpi-freshness .kpi-value") not in ("", "\u2013")
    assert float(text_of(driver, "#kpi-tx .kpi-value").replace(",", "")) > 0
    assert not browser_errors(driver)
    path = screenshot(driver, "dashboard-overview")
    assert path.stat().st_size > 50_000
    publish(path, "dashboard.png")


def test_threshold_slider_relabels_to_the_count_the_data_implies(
    driver: Any, url: str, lake: DemoLake
) -> None:
    open_overview(driver, url)
    choose_window(driver, "all")
    scores = lake.scored["anomaly_score"]
    model_count = int(lake.scored["is_anomaly"].sum())
    wait_for(driver, lambda d: kpi_number(d, "anomalies") == model_count, "model-threshold count never shown")

    set_threshold(driver, 0.95)
    expected = int((scores > 0.95).sum())
    assert expected != model_count
    wait_for(
        driver,
        lambda d: kpi_number(d, "anomalies") == expected,
        f"anomaly KPI never became {expected} (shows {kpi_number(driver, 'anomalies')})",
    )
    assert "0.9500" in text_of(driver, "#threshold-label")
    assert f"{expected:,} anomalies" in text_of(driver, "#table-caption")

    # Keyboard on the slider handle: whatever value it lands on, the count is the data's count there.
    thumb = driver.find_element(By.CSS_SELECTOR, "#threshold [role='slider']")
    thumb.click()
    for _ in range(6):
        thumb.send_keys(Keys.ARROW_RIGHT)
    wait_for(driver, lambda d: text_of(d, "#threshold-label") not in ("", "0.9500"), "slider did not move")
    time.sleep(1.0)  # let the refresh of the last key press land
    shown = float(text_of(driver, "#threshold-label").split()[0])
    assert shown > 0.95
    expected = int((scores > shown).sum())
    wait_for(driver, lambda d: kpi_number(d, "anomalies") == expected, f"count at {shown} is not {expected}")
    screenshot(driver, "dashboard-threshold")

    driver.find_element(By.ID, "threshold-reset").click()
    wait_for(
        driver, lambda d: kpi_number(d, "anomalies") == model_count, "reset to the model threshold failed"
    )
    assert "(model)" in text_of(driver, "#threshold-label")


def choose_severity(driver: Any, label: str) -> None:
    driver.find_element(By.ID, "severity-filter").click()
    option = wait_for(
        driver,
        lambda d: next(
            (o for o in d.find_elements(By.CSS_SELECTOR, "[role='option']") if o.text == label), None
        ),
        f"the severity dropdown has no option {label!r}",
    )
    option.click()


def test_severity_dropdown_filters_the_table(driver: Any, url: str, lake: DemoLake) -> None:
    open_overview(driver, url)
    choose_window(driver, "all")
    anomalies = int(lake.scored["is_anomaly"].sum())
    wait_for(
        driver, lambda d: text_of(d, "#table-caption").startswith(f"{anomalies:,} anomalies"), "no caption"
    )
    # Independent counts: pandas over the scored frame, severities in their documented order.
    rank = lake.scored["severity"].map({s: i for i, s in enumerate(SEVERITIES)})
    counts = {s: int((rank >= SEVERITIES.index(s)).sum()) for s in ("medium", "high", "severe")}
    assert counts["medium"] > counts["high"] > 0, counts  # the sample has something to filter
    for value, label in (("high", "risk: high or above"), ("medium", "risk: medium or above")):
        choose_severity(driver, label)
        caption = f"{counts[value]:,} transactions of severity {value} or above"
        wait_for(
            driver,
            lambda d, c=caption: text_of(d, "#table-caption").startswith(c),
            f"caption never became {caption!r} (shows {text_of(driver, '#table-caption')!r})",
        )
        shown = [
            c.text
            for c in driver.find_elements(By.CSS_SELECTOR, "#anomalies td[data-dash-column='severity']")
        ]
        assert shown and all(SEVERITIES.index(s) >= SEVERITIES.index(value) for s in shown), shown
    screenshot(driver, "dashboard-severity")
    choose_severity(driver, "forest anomalies")
    wait_for(
        driver,
        lambda d: text_of(d, "#table-caption").startswith(f"{anomalies:,} anomalies"),
        "back to the forest's anomalies failed",
    )


def test_row_click_opens_the_transaction_detail(driver: Any, url: str, lake: DemoLake) -> None:
    open_overview(driver, url)
    cell = wait_for(
        driver,
        lambda d: d.find_elements(By.CSS_SELECTOR, "#anomalies td[data-dash-column='score']"),
        "no table rows",
    )[2]
    row = cell.find_element(By.XPATH, "./ancestor::tr")
    tx_hash = (
        row.find_element(By.CSS_SELECTOR, "td[data-dash-column='hash_link'] a")
        .get_attribute("href")
        .rsplit("/", 1)[1]
    )
    cell.click()
    wait_for(driver, lambda d: text_of(d, "#detail-hash") == tx_hash, "detail panel did not open")
    detail = text_of(driver, "#detail")
    tx = lake.transactions.set_index("hash").loc[tx_hash]
    assert f"Inputs ({tx['input_count']:,})" in detail and f"Outputs ({tx['output_count']:,})" in detail
    scored = lake.scored.set_index("hash").loc[tx_hash]
    assert "Why it was flagged" in detail
    for reason in scored["reasons"]:
        assert reason in detail
    assert f"{scored['anomaly_score']:.4f}" in detail
    screenshot(driver, "dashboard-detail")


def test_scatter_point_click_opens_the_transaction_detail(driver: Any, url: str, lake: DemoLake) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    open_overview(driver, url)
    points = wait_for(
        driver,
        lambda d: d.find_elements(By.CSS_SELECTOR, "#scatter .scatterlayer .trace:last-child path.point"),
        "no anomalous points",
    )
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", points[0])
    ActionChains(driver).move_to_element(points[0]).pause(0.5).click().perform()
    wait_for(driver, lambda d: re.fullmatch(r"[0-9a-f]{64}", text_of(d, "#detail-hash")), "no detail opened")
    tx_hash = text_of(driver, "#detail-hash")
    assert bool(lake.scored.set_index("hash").loc[tx_hash, "is_anomaly"])  # a red point is an anomaly
    assert "Why it was flagged" in text_of(driver, "#detail")


def test_model_page_lists_versions_and_promotions(driver: Any, url: str, settings: Settings) -> None:
    open_overview(driver, url)
    driver.find_element(By.ID, "nav-model").click()
    wait_for(driver, lambda d: "Champion v" in text_of(d, "#model-champion"), "champion not shown")
    wait_for(driver, lambda d: "champion" in text_of(d, "#versions"), "versions table without the champion")
    versions = text_of(driver, "#versions")
    assert "rows" in versions.lower() and "5,274" in versions
    wait_for(driver, lambda d: "promoted" in text_of(d, "#history"), "no promotion in the history")
    assert "pytest@session" in text_of(driver, "#history")
    assert driver.find_elements(By.CSS_SELECTOR, "#model-metrics .main-svg .trace")
    assert not driver.find_element(By.ID, "page-overview").is_displayed()
    screenshot(driver, "dashboard-model")
    driver.find_element(By.ID, "nav-overview").click()
    wait_for(
        driver, lambda d: d.find_element(By.ID, "page-overview").is_displayed(), "overview did not come back"
    )


def test_empty_lake_shows_waiting_for_data(driver: Any, tmp_path: Path, settings: Settings) -> None:
    empty = settings.model_copy(update={"lake_root": tmp_path / "no-lake-yet"})
    app = create_app(empty)
    with serve_app(app) as base:
        driver.get(base + "/")
        wait_for(driver, lambda d: "Waiting for data" in text_of(d, "#banner-waiting"), "no waiting banner")
        wait_for(
            driver, lambda d: "Waiting for data" in text_of(d, "#scatter"), "scatter not in waiting state"
        )
        assert "Waiting for data" in text_of(driver, "#timeseries")
        assert "Waiting for data" in text_of(driver, "#table-caption")
        assert not browser_errors(driver)
        screenshot(driver, "dashboard-empty")
    app.dashboard_state.models.stop()  # type: ignore[attr-defined]
