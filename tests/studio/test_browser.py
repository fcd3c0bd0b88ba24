"""In a real browser (headless Chromium + Selenium): open the app, upload the shipped tiny dataset,
estimate the memory, start a 120-step run on the tiny model, watch the loss chart grow and the run
finish, download the adapter, chat with it.

SLOTH_STUDIO_SCREENSHOTS=DIR saves the screenshots the README shows (hardware panel, finished run,
chat) there: ``SLOTH_STUDIO_SCREENSHOTS=docs .venv-latest/bin/pytest tests/studio/test_browser.py``."""
import os
import shutil
import socket
import time
import urllib.request
import zipfile

import pytest

pytest.importorskip("gradio")
webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    pytest.skip("needs Chromium and chromedriver (apt-get install chromium chromium-driver)", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

from sloth_plugins.studio.app import launch  # noqa: E402
from sloth_plugins.testing import DATA_FILE  # noqa: E402

pytestmark = pytest.mark.slow
STEPS = 120


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tab(browser, name):
    browser.find_element(By.XPATH, f"//button[@role='tab' and contains(., '{name}')]").click()


def shoot(browser, name):
    folder = os.environ.get("SLOTH_STUDIO_SCREENSHOTS")
    if folder:
        browser.save_screenshot(os.path.join(folder, name))


def wait_text(browser, css, predicate, timeout, value=False):
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        elements = browser.find_elements(By.CSS_SELECTOR, css)
        text = (elements[0].get_attribute("value") if value else elements[0].text) if elements else ""
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


def load_after_the_upload(browser, timeout=90):
    """Click Load until the dataset is read: the browser's upload finishes in its own time (a fixed sleep
    was too short on a busy CI machine, and Load then found no file)."""
    deadline = time.monotonic() + timeout
    while True:
        browser.find_element(By.CSS_SELECTOR, "#load-dataset").click()
        try:
            return wait_text(browser, "#dataset-message", lambda t: "400 rows" in t, 5)
        except AssertionError:
            if time.monotonic() > deadline:
                raise


def test_train_the_shipped_example_from_the_browser(tmp_path, model_dir, browser):
    port = free_port()
    app = launch(str(tmp_path / "runs"), port=port, model=model_dir, block=False)
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        upload = wait_for_element(browser, "input[type=file]")
        upload.send_keys(DATA_FILE)
        load_after_the_upload(browser)
        tab(browser, "Model")
        assert wait_text(browser, "#hw-devices textarea", bool, 10, value=True).startswith("no GPU: CPU run")
        browser.find_element(By.CSS_SELECTOR, "#estimate").click()
        wait_text(browser, "#memory-estimate", lambda t: "estimated peak" in t, 120)
        assert "lora_qkv" in wait_text(browser, "#run-report textarea", bool, 30, value=True)
        shoot(browser, "studio-hardware.png")
        # long enough that the status tick sees it running: on a busy CI runner a 30-step run went from
        # started to finished between two ticks the browser got through
        tab(browser, "Training")
        steps = browser.find_element(By.CSS_SELECTOR, "#training-max_steps input")
        steps.clear()
        steps.send_keys(str(STEPS), Keys.TAB)
        tab(browser, "Runs")
        browser.find_element(By.CSS_SELECTOR, "#start-run").click()
        seen = wait_text(browser, "#run-status", lambda t: "running" in t and "step" in t, 120)
        plot = browser.find_element(By.CSS_SELECTOR, "#loss-plot")
        assert plot.find_elements(By.CSS_SELECTOR, "canvas, svg"), "the loss chart has nothing drawn"
        final = wait_text(browser, "#run-status", lambda t: "finished" in t or "failed" in t, 240)
        assert f"finished, step {STEPS}" in final, final
        assert seen != final   # the status (and chart) updated while the run trained
        runs = os.listdir(tmp_path / "runs")
        run_ids = [r for r in runs if not r.startswith(".")]
        assert len(run_ids) == 1
        assert os.path.isfile(tmp_path / "runs" / run_ids[0] / "adapter" / "adapter_config.json")
        uploaded = [f for _, _, files in os.walk(tmp_path / "runs" / ".uploads") for f in files]
        assert os.path.basename(DATA_FILE) in uploaded   # the upload landed inside the runs folder
        time.sleep(1.5)   # the run list's next tick
        shoot(browser, "studio-finished-run.png")

        browser.find_element(By.CSS_SELECTOR, "#zip-adapter").click()
        link = wait_for_element(browser, "#adapter-file a[href*='.zip']", 60)
        archive = tmp_path / "adapter.zip"
        archive.write_bytes(urllib.request.urlopen(link.get_attribute("href")).read())
        assert "adapter_model.safetensors" in zipfile.ZipFile(archive).namelist()

        tab(browser, "Chat")
        browser.find_element(By.CSS_SELECTOR, "#chat-message textarea").send_keys("Name a colour.")
        browser.find_element(By.CSS_SELECTOR, "#chat-send").click()
        wait_text(browser, "#chat-base textarea", bool, 120, value=True)
        assert wait_text(browser, "#chat-tuned textarea", bool, 5, value=True)
        shoot(browser, "studio-chat.png")
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
