"""The decoder state after a voice-clone reference is computed once per reference and weights, and shared:
equal to decoding the reference, found again by content, dropped when the weights change, bounded, never written."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch

from qwen_tts_core.codec.context import CONTEXT_PIECE, ContextCache, _nbytes, codes_key
from qwen_tts_core.codec.state import CodecStreamState
from qwen_tts_core.generate.audio_stream import BatchedAudio


def refs(n: int, frames: int = 7, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 2048, (frames, 16), generator=g) for _ in range(n)]


def decoded(decoder, codes: torch.Tensor) -> CodecStreamState:
    """The state after decoding `codes` from a fresh start, computed here without any cache."""
    state = decoder.new_state(1)
    with torch.inference_mode():
        for s in range(0, codes.shape[0], CONTEXT_PIECE):
            decoder.forward_unclamped(codes[s: s + CONTEXT_PIECE].T[None], state)
    return state


def same(a: CodecStreamState, b: CodecStreamState) -> bool:
    return torch.equal(a.positions, b.positions) and all(torch.equal(x, y) for x, y in zip(a._tensors(), b._tensors()))


class Counted:
    """Counts the decoder calls made through forward_unclamped."""

    def __init__(self, decoder, monkeypatch) -> None:
        self.n = 0
        real = decoder.forward_unclamped

        def counted(*a, **k):
            self.n += 1
            return real(*a, **k)

        monkeypatch.setattr(decoder, "forward_unclamped", counted)


@pytest.fixture
def decoder(codec):
    return copy.deepcopy(codec.decoder)  # its own weights and cache: the tests below change both


def test_state_equals_decoding_the_reference_and_is_found_by_content(decoder, monkeypatch):
    (ref,) = refs(1, frames=CONTEXT_PIECE + 9)  # two pieces
    want = decoded(decoder, ref)
    calls = Counted(decoder, monkeypatch)
    first = decoder.context_state(ref)
    assert calls.n == 2 and int(first.positions[0]) == ref.shape[0]
    assert same(first, want)
    # another tensor with the same values (a voice loaded again, int32 from a file) finds it: no decode
    for twin in (ref.clone(), ref.to(torch.int32)):
        assert decoder.context_state(twin) is first
    assert decoder.context_state(ref, key=codes_key(ref)) is first
    assert calls.n == 2 and decoder.context_cache.hits == 3
    other = ref.clone()
    other[-1, 3] = (other[-1, 3] + 1) % 2048  # one code differs: another state
    assert decoder.context_state(other) is not first and calls.n == 4
    assert not same(decoder.context_state(other), first)


def test_a_weight_change_drops_every_state(decoder):
    (ref,) = refs(1)
    before = decoder.context_state(ref)
    with torch.no_grad():
        decoder.decoder[1].block[2].conv1.conv.weight[0, 0, 0] += 0.5  # in place, as load_state_dict writes
    after = decoder.context_state(ref)
    assert after is not before and not same(after, before)
    assert same(after, decoded(decoder, ref)) and len(decoder.context_cache) == 1


def test_the_cache_keeps_the_most_recent_within_its_bytes(decoder, monkeypatch):
    a, b, c = refs(3)
    size = _nbytes(decoder.context_state(a))
    decoder.context_cache = ContextCache(max_bytes=2 * size)
    for r in (a, b, a, c):  # c evicts b, the least recently used
        decoder.context_state(r)
    cache = decoder.context_cache
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes
    calls = Counted(decoder, monkeypatch)
    decoder.context_state(a), decoder.context_state(c)
    assert calls.n == 0
    decoder.context_state(b)
    assert calls.n == 1
    decoder.context_cache = ContextCache(max_bytes=0)  # keeps nothing, still answers
    assert same(decoder.context_state(a), decoded(decoder, a)) and len(decoder.context_cache) == 0
    with pytest.raises(ValueError, match="max_bytes"):
        ContextCache(max_bytes=-1)


def test_a_copy_of_the_decoder_has_its_own_empty_cache(codec):
    (ref,) = refs(1)
    codec.decoder.context_state(ref)
    twin = copy.deepcopy(codec.decoder)
    assert len(twin.context_cache) == 0 and twin.context_cache is not codec.decoder.context_cache
    assert same(twin.context_state(ref), codec.decoder.context_state(ref))
    bf16 = codec.decoder_in(torch.bfloat16)
    assert bf16.context_state(ref).keys[0].dtype == torch.bfloat16


def test_engines_in_threads_share_states_safely(decoder):
    rs = refs(2)
    want = [decoded(decoder, r) for r in rs]
    got, errors = [], []

    def worker(i: int) -> None:
        try:
            got.append((i % 2, decoder.context_state(rs[i % 2])))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(got) == 6
    assert all(same(s, want[i]) for i, s in got)
    assert len(decoder.context_cache) == 2


def test_streaming_rows_leave_the_shared_state_unchanged(codec):
    """Rows start from a copy: decoding after the reference must not write into the cached state, and two rows
    with one voice, opened one after the other, give the same samples."""
    decoder = codec.decoder
    ref, frames = refs(1, frames=9, seed=5)[0], refs(1, frames=6, seed=6)[0]
    audio = BatchedAudio(codec, max_rows=2)
    outs = []
    for key in (0, 1):
        audio.open(key, first_chunk_frames=2, chunk_frames=2, ref_codes=ref, ref_key=codes_key(ref))
        pcm = []
        for f in frames:
            audio.push([key], f[None])
            pcm += [o.pcm for o in audio.decode()]
        audio.finish(key)
        pcm += [o.pcm for o in audio.decode()]
        outs.append(np.concatenate(pcm))
    assert same(decoder.context_state(ref), decoded(decoder, ref))
    assert np.array_equal(outs[0], outs[1])
    # and the samples are those of decoding reference + frames from scratch, reference samples dropped
    full = decoder.decode(torch.cat([ref, frames]).T[None])[0].numpy()
    assert np.abs(outs[0] - full[ref.shape[0] * 1920:]).max() <= 1e-4


def test_bad_reference_codes_name_the_argument(decoder):
    for bad in (torch.zeros(0, 16, dtype=torch.long), torch.zeros(4, 15, dtype=torch.long),
                torch.zeros(16, dtype=torch.long)):
        with pytest.raises(ValueError, match="codes"):
            decoder.context_state(bad)
