"""The playground page in headless Chromium (Debian's chromium driven by Playwright) against the running service."""

from __future__ import annotations

import shutil

import pytest

pytestmark = pytest.mark.ray

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--autoplay-policy=no-user-gesture-required"]


def test_playground_streams_and_shows_time_to_first_audio(serve_app):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) not installed")
    if not shutil.which("chromium"):
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(f"{serve_app['url']}/")
            page.wait_for_function("document.getElementById('status').textContent === 'ready'", timeout=30000)
            assert page.locator("#model option").count() == 3
            page.select_option("#model", "cv")
            page.select_option("#voice", "ryan")
            page.fill("#text", "Hello from the browser.")
            page.click("#speak")
            page.wait_for_function("['done','error'].includes(document.getElementById('status').textContent)",
                                   timeout=60000)
            assert page.text_content("#error") == ""
            assert page.text_content("#status") == "done"
            ttfa = float(page.text_content("#ttfa").split()[0])
            seconds = float(page.text_content("#seconds"))
            assert 0 < ttfa < 30 and seconds > 0.1
        finally:
            browser.close()
