"""`qtts review`: its API over file:// and s3:// (moto), and the page in headless Chromium (Playwright)."""

from __future__ import annotations

import io
import json
import shutil
import urllib.error
import urllib.request

import pytest

from jobs import catalog, narrate, review

NOISE = ["--model", "fake", "--backend", "tests.jobs.media_fakes:NoiseBackend", "--runner", "local",
         "--no-progress", "--quiet", "--voice", "ryan"]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--autoplay-policy=no-user-gesture-required"]


def book_job(root, out: str, monkeypatch=None) -> None:
    rows = root / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in [
        {"id": "ch1", "text": "First chapter. It has two sentences."},
        {"id": "ch2", "text": "Second chapter, SILENT on purpose."},   # fails ACX rules: a flagged row
        {"id": "ch3", "text": "Third chapter is fine too.", "voice": "nobody"},  # fails: no audio
        {"id": "ch4", "text": "Fourth chapter has <b>bold</b> & marks in it."}]))
    assert narrate.main([str(rows), "--out", out, *NOISE, "--master", "acx", "--captions"]) == 1


def get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_api_over_a_local_job(tmp_path, review_server):
    import soundfile as sf

    out = tmp_path / "out"
    book_job(tmp_path, str(out))
    base = review_server(f"file://{out}")
    status, _, body = get(f"{base}/api/manifest")
    data = json.loads(body)
    assert status == 200 and data["manifest"] == "manifest.parquet"
    rows = {r["id"]: r for r in data["rows"]}
    assert rows["ch1"]["flagged"] is False and rows["ch2"]["flagged"] and rows["ch3"]["flagged"]
    assert rows["ch2"]["rules"]["head"] is False and isinstance(rows["ch1"]["rules"], dict)
    key = rows["ch1"]["key"]
    status, headers, mp3 = get(f"{base}/api/audio?key={key}")
    assert status == 200 and headers["Content-Type"] == "audio/mpeg" and mp3 == (out / key).read_bytes()
    status, headers, part = get(f"{base}/api/audio?key={key}", {"Range": "bytes=100-199"})
    assert status == 206 and part == mp3[100:200] and headers["Content-Range"] == f"bytes 100-199/{len(mp3)}"
    status, _, _ = get(f"{base}/api/audio?key={key}", {"Range": f"bytes={len(mp3) + 5}-"})
    assert status == 416
    status, _, peaks = get(f"{base}/api/peaks?key={key}&n=100")
    p = json.loads(peaks)
    assert len(p["min"]) == len(p["max"]) == 100 and p["sample_rate"] == 44100 and max(p["max"]) > 0.1
    status, headers, vtt = get(f"{base}/api/captions?key={rows['ch1']['captions'][1]}")
    assert status == 200 and vtt.startswith(b"WEBVTT") and headers["Content-Type"].startswith("text/vtt")
    # only what the manifest names: no path tricks, no other files, no captions served as audio
    for bad in ("../../../etc/passwd", "manifest.parquet", f"{key}.json", rows["ch1"]["captions"][0], ""):
        status, _, body = get(f"{base}/api/audio?key={bad}")
        assert status == 404 and "not" in json.loads(body)["error"]["message"]
    assert get(f"{base}/api/peaks?key={key}&n=lots")[0] == 400
    assert get(f"{base}/nope")[0] == 404
    # a G.711 WAV the browser may not play comes back as 16-bit PCM WAV
    cat = tmp_path / "c.csv"
    cat.write_text("id,text,voice\nhi,Hello caller.,ryan\n")
    assert catalog.main([str(cat), "--out", str(tmp_path / "cat"), *NOISE[:-2], "--master", "telephony"]) == 0
    base2 = review_server(str(tmp_path / "cat"))
    (row,) = json.loads(get(f"{base2}/api/manifest")[2])["rows"]
    status, headers, wav = get(f"{base2}/api/audio?key={row['key']}")
    info = sf.info(io.BytesIO(wav))
    assert status == 200 and info.subtype == "PCM_16" and info.samplerate == 8000


def test_no_manifest_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert review.main([str(tmp_path / "empty"), "--port", "0"]) == 2
    assert "no manifest in" in capsys.readouterr().err


