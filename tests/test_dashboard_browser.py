"""`mergesearch dashboard` in a real browser: headless Debian chromium shows a finished
study, its trials under the objectives' names, and a trial's items artifact."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest

from tests.dashboard_server import free_port, start_dashboard

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    webdriver = None

MISSING = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()] + (
    [] if webdriver else ["the selenium package"])
if MISSING:
    pytest.skip(f"the browser test needs {', '.join(MISSING)}: `make test` installs Debian's "
                "chromium and chromium-driver when run as root with apt-get; selenium comes "
                "with the dev extra (pip install -e '.[dev]')", allow_module_level=True)

STUDY = "ward-merge"
TRIALS = 4  # the three baselines (clinical, instruct, uniform) and one sampled merge
WAIT_S = 30


@pytest.fixture
def study_url(cli, write_spec, tmp_path) -> str:
    """A finished study on the tiny parents, in tmp_path/study.db (artifacts beside it)."""
    code, _, err = cli("launch", write_spec(name=STUDY, budget={"n_trials": TRIALS}),
                       "--no-test")
    assert code == 0, err
    return f"sqlite:///{tmp_path / 'study.db'}"


@pytest.fixture
def dashboard(study_url, tmp_path):
    """The dashboard's base URL, served by `mergesearch dashboard` while the test runs."""
    port = free_port()
    server = start_dashboard(study_url, port, tmp_path / "dashboard.log")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,1000"):
        options.add_argument(flag)
    # the driver's path is given, so Selenium Manager never runs (nothing is downloaded)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)),
                              options=options)
    yield driver
    driver.quit()


def shown(driver, xpath: str, what: str, shots: Path):
    """The first element at `xpath` once the page has rendered it; else fail with the page's
    visible text and a screenshot."""
    try:
        return WebDriverWait(driver, WAIT_S).until(
            expected_conditions.visibility_of_element_located((By.XPATH, xpath)))
    except TimeoutException:
        pass
    shot = shots / (re.sub(r"\W+", "-", what) + ".png")
    driver.save_screenshot(str(shot))
    text = driver.find_element(By.TAG_NAME, "body").text
    pytest.fail(f"{what} is not shown at {driver.current_url} within {WAIT_S} s "
                f"(screenshot {shot}); the page shows:\n{text[:1500]}")


def test_dashboard_shows_the_study_its_named_objectives_and_a_trials_items(
        browser, dashboard, tmp_path):
    # the study list links to the study
    browser.get(f"{dashboard}/dashboard/")
    card = shown(browser, f"//h5[contains(., '{STUDY}')]", "the study's card", tmp_path)
    assert re.fullmatch(rf"\d+\. {STUDY}", card.text), card.text
    card.click()
    WebDriverWait(browser, WAIT_S).until(expected_conditions.url_matches(r"/studies/\d+$"))
    study_id = browser.current_url.rsplit("/", 1)[1]

    # the study page plots the Pareto front over the named objectives, not "Objective 0"
    for axis, name in (("X", "clinical"), ("Y", "instruction")):
        shown(browser, f"//*[normalize-space()='Objective {axis}:']/following::*"
                       f"[@role='combobox'][1][normalize-space()='{name}']",
              f"Pareto front axis {axis} named {name}", tmp_path)

    # the trial table has a column per named objective and a row per trial
    browser.get(f"{dashboard}/dashboard/studies/{study_id}/smartSelection")
    shown(browser, "//tbody/tr", "the trial table", tmp_path)
    headers = [th.text.splitlines()[0] for th in browser.find_elements(By.XPATH, "//thead//th")
               if th.text]
    assert headers[:4] == ["Number", "State", "clinical", "instruction"], headers
    numbers = [td.text for td in browser.find_elements(By.XPATH, "//tbody/tr/td[1]")]
    assert numbers == [str(n) for n in range(TRIALS)], numbers

    # the sampled trial's page lists its dev items, and the download link serves them
    browser.get(f"{dashboard}/dashboard/studies/{study_id}/trials?numbers={TRIALS - 1}")
    shown(browser, f"//*[starts-with(normalize-space(), 'Trial {TRIALS - 1} (trial_id=')]",
          "the trial's heading", tmp_path)
    shown(browser, "//h5[normalize-space()='Artifacts']/following::*"
                   "[normalize-space()='dev-items.jsonl']", "the dev-items.jsonl artifact",
          tmp_path)
    link = browser.find_element(By.XPATH, "//a[@download='dev-items.jsonl']")
    href = link.get_attribute("href")
    with urllib.request.urlopen(href, timeout=10) as response:
        served = response.read()
    stored = tmp_path / "study.artifacts" / href.rsplit("/", 1)[1]
    assert served == stored.read_bytes(), href
    items = [json.loads(line) for line in served.decode().splitlines()]
    assert items and all(item["split"] == "dev" for item in items), items[:2]
