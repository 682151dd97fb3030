"""The HTML report of a tiny run in a real browser: headless Chromium driven through chromedriver's W3C
WebDriver protocol (plain HTTP on 127.0.0.1, no client library). Every image must load, the browser must log
no error, and a screenshot is saved. `make test` installs Debian's chromium and chromium-driver when they are
missing; where they cannot be installed the test says so and is skipped."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.request

import pytest

from diffrl import cli
from tests.conftest import free_port

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _call(url: str, method: str = "GET", body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["value"]


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="chromium / chromedriver not installed and not installable "
                                                      "here (make test tries apt: chromium chromium-driver)")
def test_the_html_report_loads_every_image_without_console_errors(tmp_path, tiny_dir):
    run = tmp_path / "run"
    assert cli.main(["train", "configs/awm/tiny_sd3_jpeg.yaml", f"model.path={tiny_dir('sd3')}", f"output_dir={run}",
                     "max_steps=2", "eval_every=1", "data.eval_size=2", "logging.trackers=[]",
                     "logging.progress_bar=false"]) == 0
    port = free_port()
    driver = subprocess.Popen([DRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if _call(base + "/status")["ready"]:
                    break
            except OSError:
                time.sleep(0.1)
        options = {"binary": CHROMIUM, "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                                                "--window-size=1100,1600"]}
        session = _call(base + "/session", "POST", {"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": options, "goog:loggingPrefs": {"browser": "ALL"}}}})
        page = f"{base}/session/{session['sessionId']}"
        _call(page + "/url", "POST", {"url": (run / "index.html").as_uri()})
        images = _call(page + "/execute/sync", "POST", {
            "script": "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, "
                      "i.naturalWidth]);", "args": []})
        sources = [src for src, _, _ in images]
        assert "report.png" in sources and "samples/step-000000.png" in sources and len(images) >= 4, images
        assert all(complete and width > 0 for _, complete, width in images), images
        logs = _call(page + "/se/log", "POST", {"type": "browser"})
        assert not [entry for entry in logs if entry["level"] == "SEVERE"], logs
        screenshot = base64.b64decode(_call(page + "/screenshot"))
        (tmp_path / "report_screenshot.png").write_bytes(screenshot)
        assert screenshot.startswith(b"\x89PNG") and len(screenshot) > 10_000
        _call(page, "DELETE")
    finally:
        driver.terminate()
        driver.wait(timeout=30)
