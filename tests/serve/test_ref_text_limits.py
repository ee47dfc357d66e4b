"""An ICL voice's transcript (`ref_text`) is bounded (the core's MAX_REF_TEXT_CHARS) on every way into the service:
voice creation (multipart, urlencoded and JSON bodies) answers 400 naming ref_text before any audio is decoded or
sent to a replica, and a voice stored before the limit is refused (400 naming voice, the message says ref_text)
instead of being tokenized on the replica's step loop."""

from __future__ import annotations

import asyncio
import base64

import pytest
import torch

from qwen_tts_core import VoiceClonePromptItem
from qwen_tts_core.generate.requests import MAX_REF_TEXT_CHARS
from serve.config import ModelConfig
from serve.replica import ReplicaCore
from serve.voices import VoiceStore
from tests.serve.inproc import ingress_app

AUDIO = b"RIFF" + bytes(60)
LONG = "word " * (MAX_REF_TEXT_CHARS // 5 + 1)      # one word past the limit


class Base:
    """A Base model's replica that records what reaches it and stores a voice of `frames` reference frames."""

    def __init__(self, uri: str, frames: int = 20) -> None:
        self.store, self.frames, self.calls = VoiceStore.from_uri(uri), frames, []

    def info(self) -> dict:
        return {"id": "base", "type": "base", "speakers": []}

    async def create_voice(self, audio, ref_text, x_vector_only, name, owner=""):
        self.calls.append(ref_text)
        item = VoiceClonePromptItem(ref_code=torch.zeros(self.frames, 16, dtype=torch.long),
                                    ref_spk_embedding=torch.zeros(64), x_vector_only_mode=False, icl_mode=True,
                                    ref_text=ref_text)
        return self.store.create(item, name=name, model="base", owner=owner)


def _app(monkeypatch, tmp_path, frames: int = 20):
    """(client, replica) of the in-process app over a `Base` replica storing voices of `frames` frames."""
    uri = str(tmp_path / "voices")
    replica = Base(uri, frames)
    client, _ = ingress_app(monkeypatch, {"models": [{"name": "base", "model_type": "base"}], "voices_uri": uri,
                                          "max_upload_bytes": 64 * 1024}, {"base": replica})
    return client, replica


def _bodies(ref_text: str) -> dict[str, dict]:
    b64 = base64.b64encode(AUDIO).decode()
    return {"multipart": {"files": {"file": ("ref.wav", AUDIO, "audio/wav")},
                          "data": {"name": "v", "ref_text": ref_text}},
            "urlencoded": {"data": {"name": "v", "ref_text": ref_text, "audio_base64": b64}},
            "json": {"json": {"name": "v", "ref_text": ref_text, "audio_base64": b64}}}


@pytest.mark.parametrize("body", ["multipart", "urlencoded", "json"])
def test_voice_creation_refuses_a_long_ref_text_naming_it(monkeypatch, tmp_path, body):
    client, replica = _app(monkeypatch, tmp_path)
    with client:
        r = client.post("/v1/audio/voices", **_bodies(LONG)[body])
        err = r.json()["error"]
        assert (r.status_code, err["param"]) == (400, "ref_text"), r.text
        assert f"at most {MAX_REF_TEXT_CHARS}" in err["message"] and len(r.content) < 1000, err
        assert replica.calls == [], "a refused transcript must not reach a replica"
        ok = client.post("/v1/audio/voices", **_bodies("w" * MAX_REF_TEXT_CHARS)[body])
        assert ok.status_code == 201, ok.text


def test_a_stored_voice_with_a_long_ref_text_is_a_400_naming_voice(model_factory, tmp_path):
    """A voice stored before the limit (2,000,000 characters, as the review's) is refused by the request check: the
    replica answers 400 naming voice, its message names ref_text, and nothing of it is tokenized."""
    base = model_factory("base")
    store = VoiceStore(tmp_path / "voices")
    core = ReplicaCore(base, ModelConfig(name="b", model_type="base", max_new_tokens=16, default_max_new_tokens=4),
                       store)
    t = base.cfg.talker
    huge = store.create(VoiceClonePromptItem(torch.zeros(8, t.num_code_groups, dtype=torch.long),
                                             torch.randn(t.hidden_size), False, True, "word " * 400_000),
                        name="huge", model="b", owner="")
    tokenized = []
    real_ref = base.tokenizer.ref

    async def main():
        base.tokenizer.ref = lambda text: tokenized.append(len(text)) or real_ref(text)
        core.start(asyncio.get_running_loop())
        try:
            return [x async for x in core.stream({"input": "Cloned speech.", "voice": huge["id"]})]
        finally:
            core.scheduler.stop()
            del base.tokenizer.ref
    items = asyncio.run(main())
    assert len(items) == 1 and items[0]["type"] == "error", items
    assert (items[0]["status"], items[0]["param"]) == (400, "voice") and "ref_text" in items[0]["message"], items
    assert tokenized == []