def test_review_reads_s3(tmp_path, s3_bucket, review_server):
    book_job(tmp_path, f"s3://{s3_bucket}/job1")
    base = review_server(f"s3://{s3_bucket}/job1")
    rows = {r["id"]: r for r in json.loads(get(f"{base}/api/manifest")[2])["rows"]}
    assert set(rows) == {"ch1", "ch2", "ch3", "ch4"}
    status, headers, data = get(f"{base}/api/audio?key={rows['ch4']['key']}")
    assert status == 200 and headers["Content-Type"] == "audio/mpeg" and data[:3] in (b"ID3", b"\xff\xfb")
    assert json.loads(get(f"{base}/api/peaks?key={rows['ch4']['key']}")[2])["duration_s"] > 3


def test_page_in_chromium(tmp_path, review_server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) not installed")
    if not shutil.which("chromium"):
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    out = tmp_path / "out"
    book_job(tmp_path, str(out))
    base = review_server(str(out))
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(base + "/")
            page.wait_for_selector("body[data-ready='1']", timeout=30000)
            assert page.locator("#rows tr").count() == 4
            # waveforms drawn from the audio, players that load, figures and rule flags, captions as cues
            page.wait_for_function("document.querySelectorAll('canvas.wave[data-drawn]').length === 3", timeout=30000)
            page.wait_for_function("[...document.querySelectorAll('audio')].every(a => a.readyState >= 1)",
                                   timeout=30000)
            durations = page.eval_on_selector_all("audio", "els => els.map(a => a.duration)")
            assert len(durations) == 3 and all(d > 3 for d in durations)
            drawn = page.evaluate("""() => { const c = document.querySelector('tr[data-id=ch1] canvas');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
                for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n / (c.width * c.height); }""")
            assert drawn > 0.05  # real ink on the canvas
            ch1 = page.locator("tr[data-id=ch1]")
            assert "RMS -20.0 dB" in ch1.text_content() and ch1.locator(".rule.fail").count() == 0
            assert page.locator("tr[data-id=ch2] .rule.fail[data-rule=head]").count() == 1
            page.wait_for_function("document.querySelector('tr[data-id=ch1] .ncues')", timeout=30000)
            assert ch1.locator(".cues li").count() == 2
            page.wait_for_function("document.querySelector('tr[data-id=ch4] .ncues')", timeout=30000)
            cues4 = page.locator("tr[data-id=ch4] .cues li").all_text_contents()
            assert any("has <b>bold</b> & marks" in c for c in cues4), cues4  # shown as text, not markup
            assert "no audio" in page.locator("tr[data-id=ch3]").text_content()
            # filter to flagged rows
            page.check("#flagged")
            visible = page.eval_on_selector_all("#rows tr:not(.hidden)", "els => els.map(e => e.dataset.id)")
            assert visible == ["ch2", "ch3"]
            page.uncheck("#flagged")
            page.fill("#query", "ch4")
            assert page.eval_on_selector_all("#rows tr:not(.hidden)", "els => els.map(e => e.dataset.id)") == ["ch4"]
            # clicking the waveform seeks and plays
            page.fill("#query", "")
            page.locator("tr[data-id=ch1] canvas").click(position={"x": 300, "y": 20})
            page.wait_for_function("document.querySelector('tr[data-id=ch1] audio').currentTime > 0", timeout=15000)
            assert errors == []
        finally:
            browser.close()


def test_page_tells_the_catalogs_of_one_output_apart(tmp_path, review_server):
    """Catalogs sharing an output own their records by name, and ids repeat across them (each has a `welcome`):
    the page labels each row "catalog / id" (as text: a name is the catalog's to choose) and its search finds a
    catalog's rows by name."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) not installed")
    if not shutil.which("chromium"):
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    out = tmp_path / "prompts"
    for name, text in [("menus_en", "Welcome caller."), ("es<i>x", "Bienvenido.")]:
        cat = tmp_path / "c.csv"
        cat.write_text(f"id,text,voice\nwelcome,{text},ryan\n")
        assert catalog.main([str(cat), "--name", name, "--out", str(out), *NOISE[:-2]]) == 0
    base = review_server(str(out))
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(base + "/")
            page.wait_for_selector("body[data-ready='1']", timeout=30000)
            labels = sorted(page.eval_on_selector_all("#rows tr td:first-child", "els => els.map(e => e.textContent)"))
            assert labels == ["es<i>x / welcome", "menus_en / welcome"], labels
            assert page.locator("#rows i").count() == 0          # the name is shown as text, not markup
            page.fill("#query", "menus_en")
            assert page.eval_on_selector_all("#rows tr:not(.hidden)", "els => els.map(e => e.dataset.catalog)") == \
                ["menus_en"]
        finally:
            browser.close()
