"""The engine runs where only torch, transformers, safetensors and numpy exist (the lent GPU machines have no
soundfile and no soxr): array input at 24 kHz, voice prompts, synthesis and streaming must not import them.
Found by benchmarks/gpu_check.sh on an H200 (its `tiny` stage failed with ModuleNotFoundError: soundfile)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import ROOT


def test_engine_and_voice_clone_without_soundfile_or_soxr(checkpoint_factory):
    base = checkpoint_factory("base", "tiny")
    code = textwrap.dedent(f"""
        import sys
        for name in ("soundfile", "soxr", "librosa"):
            sys.modules[name] = None  # any import of them now raises ImportError
        import numpy as np
        from qwen_tts_core import Qwen3TTSModel
        m = Qwen3TTSModel.from_pretrained({str(base)!r}, device_map="cpu", dtype="float32")
        t = np.arange(24000) / 24000
        wav = (0.3 * np.sin(2 * np.pi * 180 * t) + 0.01 * np.random.default_rng(0).standard_normal(24000))
        (item,) = m.create_voice_clone_prompt((wav.astype(np.float32), 24000), ref_text="Hello there.")
        wavs, sr = m.generate_voice_clone("Good morning.", voice_clone_prompt=item, do_sample=False,
                                          subtalker_dosample=False, max_new_tokens=4)
        chunks = list(m.stream_voice_clone("Good morning.", voice_clone_prompt=item, do_sample=False,
                                           subtalker_dosample=False, max_new_tokens=4))
        assert sr == 24000 and wavs[0].size > 0 and sum(c.size for c in chunks) == wavs[0].size
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_resampling_still_refuses_cleanly_without_soxr_only_when_needed():
    code = textwrap.dedent("""
        import sys
        sys.modules["soxr"] = None
        import numpy as np
        from qwen_tts_core.audio_io import to_24k
        x = np.zeros(2400, np.float32); x[::7] = 0.5
        assert to_24k(x, 24000) is not None          # no resampling: no soxr
        try:
            to_24k(x, 16000)
        except ImportError:
            print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
