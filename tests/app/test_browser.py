"""Real-browser test: the app started as a user starts it, headless Chromium driven by Playwright.

Opens the app with no input (the demo family is the default) and asserts the Checkpoints
page shows the base's exact total parameter count. The screenshot is kept in artifacts/.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from analysis.checkpoints import open_checkpoint
from analysis.demo import default_demo_dir, demo_is_current
from conftest import ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url():
    assert demo_is_current(default_demo_dir()), "build the demo first: make demo"
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.address", "127.0.0.1",
         "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(url + "/_stcore/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
            assert proc.poll() is None, proc.stdout.read()
        else:
            pytest.fail("streamlit did not start within 90 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_checkpoints_page_in_chromium(app_url):
    from playwright.sync_api import sync_playwright

    expected = open_checkpoint(default_demo_dir() / "base").total_params
    shot = ROOT / "artifacts" / "checkpoints-page.png"
    shot.parent.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(app_url, wait_until="domcontentloaded")
            metric = page.get_by_test_id("stMetricValue").first
            metric.wait_for(timeout=90_000)
            page.wait_for_timeout(1500)  # let charts render for the screenshot
            page.screenshot(path=str(shot), full_page=True)
            values = page.get_by_test_id("stMetricValue").all_inner_texts()
            body = page.inner_text("body")
        finally:
            browser.close()
    assert values[0] == f"{expected:,}"
    assert "Checkpoints" in body and "demo/base" in body and "demo/rl-seed2" in body
    assert "Traceback" not in body and "Error" not in body
