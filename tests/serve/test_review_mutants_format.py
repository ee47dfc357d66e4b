"""Mutation review of serve/audio_format.py and serve/schemas.py: rules the rest of the suite did not pin, each test
naming the hand-written mutant it kills (a changed default, bound, table entry or message). No Ray; a few seconds."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from pydantic import ValidationError

from qwen_tts_core.errors import RequestError
from serve.audio_format import _Sink, make_encoder, mp3_frame_length, streaming_wav_header
from serve.schemas import (
    ApiError,
    ErrorDetail,
    SpeechRequest,
    VoiceUpload,
    WSConfig,
    WSEnd,
    WSText,
    api_field,
    from_request_error,
    from_validation_error,
)
from tests.serve.helpers import decode_av
from tests.serve.inproc import ingress_app
from tests.serve.test_backpressure import Replica

SR = 24000


def _speech_error(body: dict) -> ApiError:
    """The 400 a speech body gets from the schema (what POST /v1/audio/speech answers)."""
    with pytest.raises(ValidationError) as e:
        SpeechRequest.model_validate(body)
    return from_validation_error(e.value)


# --- WebSocket response formats ------------------------------------------------------------------------------------
def _ws(monkeypatch, tmp_path, config: dict) -> tuple[list[dict], bytes]:
    """(the JSON messages, the audio bytes) of one WebSocket session over a replica that sends 2 x 480 samples of 0.1."""
    client, _ = ingress_app(monkeypatch, {"models": [{"name": "cv"}], "voices_uri": str(tmp_path / "voices")},
                            {"cv": Replica()})
    msgs, audio = [], b""
    with client, client.websocket_connect("/v1/audio/speech/stream") as ws:
        ws.send_json({"type": "config", "voice": "ryan", **config})
        while True:
            m = ws.receive()
            if m.get("bytes"):
                audio += m["bytes"]
            elif m.get("text"):
                msgs.append(json.loads(m["text"]))
                if msgs[-1]["type"] in ("done", "error"):
                    break
    return msgs, audio


def test_websocket_audio_is_raw_pcm_unless_wav_is_asked(monkeypatch, tmp_path):
    """The WebSocket's formats are pcm (the default) and wav; its wav header says the service's rate, 24 kHz, mono
    s16 (mutants: wav as the default, wav refused, make_encoder's default rate changed: the WebSocket relies on it)."""
    msgs, audio = _ws(monkeypatch, tmp_path, {})
    assert msgs[0]["format"] == "pcm" and msgs[-1]["type"] == "done", msgs
    assert np.frombuffer(audio, "<i2").tolist() == [3277] * 960
    msgs, audio = _ws(monkeypatch, tmp_path, {"response_format": "wav"})
    assert (msgs[0]["format"], msgs[0]["sample_rate"], msgs[-1]["type"]) == ("wav", SR, "done"), msgs
    assert audio[:44] == streaming_wav_header(SR) and len(audio) == 44 + 2 * 960
    y, sr = decode_av(audio)
    assert sr == SR and len(y) == 960


def test_websocket_refuses_the_http_only_formats(monkeypatch, tmp_path):
    """mp3 (like flac, opus, aac) is an HTTP format: a WebSocket config asking for it is an error naming
    `response_format` (mutant: the WebSocket took every HTTP format)."""
    msgs, audio = _ws(monkeypatch, tmp_path, {"response_format": "mp3"})
    assert audio == b"" and len(msgs) == 1, msgs
    assert (msgs[0]["type"], msgs[0]["error"]["param"]) == ("error", "response_format"), msgs


# --- error bodies ---------------------------------------------------------------------------------------------------
def test_a_500_is_a_server_error_and_a_4xx_sends_no_retry_after():
    """OpenAI's clients read `type`: 500 is the server's fault (mutant: `<= 500`); an ApiError carries no header
    unless given one (mutant: a default Retry-After on every error)."""
    assert ApiError(500, "x").body()["error"]["type"] == "server_error"
    assert ApiError(499, "x").body()["error"]["type"] == "invalid_request_error"
    assert ApiError(400, "x").headers == {}


def test_the_documented_error_type_is_one_of_openais_two():
    """/openapi.json's ErrorDetail says which `type` values exist (mutant: any string)."""
    assert ErrorDetail.model_json_schema()["properties"]["type"]["enum"] == ["invalid_request_error", "server_error"]


def test_validation_messages_are_the_rule_without_pydantic_wording():
    """A value the schema refuses is `<field>: <rule>`: the voice forms without pydantic's "Value error, " prefix,
    and speed's range from the core (mutants: the prefix kept, speed's message replaced)."""
    err = _speech_error({"input": "Hi.", "voice": 5})
    assert err.message == 'voice: expected a speaker name, a stored voice id, or {"id": "<voice id>"}', err.message
    err = _speech_error({"input": "Hi.", "speed": 5.0})
    assert (err.param, err.message) == ("speed", "speed: must be between 0.25 and 4.0, got 5.0")


@pytest.mark.parametrize("field,value", [("seed", 1.0), ("seed", "7"), ("top_k", True), ("temperature", "0.5"),
                                         ("max_new_tokens", 8.0), ("non_streaming_mode", 1)])
def test_the_schema_takes_strict_json_types(field, value):
    """The schema checks strict types before the core sees a value: 1.0 is no integer, "7" no number, true no
    integer, 1 no boolean (mutants: lax types, the sampling fields or `seed` typed loosely)."""
    assert _speech_error({"input": "Hi.", field: value}).param == field


def test_stream_format_is_audio_or_sse_and_nothing_else():
    """`stream_format` takes `audio` and `sse` only (mutant: one more value accepted and served as raw audio)."""
    for value in ("chunked", "SSE", "json"):
        err = _speech_error({"input": "Hi.", "stream_format": value})
        assert err.param == "stream_format", (value, err.message)


def test_a_voice_object_is_its_id_exactly():
    """`{"id": v}` is the same request as `v`, character for character (mutant: the object's id trimmed)."""
    for v in (" voice_0123456789abcdef ", "ryan\t"):
        assert SpeechRequest.model_validate({"input": "Hi.", "voice": {"id": v}}).voice == v
        assert SpeechRequest.model_validate({"input": "Hi.", "voice": v}).voice == v


def test_the_first_field_in_error_is_the_one_named():
    """With several bad fields the answer names the first of the schema's order (mutant: the last pydantic error)."""
    err = _speech_error({"input": "Hi.", "seed": "x", "speed": "y", "bogus": 1})
    assert err.param == "seed", err.message


def test_core_fields_are_named_as_the_client_sent_them():
    """`API_FIELD`: each core argument name becomes the API field the client sent; a server-side setting names no
    field; a batch's `ref_audio[i]` is where the reference audio came from; a core field the table does not list
    passes through (mutants: a table entry or the server-side set changed, `ref_audio[` not mapped)."""
    core = ("text", "speaker", "voice_clone_prompt", "kind", "x_vector_only_mode", "instruct", "ref_text", "name")
    assert [api_field(f) for f in core] == \
           ["input", "voice", "voice", "model", "x_vector_only", "instructions", "ref_text", "name"]
    assert [api_field(f) for f in ("sampling", "first_chunk_frames", "chunk_frames")] == [None, None, None]
    assert api_field("ref_audio[2]", "audio_url") == api_field("ref_audio", "audio_url") == "audio_url"
    assert api_field("ref_audio[0]") == "file"
    assert api_field("top_k") == "top_k" and api_field("something_new") == "something_new"
    assert from_request_error(RequestError("ref_audio", "audio bytes is empty")).param == "file"


@pytest.mark.parametrize("model,body,param", [
    (WSText, {"type": "text", "text": "Hi.", "session": "r1-abc"}, "session"),
    (WSText, {"type": "text"}, "text"),
    (WSEnd, {"type": "end", "text": "Hi."}, "text"),
    (WSConfig, {"type": "end"}, "type"),
    (VoiceUpload, {"audio_base64": "AAAA"}, "name"),
])
def test_websocket_messages_and_voice_uploads_are_exact(model, body, param):
    """A WebSocket text message needs its `text` and nothing else, `end` carries nothing, the first message must be
    the config, a voice upload needs a `name` (mutants: extra keys ignored, `text` or `name` optional, any `type`
    taken as the config)."""
    with pytest.raises(ValidationError) as e:
        model.model_validate(body)
    assert from_validation_error(e.value, whole="message").param == param


def test_a_voice_upload_keeps_the_reference_text_unless_asked():
    """`x_vector_only` is off unless the client sets it: the reference text conditions the clone (mutant: on by
    default)."""
    assert VoiceUpload.model_validate({"name": "v", "audio_base64": "AAAA"}).x_vector_only is False


# --- encoders -------------------------------------------------------------------------------------------------------
def test_the_wav_header_scales_with_channels_and_bits():
    """fmt's byte rate and block align are rate x channels x bytes and channels x bytes (mutants: either ignoring
    the channel count, which mono alone cannot tell)."""
    h = streaming_wav_header(16000, channels=2, bits=16)
    assert struct.unpack("<IHHIIHH", h[16:36]) == (16, 1, 2, 16000, 64000, 4, 16)


def test_mp3_frame_length_reads_padding_versions_and_refuses_reserved_fields():
    """The tag frame's length decides how many bytes are never sent: a padded frame is one byte longer, MPEG-2.5
    has its own rates; a reserved version, free or bad bitrate, reserved rate, a layer other than III or a short
    header is not a frame (mutants: each of those checks dropped or tables merged)."""
    assert mp3_frame_length(bytes([0xFF, 0xFB, 0x92, 0x64])) == 418      # MPEG-1 128 kbit/s 44.1 kHz, padded
    assert mp3_frame_length(bytes([0xFF, 0xE3, 0x84, 0xC4])) == 384      # MPEG-2.5 64 kbit/s 12 kHz
    for h in ([0xFF, 0xEB, 0x84, 0xC4],    # version 01: reserved
              [0xFF, 0xFB, 0x04, 0xC4],    # bitrate index 0: free format
              [0xFF, 0xFB, 0xF4, 0xC4],    # bitrate index 15: bad
              [0xFF, 0xFB, 0x9C, 0x64],    # sample rate index 3: reserved
              [0xFF, 0xFD, 0x90, 0x64],    # layer II
              [0xFF, 0xFB, 0x90]):         # 3 bytes
        assert mp3_frame_length(bytes(h)) is None, bytes(h).hex()


def test_the_sink_holds_only_what_it_has_not_sent():
    """After a drain the sink's buffer starts at the sent mark: the next write holds its own bytes, not a zero-filled
    copy of the whole stream so far (mutant: the base not advanced, memory O(stream) on every write, which the
    memory test cannot see as the buffer is emptied again before it looks)."""
    s = _Sink()
    s.write(b"A" * 100_000)
    assert s.drain() == b"A" * 100_000
    s.write(b"B" * 10)
    assert (s.base, len(s.buf)) == (100_000, 10)
    assert s.drain() == b"B" * 10


@pytest.mark.parametrize("fmt,low,high", [("opus", 35_000, 50_000), ("aac", 58_000, 75_000)])
def test_lossy_streams_keep_their_bit_rate(fmt, low, high):
    """What a client downloads per second of audio that fills any bit budget (noise): Opus at 32 kbit/s plus
    ~11 kbit/s of Ogg pages (one per 20 ms), AAC at 64 kbit/s (mutants: other encoder bit rates)."""
    x, enc = np.random.default_rng(0).uniform(-0.5, 0.5, 3 * SR).astype(np.float32), make_encoder(fmt, SR)
    data = b"".join(enc.push(x[i:i + 7680]) for i in range(0, len(x), 7680)) + enc.finish()
    assert low <= len(data) * 8 / 3.0 <= high, len(data) * 8 / 3.0
