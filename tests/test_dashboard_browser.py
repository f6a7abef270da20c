"""End to end in real headless Chromium (Debian's chromium and chromium-driver, driven by
Selenium): a live run started with ``dashboard=True``, its page opened with the token, the
leaderboard and curves updating without a reload, a stop and a clone with a new learning rate
clicked, and both found in the records. It also takes the screenshots under ``docs/``
(``CEREBRO_SCREENSHOTS=docs`` writes them there; by default they go to the test's folder)."""

from __future__ import annotations

import os
import shutil
import threading
import time

import builders
import pytest

import cerebro

selenium = pytest.importorskip("selenium")
pytest.importorskip("fastapi")
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow

CHROMIUM = next(
    (
        p
        for p in ("/usr/lib/chromium/chromium", shutil.which("chromium") or "")
        if os.path.isfile(p)
    ),
    None,
)
DRIVER = next(
    (p for p in ("/usr/bin/chromedriver", shutil.which("chromedriver") or "") if os.path.isfile(p)),
    None,
)


@pytest.fixture
def browser():
    if CHROMIUM is None or DRIVER is None:
        missing = "needs Debian's chromium and chromium-driver (apt install them)"
        if os.environ.get("CEREBRO_REQUIRE_CHROMIUM"):  # set by .ci/run: never skipped there
            pytest.fail(missing)
        pytest.skip(missing)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,900",
        "--enable-unsafe-swiftshader",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(DRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout=90, message=""):
    # The page re-renders its tables on every poll: an element found a moment ago may be gone
    # when its text is read. That is a retry, not a failure.
    wait = WebDriverWait(
        driver, timeout, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException]
    )
    return wait.until(lambda d: condition(d), message)


def _points(driver, plot: str) -> int:
    return driver.execute_script(
        "const el = document.getElementById(arguments[0]);"
        "return el && el.data ? el.data.reduce((n, t) => n + (t.x ? t.x.length : 0), 0) : 0;",
        plot,
    )


def _tab(driver, view: str) -> None:
    driver.find_element(By.CSS_SELECTOR, f"#tabs button[data-view='{view}']").click()


def test_watch_stop_and_clone_from_the_browser(digits, tmp_path, browser):
    shots = os.environ.get("CEREBRO_SCREENSHOTS") or str(tmp_path / "shots")
    os.makedirs(shots, exist_ok=True)
    path = tmp_path / "live"
    exp = cerebro.Experiment(
        builders.slow_mlp_30ms,
        digits,
        search=cerebro.RandomSearch({"lr": cerebro.loguniform(1e-3, 3e-2)}, 4, seed=1),
        epochs=5,
        metric="val_accuracy",
        mode="max",
        backend=cerebro.LocalBackend(workers=2),
        path=path,
        progress=False,
        tensorboard=False,
        dashboard=0,  # any free port
    )
    error: list[BaseException] = []

    def run() -> None:
        try:
            exp.run()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            error.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not getattr(exp, "dashboard_url", None):
        assert time.monotonic() < deadline and thread.is_alive(), error
        time.sleep(0.1)
    url = exp.dashboard_url
    assert url.startswith("http://127.0.0.1:") and "?token=" in url

    browser.get(url)  # the token goes into a cookie and leaves the address bar
    assert "token=" not in browser.current_url
    rows = _wait(
        browser,
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#leaderboard tbody tr")) == 4 or None,
        message="the leaderboard shows the 4 models",
    )
    assert rows
    epochs_cell = "#leaderboard tbody tr[data-model='0'] td:nth-child(4)"
    first = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, epochs_cell).text or None)
    _wait(
        browser,
        lambda d: d.find_element(By.CSS_SELECTOR, epochs_cell).text != first,
        message="the leaderboard updates without a reload",
    )

    _tab(browser, "curves")
    _wait(browser, lambda d: _points(d, "curves") > 0, message="curves drawn")
    before = _points(browser, "curves")
    _wait(browser, lambda d: _points(d, "curves") > before, message="curves grow live")
    browser.save_screenshot(str(tmp_path / "curves-live.png"))  # not one for docs/

    # Stop model 3 from the leaderboard.
    _tab(browser, "leaderboard")
    browser.find_element(By.ID, "who").send_keys("tester")
    browser.execute_script("document.getElementById('who').dispatchEvent(new Event('change'))")
    stop = _wait(
        browser,
        lambda d: d.find_elements(By.CSS_SELECTOR, "button[data-action='stop'][data-model='3']"),
        message="model 3 can be stopped",
    )
    stop[0].click()
    _wait(browser, lambda d: "recorded for tester" in d.find_element(By.ID, "notice").text)
    _wait(
        browser,
        lambda d: d.find_elements(
            By.CSS_SELECTOR, "#leaderboard tr[data-model='3'][data-status='stopped']"
        ),
        message="the page shows model 3 stopped",
    )

    # Clone model 0 with a new learning rate, warm-started.
    clone = "button[data-action='clone'][data-model='0']"  # in the re-rendered leaderboard
    _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, clone).click() or True)
    field = _wait(
        browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#clone-form input[name='param-lr']")
    )
    field[0].clear()
    field[0].send_keys("0.005")
    browser.find_element(By.ID, "clone-submit").click()
    _wait(browser, lambda d: "(clone) recorded for tester" in d.find_element(By.ID, "notice").text)

    thread.join(240)
    assert not thread.is_alive() and not error, error

    result = cerebro.load(path)
    assert result.model(3).status == "stopped"
    stop_row, clone_row = result.controls
    assert (stop_row["op"], stop_row["state"]) == ("stop", "applied")
    assert stop_row["who"] == "tester via dashboard (127.0.0.1)"
    assert (clone_row["op"], clone_row["state"]) == ("clone", "applied")
    cloned = result.model(clone_row["outcome"]["model_id"])
    assert cloned.parent == 0 and cloned.origin == "clone"
    assert cloned.params["lr"] == pytest.approx(0.005) and cloned.status == "completed"
    assert clone_row["outcome"]["warm_start"] is True
    # Nothing the page loaded was refused by its Content-Security-Policy, nor failed.
    logs = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not [m for m in logs if "Content Security Policy" in m or "Uncaught" in m], logs

    # Screenshots of the main views, from the finished run's records.
    server = cerebro.dashboard.DashboardServer(path, port=0)
    server.start()
    try:
        browser.get(server.url)
        _wait(
            browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#leaderboard tbody tr")) == 5
        )
        browser.save_screenshot(os.path.join(shots, "dashboard-leaderboard.png"))
        drawn = (
            "const el = document.getElementById(arguments[0]); return el.data && el.data.length;"
        )
        for view in ("curves", "parallel", "timeline"):
            _tab(browser, view)
            _wait(browser, lambda d, v=view: d.execute_script(drawn, v))
            time.sleep(0.5)
            browser.save_screenshot(os.path.join(shots, f"dashboard-{view}.png"))
        _tab(browser, "model")
        _wait(browser, lambda d: d.find_elements(By.ID, "clone-form"))
        browser.execute_script(
            "const s = document.getElementById('model-select'); s.value = arguments[0];"
            "s.dispatchEvent(new Event('change'));",
            str(cloned.id),
        )
        _wait(browser, lambda d: f"model {cloned.id}" in d.find_element(By.ID, "model-body").text)
        time.sleep(0.5)
        browser.save_screenshot(os.path.join(shots, "dashboard-model.png"))
    finally:
        server.stop()
    logs = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not [m for m in logs if "Content Security Policy" in m or "Uncaught" in m], logs
