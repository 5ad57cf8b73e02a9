"""The live view at ``/ui``: its static files, and the page driven in headless Chromium against a live server
(with an admin key, entered in the page, and alert rules that queue the desperate prompt for review).

The browser test needs the system Chromium and its driver (Debian packages ``chromium`` and
``chromium-driver``, installed by ``scripts/setup --test``); without them it fails rather than skips, as the
tests that need redis-server do.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, running_limbic
from test_api import DESPERATE, MODEL

STATIC = ROOT / "service" / "ui" / "static"
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SETUP_HINT = "run scripts/setup --test"

# The suite's test thresholds, with the review action: the desperate prompt raises an alert (prompt phase at
# least) and its request is queued for review when the generation ends.
UI_ALERT_RULES = json.dumps(
    {"desperate": {"warning": 1.5, "critical": 3.0, "min_tokens": 2, "action": "review"}}, separators=(",", ":")
)
MAX_TOKENS = 24
# The server takes keys, so the page's key input is exercised: an admin key, as the review panels need one.
ADMIN_KEY = "ui-test-admin-key"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
# Element ids the page promises (tests and users' scripts select by them).
IDS = [
    "message",
    "send",
    "emotion",
    "timeline",
    "alerts",
    "actions",
    "finish",
    "conversation-id",
    "new-conversation",
    "api-key",
    "trajectory",
    "turns",
    "flagged",
    "reviews",
    "server-alerts",
    "error",
    "max-tokens",
]


# ---------------------------------------------------------------------------------------------------------
# Static files (no browser, no model)


@pytest.fixture(scope="module")
def static_client():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from limbic.service import ui

    app = FastAPI()
    ui.mount(app)
    with TestClient(app) as client:
        yield client


def test_static_files_are_served_with_their_types(static_client):
    redirect = static_client.get("/ui", follow_redirects=False)
    assert redirect.status_code in (301, 302, 307, 308) and redirect.headers["location"].endswith("/ui/")
    page = static_client.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for path, kind in (("/ui/app.js", "javascript"), ("/ui/style.css", "text/css")):
        response = static_client.get(path)
        assert response.status_code == 200, path
        assert kind in response.headers["content-type"], (path, response.headers["content-type"])
        assert response.text == (STATIC / path.removeprefix("/ui/")).read_text()
    assert static_client.get("/ui/missing.js").status_code == 404


def test_page_references_nothing_outside_limbic(static_client):
    html = static_client.get("/ui/").text
    refs = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]+)""", html, flags=re.IGNORECASE)
    assert {"app.js", "style.css"} <= set(refs)
    external = [r for r in refs if re.match(r"(?i)([a-z][a-z0-9+.-]*:)?//", r)]
    assert not external, f"external references in index.html: {external}"
    assert not re.search(r"(?i)https?://", html)
    for name in IDS:
        assert f'id="{name}"' in html, name
    css = (STATIC / "style.css").read_text()
    assert "@import" not in css and not re.search(r"(?i)url\(\s*['\"]?(https?:)?//", css)
    js = (STATIC / "app.js").read_text()
    # The only absolute URL in the script is SVG's namespace name (never fetched).
    assert set(re.findall(r"https?://[^\s\"'`)]+", js)) <= {"http://www.w3.org/2000/svg"}
    # Server data reaches the page as text, never as markup.
    assert "innerHTML" not in js and "outerHTML" not in js and "insertAdjacentHTML" not in js


# ---------------------------------------------------------------------------------------------------------
# The page in Chromium against a live server


@pytest.fixture(scope="module")
def ui_limbic(redis_url: str, default_model_path: Path) -> Iterator[str]:
    env = {"REDIS_URL": redis_url, "LIMBIC_ALERT_RULES": UI_ALERT_RULES, "LIMBIC_ADMIN_KEYS": ADMIN_KEY}
    with running_limbic(env) as url:
        yield url


@pytest.fixture()
def browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not installed (Debian chromium, chromium-driver): {SETUP_HINT}")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"selenium is not installed: {SETUP_HINT}")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_window_size(1400, 1000)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, timeout: float, what: str):
    """Polls ``condition(driver)`` until it is truthy; fails naming ``what`` (and any error the page shows)."""
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition(driver)
        except StaleElementReferenceException:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            shown = driver.execute_script(
                "const e = document.getElementById('error'); return e.hidden ? '' : e.textContent.trim();"
            )
            shown = f"; the page shows: {shown}" if shown else ""
            pytest.fail(f"timed out after {timeout}s waiting for {what}{shown}")
        time.sleep(0.2)


def count(driver, selector: str) -> int:
    return driver.execute_script("return document.querySelectorAll(arguments[0]).length;", selector)


def token_backgrounds(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#reply .token'), s => getComputedStyle(s).backgroundColor);"
    )


