"""The live view in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by
selenium against a running ``ndot serve``, while real N-MNIST recordings stream in over HTTP.

Selenium uses the system chromedriver (``Service(executable_path=...)``) and never downloads one
(``SE_OFFLINE=true``). Skips with a reason only when Chromium or its driver is not installed
(``.ci/run`` installs them). The screenshot lands in ``$TMPDIR`` (``ndot-live-view.png``).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from service_support import (
    INGEST_KEY,
    ServiceProcess,
    free_port,
    nmnist_samples,
    stream_in_background,
    wait_ready,
)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,860",
)
#: Non-black pixels of a canvas (the page paints events on black).
LIT_PIXELS_JS = """
const canvas = document.getElementById(arguments[0]);
const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
let lit = 0;
for (let i = 0; i < data.length; i += 4) if (data[i] || data[i + 1] || data[i + 2]) lit++;
return [lit, canvas.width, canvas.height];
"""


def screenshot_path() -> Path:
    return Path(os.environ.get("TMPDIR") or tempfile.gettempdir()) / "ndot-live-view.png"


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Headless Chromium with a fresh profile, through the system chromedriver (no download)."""
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip("Chromium not installed: apt-get install -y chromium chromium-driver (.ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium missing (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not reach for the network
    options = Options()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def test_live_view_in_headless_chromium(browser: Any, nmnist_small: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "NDOT_PORT": str(port),
        "NDOT_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
        "NDOT_CHECKPOINT_INTERVAL_S": "0",
        "NDOT_RESTORE_ON_START": "false",
    }
    samples = nmnist_samples(nmnist_small, 24)
    serve = ServiceProcess("serve", env, tmp_path / "serve.log").start()
    stop_streaming = None
    try:
        wait_ready(url, serve)
        browser.get(f"{url}/v1/streams/digits/view")
        state = lambda: browser.execute_script("return window.ndotView.state")  # noqa: E731
        text = lambda element_id: browser.find_element(By.ID, element_id).text  # noqa: E731
        assert state() == "idle" and "enter an API key" in text("message")

        browser.find_element(By.ID, "key").send_keys(INGEST_KEY)
        browser.find_element(By.ID, "connect").click()
        wait_for(lambda: state() == "open", 10, "the event stream to open")
        assert INGEST_KEY not in browser.current_url  # the key travels in a header, never in the URL
        assert browser.execute_script("return sessionStorage.getItem('ndot-api-key')") == INGEST_KEY
        wait_for(lambda: text("version") == "0", 5, "the model version of the info event (fresh model)")
        assert text("prediction") == "–" and "not live" in text("message")  # no stream of that id yet

        stop_streaming, streamer = stream_in_background(url, "digits", samples, INGEST_KEY)  # labelled digits
        wait_for(lambda: browser.execute_script("return window.ndotView.updates") >= 3, 30, "live updates")
        first_version = int(text("version"))
        assert re.fullmatch(r"\d", text("prediction")), text("prediction")
        lit, width, height = browser.execute_script(LIT_PIXELS_JS, "model-frame")
        assert (width, height) == (34, 34) and lit > 0  # the model-size frame shows events
        lit, width, height = browser.execute_script(LIT_PIXELS_JS, "sensor-frame")
        assert (width, height) == (34, 34) and lit > 0  # N-MNIST's sensor is 34x34 too
        assert len(browser.find_elements(By.CSS_SELECTOR, "#bars .bar")) == 10
        wait_for(lambda: int(text("version")) > first_version + 20, 30, "the model version to move on")
        wait_for(lambda: text("step-accuracy").endswith("%"), 10, "the step accuracy")
        assert text("prequential-accuracy") == "n/a" or text("prequential-accuracy").endswith("%")
        assert text("lag").endswith("frames queued)") and text("model") == "stream_cnn"
        updates = browser.execute_script("return window.ndotView.updates")
        time.sleep(1.0)
        recent = browser.execute_script("return window.ndotView.updates") - updates
        assert 0 < recent <= 13, f"{recent} updates in one second (the service sends at most ~10)"
        assert browser.save_screenshot(str(screenshot_path()))

        browser.refresh()  # the key stays in this tab (sessionStorage) and the page reconnects by itself
        wait_for(lambda: state() == "open", 10, "the reconnect after a reload")
        assert browser.find_element(By.ID, "key").get_attribute("value") == INGEST_KEY

        browser.get(f"{url}/v1/view")  # the index lists the stream with a link to its view
        link = wait_for(lambda: browser.find_elements(By.LINK_TEXT, "digits"), 10, "the index row")[0]
        assert link.get_attribute("href") == f"{url}/v1/streams/digits/view"

        browser.get(f"{url}/v1/streams/digits/view")
        browser.find_element(By.ID, "forget").click()
        browser.find_element(By.ID, "key").send_keys("not-a-key-of-this-service")
        browser.find_element(By.ID, "connect").click()
        wait_for(lambda: state() == "closed", 10, "the refusal")
        assert "HTTP 401" in text("message")
        severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert all("401" in entry["message"] for entry in severe), severe  # no CSP or script errors

        browser.find_element(By.ID, "key").clear()
        browser.find_element(By.ID, "key").send_keys(INGEST_KEY)
        browser.find_element(By.ID, "connect").click()
        wait_for(lambda: state() == "open", 10, "the stream to open again")
        stop_streaming.set()
        streamer.join(60)
        started = time.monotonic()  # SIGTERM with a view open: the view ends, the service stops at once
        assert serve.stop() == 0, serve.log_tail()
        assert time.monotonic() - started < 15
        wait_for(lambda: state() == "closed", 10, "the page to see the stream end")
    finally:
        if stop_streaming is not None:
            stop_streaming.set()
        serve.stop()
