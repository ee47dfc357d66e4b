"""The shipped code carries no GPL terms: no runtime import of GPL audio libraries (Rubber Band through pedalboard
or pylibrb, mutagen), none in the runtime extras, and every media feature works with them made unimportable."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GPL_MODULES = ("pedalboard", "pylibrb", "mutagen", "pyrubberband", "rubberband")
RUNTIME = ("qwen_tts_core", "serve", "jobs")


def test_runtime_code_imports_no_gpl_library():
    pattern = re.compile(rf"^\s*(?:import|from)\s+({'|'.join(GPL_MODULES)})\b", re.M)
    hits = [f"{p.relative_to(ROOT)}: {m.group(0).strip()}" for pkg in RUNTIME for p in (ROOT / pkg).rglob("*.py")
            for m in pattern.finditer(p.read_text(encoding="utf-8"))]
    assert hits == []


def test_runtime_extras_list_no_gpl_package():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = project["dependencies"] + [d for extra in ("serve", "jobs") for d in
                                         project["optional-dependencies"][extra]]
    names = {re.split(r"[\s<>=!~\[;]", d, maxsplit=1)[0].lower() for d in runtime}
    assert not names & set(GPL_MODULES), names & set(GPL_MODULES)
    test_extra = " ".join(project["optional-dependencies"]["test"])
    assert not any(m in test_extra for m in GPL_MODULES)  # tests read M4B boxes themselves


def test_media_features_work_with_the_gpl_modules_unimportable(tmp_path):
    """In a fresh interpreter where importing any of them fails: speed (whole clip, stream, wrapped encoder), every
    mastering preset (limiter included), and a narration job with captions, speed, ACX mastering and an M4B book
    with a cover."""
    script = textwrap.dedent(f"""
        import sys
        for name in {GPL_MODULES!r}:
            sys.modules[name] = None  # `import name` now raises ImportError
        import json
        import numpy as np
        from qwen_tts_core.audio_fx import StreamingTimeStretcher, StretchedEncoder, time_stretch
        from jobs import mastering, narrate
        from tests.jobs.media_fakes import speechlike
        from tests.jobs.test_book import png

        x = speechlike(3)
        assert time_stretch(x, 24000, 1.5).size == round(x.size / 1.5)
        st = StreamingTimeStretcher(24000, 0.5)
        y = np.concatenate([st.push(x[i:i + 1920]) for i in range(0, x.size, 1920)] + [st.finish()])
        assert y.size == x.size * 2

        class Raw:
            media_type = "audio/pcm"
            def push(self, pcm): return pcm.astype("<f4").tobytes()
            def finish(self): return b""
        enc = StretchedEncoder(Raw(), 24000, 2.0)
        assert len(enc.push(x) + enc.finish()) == 4 * round(x.size / 2)
        for preset, codec in (("acx", None), ("podcast", "mp3"), ("podcast", "opus"), ("telephony", "alaw")):
            res = mastering.master(x, 24000, mastering.MasterConfig(preset, codec))
            assert not res.failed, (preset, res.failed)
        d = sys.argv[1]
        open(d + "/01-a.txt", "w").write("First chapter here. It has two sentences.")
        open(d + "/02-b.txt", "w").write("Second chapter.")
        open(d + "/cover.png", "wb").write(png())
        import os
        os.mkdir(d + "/book")
        os.rename(d + "/01-a.txt", d + "/book/01-a.txt")
        os.rename(d + "/02-b.txt", d + "/book/02-b.txt")
        code = narrate.main([d + "/book", "--out", d + "/out", "--model", "fake", "--backend",
                             "tests.jobs.media_fakes:NoiseBackend", "--runner", "local", "--no-progress", "--quiet",
                             "--voice", "ryan", "--master", "acx", "--captions", "--speed", "1.25", "--book", "m4b",
                             "--cover", d + "/cover.png"])
        assert code == 0, code
        loaded = [n for n in {GPL_MODULES!r} if sys.modules.get(n) is not None]
        assert loaded == [], loaded
        print("OK-NO-GPL")
    """)
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and "OK-NO-GPL" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
    out = tmp_path / "out"
    assert list(out.glob("book/*.m4b")) and len(list(out.rglob("*.mp3"))) == 2 and list(out.rglob("*.srt"))


def test_ffmpeg_report_names_what_is_missing_and_what_is_gpl(monkeypatch):
    import av

    from jobs import codecs

    rep = codecs.ffmpeg_report()
    assert rep["missing"] == []  # this environment's FFmpeg has every encoder, muxer and filter the code uses
    meta = av._core.library_meta
    lgpl = {k: dict(v, configuration="--enable-shared --enable-libmp3lame --enable-libopus --enable-version3")
            for k, v in meta.items()}
    monkeypatch.setattr(av._core, "library_meta", lgpl)
    assert codecs.ffmpeg_report()["gpl"] == []
    gpl = {k: dict(v, configuration="--enable-gpl --enable-libx264 --enable-libx265=yes --enable-libmp3lame")
           for k, v in meta.items()}
    monkeypatch.setattr(av._core, "library_meta", gpl)
    assert codecs.ffmpeg_report()["gpl"] == ["--enable-gpl", "--enable-libx264", "--enable-libx265"]
    monkeypatch.setattr(codecs, "FILTERS", (*codecs.FILTERS, "no_such_filter"))
    assert codecs.ffmpeg_report()["missing"] == ["filter no_such_filter"]
