"""In a real browser (headless Chromium + Selenium): open the app, upload the shipped tiny dataset,
start a 30-step run on the tiny model, watch the loss chart grow and the run finish."""
import os
import shutil
import socket
import time

import pytest

pytest.importorskip("gradio")
webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    pytest.skip("needs Chromium and chromedriver (apt-get install chromium chromium-driver)", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402

from sloth_plugins.studio.app import launch  # noqa: E402
from sloth_plugins.testing import DATA_FILE  # noqa: E402

pytestmark = pytest.mark.slow


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_text(browser, css, predicate, timeout):
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        elements = browser.find_elements(By.CSS_SELECTOR, css)
        text = elements[0].text if elements else ""
        if predicate(text):
            return text
        time.sleep(0.3)
    raise AssertionError(f"{css}: still {text!r} after {timeout} s")


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


def test_train_the_shipped_example_from_the_browser(tmp_path, model_dir, browser):
    port = free_port()
    app = launch(str(tmp_path / "runs"), port=port, model=model_dir, block=False)
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        upload = wait_for_element(browser, "input[type=file]")
        upload.send_keys(DATA_FILE)
        time.sleep(1.0)   # the upload finishes before Load reads it
        browser.find_element(By.CSS_SELECTOR, "#load-dataset").click()
        wait_text(browser, "#dataset-message", lambda t: "400 rows" in t, 60)
        browser.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Runs')]").click()
        browser.find_element(By.CSS_SELECTOR, "#start-run").click()
        seen = wait_text(browser, "#run-status", lambda t: "running" in t and "step" in t, 120)
        plot = browser.find_element(By.CSS_SELECTOR, "#loss-plot")
        assert plot.find_elements(By.CSS_SELECTOR, "canvas, svg"), "the loss chart has nothing drawn"
        final = wait_text(browser, "#run-status", lambda t: "finished" in t or "failed" in t, 240)
        assert "finished, step 30" in final, final
        assert seen != final   # the status (and chart) updated while the run trained
        runs = os.listdir(tmp_path / "runs")
        run_ids = [r for r in runs if not r.startswith(".")]
        assert len(run_ids) == 1
        assert os.path.isfile(tmp_path / "runs" / run_ids[0] / "adapter" / "adapter_config.json")
        uploaded = [f for _, _, files in os.walk(tmp_path / "runs" / ".uploads") for f in files]
        assert os.path.basename(DATA_FILE) in uploaded   # the upload landed inside the runs folder
        browser.save_screenshot(str(tmp_path / "finished_run.png"))
    finally:
        app.close()


def wait_for_element(browser, css, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = browser.find_elements(By.CSS_SELECTOR, css)
        if found:
            return found[0]
        time.sleep(0.3)
    raise AssertionError(f"no {css} after {timeout} s")
