"""`qtts say` as a user runs it: the audio it writes is the API's, its mistakes are one line naming the option (no
traceback), the output folder and format are checked before a model is loaded, options another checkpoint type uses
are refused, and an existing output file is replaced whole or not at all."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from qwen_tts_core import Qwen3TTSModel
from qwen_tts_core.cli import main

FAST = ["--max-new-tokens", "6", "--seed", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def ck(checkpoint_factory):
    return str(checkpoint_factory("custom_voice", "tiny"))


def say(*args: str) -> int:
    return main(["say", *args])


def refused(*args: str) -> str:
    with pytest.raises(SystemExit) as e:
        say(*args)
    assert isinstance(e.value.code, str), e.value.code   # a message (exit status 1), not a bare status
    return e.value.code


def test_the_file_holds_the_apis_audio_for_the_same_text_speaker_and_seed(ck, model_factory, tmp_path):
    out = tmp_path / "hi.wav"
    assert say("Hello there.", "--model", ck, "--speaker", "ryan", "--out", str(out), *FAST) == 0
    got, sr = sf.read(out, dtype="float32")
    want, want_sr = model_factory("custom_voice", "tiny").generate_custom_voice(
        "Hello there.", speaker="ryan", seed=3, max_new_tokens=6)
    assert sr == want_sr == 24000 and got.size == want[0].size > 0
    np.testing.assert_allclose(got, np.clip(want[0], -1, 1), atol=1.5 / 32768)   # 16-bit WAV
    other = tmp_path / "other.wav"
    say("Hello there.", "--model", ck, "--speaker", "vivian", "--out", str(other), *FAST)
    assert not np.array_equal(sf.read(other, dtype="float32")[0], got)   # the speaker reaches the model


def test_dash_reads_the_text_from_standard_input(ck, tmp_path, monkeypatch):
    a, b = tmp_path / "a.flac", tmp_path / "b.flac"
    say("Hello there.", "--model", ck, "--out", str(a), *FAST)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there."))
    say("-", "--model", ck, "--out", str(b), *FAST)
    assert sf.info(str(b)).format == "FLAC"
    assert np.array_equal(sf.read(a)[0], sf.read(b)[0])


@pytest.mark.parametrize("out, words", [("{d}/missing/a.wav", "no such folder"),
                                        ("{d}/a.xyz", "unknown audio file extension '.xyz'"),
                                        ("{d}/a.raw", "unknown audio file extension '.raw'")])
def test_the_output_is_checked_before_any_model_is_loaded(ck, tmp_path, monkeypatch, out, words):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")
    monkeypatch.setattr(Qwen3TTSModel, "from_pretrained", no_load)
    msg = refused("Hi.", "--model", ck, "--out", out.format(d=tmp_path))
    assert msg.startswith("qtts say: --out ") and words in msg


@pytest.mark.parametrize("extra, words", [
    (["--speaker", "nobody"], "qtts say: --speaker: 'nobody' is not supported"),
    (["--seed", "-1"], "qtts say: --seed: must be an integer"),
    (["--max-new-tokens", "0"], "qtts say: --max-new-tokens: must be in [1, "),
    (["--language", "Klingon"], "qtts say: --language: "),
    (["--ref-audio", "x.wav"], "qtts say: --ref-audio: not used by a custom_voice checkpoint"),
    (["--x-vector-only", "--ref-text", "hi"], "qtts say: --ref-text, --x-vector-only: not used by a custom_voice"),
])
def test_a_bad_option_is_one_line_naming_it_and_the_old_file_stays(ck, tmp_path, extra, words):
    out = tmp_path / "keep.wav"
    out.write_bytes(b"what was there before")
    msg = refused("Hello.", "--model", ck, "--out", str(out), "--device", "cpu", *extra)
    assert msg.startswith(words), msg
    assert "\n" not in msg
    assert out.read_bytes() == b"what was there before"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.wav"]


def test_a_missing_model_names_the_option(tmp_path):
    msg = refused("Hi.", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "a.wav"))
    assert msg.startswith(f"qtts say: --model {tmp_path / 'nothing'}: ")


def test_options_of_other_checkpoint_types_are_refused(checkpoint_factory, tmp_path):
    design, base = str(checkpoint_factory("voice_design", "tiny")), str(checkpoint_factory("base", "tiny"))
    out = str(tmp_path / "a.wav")
    assert "--speaker: not used by a voice_design checkpoint (its options: --instruct)" in \
        refused("Hi.", "--model", design, "--speaker", "ryan", "--out", out, "--device", "cpu")
    assert "qtts say: --instruct: not used by a base checkpoint" in \
        refused("Hi.", "--model", base, "--instruct", "calm", "--out", out, "--device", "cpu")
    assert "a Base checkpoint needs --ref-audio" in refused("Hi.", "--model", base, "--out", out, "--device", "cpu")
    assert not os.path.exists(out)


def test_a_write_that_fails_leaves_the_old_file_whole_and_no_part_file(ck, tmp_path, monkeypatch):
    out = tmp_path / "keep.wav"
    out.write_bytes(b"old")
    real = sf.write

    def half_write(file, data, *a, **k):   # the disk fills up halfway through
        real(file, data[: data.size // 2], *a, **k)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(sf, "write", half_write)
    with pytest.raises(OSError):
        say("Hello.", "--model", ck, "--out", str(out), *FAST)
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.wav"]


def test_the_written_file_gets_the_usual_permissions(ck, tmp_path):
    old = os.umask(0o022)
    try:
        say("Hello.", "--model", ck, "--out", str(tmp_path / "a.wav"), *FAST)
    finally:
        os.umask(old)
    assert (tmp_path / "a.wav").stat().st_mode & 0o777 == 0o644


def test_the_command_line_prints_one_line_and_exits_1_without_a_traceback(ck, tmp_path):
    r = subprocess.run([sys.executable, "-m", "qwen_tts_core.cli", "say", "Hi.", "--model", ck, "--speaker", "nobody",
                        "--out", str(tmp_path / "a.wav"), "--device", "cpu"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("qtts say: --speaker: 'nobody' is not supported")


def test_every_option_of_every_command_says_what_it_does():
    import argparse

    from qwen_tts_core.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert {"say", "make-checkpoint", "serve", "narrate", "catalog", "demo", "review"} <= set(sub.choices)
    silent = [f"{name} {a.option_strings or a.dest}" for name, p in sub.choices.items() for a in p._actions
              if not a.help and not isinstance(a, argparse._HelpAction)]
    assert silent == []
