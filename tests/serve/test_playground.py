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


def test_playground_waveform_download_and_voice_from_a_clip(serve_app, ref_wav_path, tmp_path):
    """Upload a reference clip to make a Base voice, speak with it: the waveform grows while audio streams in,
    and the download holds exactly the samples that were heard (read back here with libsndfile)."""
    import soundfile as sf

    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) not installed")
    if not shutil.which("chromium"):
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(accept_downloads=True)
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{serve_app['url']}/")
            page.wait_for_function("document.getElementById('status').textContent === 'ready'", timeout=30000)
            assert page.is_visible("#clone") and page.locator("#ref-model option").count() == 1
            # a clip that is not audio: the service's 400 is shown, nothing selected
            bad = tmp_path / "notes.wav"
            bad.write_bytes(b"RIFF....WAVEjunk")
            page.set_input_files("#ref-file", str(bad))
            page.fill("#ref-text", "A test clip.")
            page.click("#create-voice")
            page.wait_for_function("document.getElementById('voice-status').className === 'error'", timeout=60000)
            assert "400" in page.text_content("#voice-status")
            page.set_input_files("#ref-file", str(ref_wav_path))
            page.fill("#ref-name", "playground voice")
            page.click("#create-voice")
            page.wait_for_function("document.getElementById('voice-status').className !== ''", timeout=120000)
            assert page.get_attribute("#voice-status", "class") == "ok", page.text_content("#voice-status")
            assert page.input_value("#model") == "base"
            voice_id = page.input_value("#voice")
            assert voice_id and "playground voice" in page.text_content("#voice")
            # record the waveform's column count whenever it is redrawn, with the status at that moment
            page.evaluate("""() => { window.__log = []; new MutationObserver(() => window.__log.push(
                [Number(document.getElementById('wave').dataset.columns), document.getElementById('status').textContent]
              )).observe(document.getElementById('wave'), {attributes: true, attributeFilter: ['data-columns']}); }""")
            page.fill("#text", "Hello from a cloned voice in the browser.")
            page.click("#speak")
            page.wait_for_function("['done','error'].includes(document.getElementById('status').textContent)",
                                   timeout=60000)
            assert page.text_content("#error") == ""
            seconds = float(page.text_content("#seconds"))
            log = page.evaluate("window.__log")
            assert any(cols > 0 and status == "streaming" for cols, status in log), log  # drawn while streaming
            columns = int(page.get_attribute("#wave", "data-columns"))
            assert abs(columns - seconds * 100) <= 1 and seconds > 0.1
            ink = page.evaluate("""() => { const c = document.getElementById('wave');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
                for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; }""")
            assert ink > 100
            with page.expect_download() as dl:
                page.click("#download")
            path = tmp_path / "heard.wav"
            dl.value.save_as(path)
            audio, sr = sf.read(path, dtype="int16")
            assert sr == 24000 and len(audio) == round(seconds * 24000) == int(page.get_attribute("#download",
                                                                                                    "data-samples"))
            # Stop during playback: the download shrinks to what was heard
            page.click("#speak")
            page.wait_for_function("Number(document.getElementById('seconds').textContent) > 0", timeout=60000)
            if not page.is_disabled("#stop"):
                page.click("#stop")
                heard = float(page.text_content("#heard"))
                samples = int(page.get_attribute("#download", "data-samples") or 0)
                received = float(page.text_content("#seconds")) * 24000
                assert page.text_content("#status") == "stopped"
                assert abs(samples - heard * 24000) <= 240 and samples <= received + 1
                assert page.is_hidden("#download") == (samples == 0)
            # Found under load: a stop before anything was heard hid the link but left the last download's sample
            # count on it. Nothing offered -> nothing claimed.
            page.evaluate("() => { offerDownload(4800); offerDownload(0); }")
            assert page.get_attribute("#download", "data-samples") == "0" and page.is_hidden("#download")
            assert errors == []
        finally:
            browser.close()