@pytest.mark.slow
def test_live_view_streams_scores_alerts_trajectory_and_reviews(ui_limbic: str, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    driver = browser
    driver.get(f"{ui_limbic}/ui/")
    # Without a key the page loads (static files are open) and says the API wants one.
    wait_for(driver, lambda d: d.find_element(By.ID, "error").is_displayed(), 15, "the missing key's error")
    assert "API key" in driver.find_element(By.ID, "error-text").text
    unauthorised = driver.get_log("browser")  # also drains the log: the console check below covers what follows
    assert all(" 401 " in e["message"] for e in unauthorised if e["level"] == "SEVERE"), unauthorised
    key = driver.find_element(By.ID, "api-key")
    key.send_keys(ADMIN_KEY, Keys.TAB)
    wait_for(driver, lambda d: d.find_element(By.ID, "model").text == MODEL, 30, "the model name")
    assert not driver.find_element(By.ID, "error").is_displayed(), driver.find_element(By.ID, "error").text
    assert driver.execute_script("return sessionStorage.getItem('limbic.apiKey');") == ADMIN_KEY
    conversation = driver.find_element(By.ID, "conversation-id").get_attribute("value")
    assert conversation

    max_tokens = driver.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys(str(MAX_TOKENS))
    driver.find_element(By.ID, "message").send_keys(DESPERATE)
    driver.find_element(By.ID, "send").click()

    # The reply streams in as tokens coloured by their desperate score, and ends with a finish reason.
    finish = wait_for(
        driver,
        lambda d: (text := d.find_element(By.ID, "finish").text) not in ("", "–", "…") and text,
        180,
        "the reply's finish reason",
    )
    assert not driver.find_element(By.ID, "error").is_displayed(), driver.find_element(By.ID, "error").text
    assert finish in ("stop", "length"), finish
    spans = driver.find_elements(By.CSS_SELECTOR, "#reply .token")
    assert 1 <= len(spans) <= MAX_TOKENS
    indices = [int(s.get_attribute("data-index")) for s in spans]
    assert indices == sorted(indices) and len(set(indices)) == len(indices)
    scores = [json.loads(s.get_attribute("data-scores")) for s in spans]
    assert any(scores)
    assert all({"desperate", "panicked", "calm"} <= set(s) for s in scores if s)
    assert "".join(s.text for s in spans).strip(), "the reply's tokens carry no text"
    desperate = token_backgrounds(driver)
    assert len(set(desperate)) > 1, f"every token has the same background: {desperate[0]}"
    title = spans[-1].get_attribute("title")
    assert "desperate" in title and "calm" in title

    # Colouring by another emotion repaints the tokens.
    Select(driver.find_element(By.ID, "emotion")).select_by_value("calm")
    assert token_backgrounds(driver) != desperate
    Select(driver.find_element(By.ID, "emotion")).select_by_value("desperate")

    # The timeline has a line per headline emotion, a point per scored token.
    scored = sum(1 for s in scores if s)
    points = lambda d: int(d.find_element(By.ID, "timeline").get_attribute("data-points"))  # noqa: E731
    wait_for(driver, lambda d: points(d) == scored, 5, f"{scored} points on the timeline")
    if len(spans) > 1:
        assert count(driver, "#timeline svg polyline.series") == 3

    # The alert arrived with the stream; the review action is listed.
    wait_for(driver, lambda d: count(d, "#alerts .alert") >= 1, 10, "an alert in #alerts")
    alert = driver.find_element(By.CSS_SELECTOR, "#alerts .alert")
    alert_id = alert.get_attribute("data-id")
    assert "desperate" in alert.text and alert_id
    assert count(driver, '#actions [data-action="review"]') >= 1

    # The conversation's trajectory holds this one turn; the conversation is flagged.
    wait_for(driver, lambda d: d.find_element(By.ID, "trajectory").get_attribute("data-turns") == "1", 20, "1 turn")
    assert count(driver, "#turns tbody tr") == 1
    wait_for(driver, lambda d: count(d, f'#flagged [data-id="{conversation}"]') == 1, 30, "the flagged conversation")

    # Server-wide alerts list it too.
    wait_for(driver, lambda d: count(d, f'#server-alerts .alert[data-id="{alert_id}"]') == 1, 20, "server alerts")

    # The request waits in the review queue.
    review_selector = f'#reviews .review[data-conversation="{conversation}"]'
    wait_for(driver, lambda d: count(d, review_selector) == 1, 20, "the conversation's review")
    review = driver.find_element(By.CSS_SELECTOR, review_selector)
    review_id = review.get_attribute("data-id")
    assert "desperate" in review.text and review_id
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / "ui.png"))

    # A verdict resolves it: it leaves the open list and the API lists it as resolved.
    review.find_element(By.CSS_SELECTOR, "input.note").send_keys("checked in the UI test")
    review.find_element(By.CSS_SELECTOR, ".verdict-confirmed").click()
    wait_for(driver, lambda d: count(d, f'#reviews .review[data-id="{review_id}"]') == 0, 20, "the review to leave")
    assert not driver.find_element(By.ID, "error").is_displayed(), driver.find_element(By.ID, "error").text
    resolved = httpx.get(f"{ui_limbic}/v1/reviews", params={"status": "resolved"}, headers=AUTH, timeout=10)
    resolved = resolved.json()["data"]
    mine = [r for r in resolved if r["id"] == review_id]
    assert mine and mine[0]["resolution"]["verdict"] == "confirmed"
    assert mine[0]["resolution"]["note"] == "checked in the UI test"
    still_open = httpx.get(f"{ui_limbic}/v1/reviews", params={"status": "open"}, headers=AUTH, timeout=10)
    still_open = still_open.json()["data"]
    assert review_id not in {r["id"] for r in still_open}

    # No JavaScript errors (nor failed requests, which Chromium logs as SEVERE) in the console.
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, f"browser console errors: {severe}"
