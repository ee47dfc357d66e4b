"""The codec decoder's streaming internals pinned by a mutation review (decoder.py, layers.py, transformer.py,
quantizer.py, state.py, context.py): each test here failed on a code change (a "mutant", named in its docstring) that
the rest of the codec suite let pass. The rules: codes outside the codebook are refused naming them, a padded call
leaves nothing of its padding behind, a row started over (reset, zero_rows_) or copied (scatter_, select, concat)
decodes as a fresh or the copied stream, bit for bit, and a cached reference state is the reference's own."""

from __future__ import annotations

import copy

import pytest
import torch

from qwen_tts_core.codec.context import ContextCache, _nbytes
from qwen_tts_core.codec.state import CodecStreamState

SPF = 1920
TOL = 1e-4


def _codes(b: int, t: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 2048, (b, 16, t), generator=torch.Generator().manual_seed(seed))


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.shape == want.shape and (got - want).abs().max().item() <= TOL


def _state_equal(a: CodecStreamState, b: CodecStreamState) -> bool:
    """Every field of the two states, each named table's tensors by name (not through `_tensors`)."""
    return (torch.equal(a.positions, b.positions)
            and a.conv_history.keys() == b.conv_history.keys() and a.trans_tail.keys() == b.trans_tail.keys()
            and all(torch.equal(a.conv_history[k], b.conv_history[k]) for k in a.conv_history)
            and all(torch.equal(a.trans_tail[k], b.trans_tail[k]) for k in a.trans_tail)
            and all(torch.equal(x, y) for x, y in zip(a.keys, b.keys))
            and all(torch.equal(x, y) for x, y in zip(a.values, b.values)))


# --- checks ---------------------------------------------------------------------------------------------------
def test_a_code_equal_to_the_codebook_size_is_refused_naming_codes(codec):
    """C01: `hi >= codebook_size` became `hi > codebook_size`: code 2048 (one past the last of 2048) passed the
    check and failed deep in an embedding lookup with an IndexError that names nothing the caller sent."""
    codes = _codes(1, 3, 0)
    codes[0, 5, 1] = 2048
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 2047\]"):
        codec.decoder.decode(codes)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 2047\]"):
        codec.decoder.decode_chunk(codes, codec.new_stream(1))
    codes[0, 5, 1] = 2047  # the last code is fine
    assert codec.decoder.decode(codes).shape == (1, 3 * SPF)


def test_decode_rows_checks_the_codes_shape_naming_codes(codec):
    """C12: decode_rows lost its `check_codes` (shape and dtype): 15 codebooks or float codes reached the math and
    failed there (an index error, or a lookup of truncated floats) instead of a ValueError naming `codes`."""
    state = codec.new_stream(2)
    lengths = torch.tensor([1, 1])
    for bad in (torch.zeros(2, 15, 1, dtype=torch.long), torch.zeros(2, 16, 1), torch.zeros(2, 16, dtype=torch.long)):
        with pytest.raises(ValueError, match="codes"):
            codec.decoder.decode_rows(bad, state, lengths)
    assert torch.equal(state.positions, torch.zeros(2, dtype=torch.long))


def test_a_state_needs_at_least_one_row(codec):
    """C08: `new_state(0)` made an empty state (batch_size < 0 refused only) that every later call failed on."""
    with pytest.raises(ValueError, match="batch_size"):
        codec.decoder.new_state(0)


def test_a_chunk_of_no_frames_gives_no_samples_and_leaves_the_state(codec):
    """C06: the t == 0 early return dropped: a chunk of zero frames (a stream flushed with nothing pending) ran the
    convs on an empty input and raised instead of returning [B, 0] samples with the state untouched."""
    codes = _codes(2, 6, 1)
    want = codec.decoder.decode(codes)
    state = codec.new_stream(2)
    a = codec.decode_chunk(codes[..., :2], state)
    before = copy.deepcopy(state)
    empty = codec.decode_chunk(codes[..., 2:2], state)
    assert empty.shape == (2, 0) and _state_equal(state, before)
    b = codec.decode_chunk(codes[..., 2:], state)
    assert _close(torch.cat([a, b], -1), want)



@pytest.mark.parametrize("dtype", [torch.int16, torch.int32], ids=["int16", "int32"])
def test_codes_of_any_integer_dtype_decode_as_long_codes(codec, dtype):
    """C55: `_on` kept codes of another integer dtype as they came (it only moved devices): the checks accept
    int16/int32 codes (codes read from a file, numpy), and the lookup then refused int16 or took the int32 path of
    another kernel; they must decode exactly as the same values in int64, streaming and padded."""
    codes = _codes(2, 3, 10)
    want = codec.decoder.decode(codes)
    assert torch.equal(codec.decoder.decode(codes.to(dtype)), want)
    state = codec.new_stream(2)
    got = codec.decoder.decode_rows(codes.to(dtype), state, torch.tensor([3, 3], dtype=torch.int32))
    assert _close(got, want)

# --- padded calls ---------------------------------------------------------------------------------------------
def test_a_padded_call_leaves_no_row_lengths_on_the_state(codec):
    """C04: `state.valid = None` dropped from forward_unclamped's finally: the row lengths of a right-padded call
    stayed on the state, and the next whole chunk decoded as if padded (its conv histories, tails and KV taken at
    the old lengths): every sample after it wrong."""
    codes = _codes(2, 6, 2)
    want = codec.decoder.decode(codes)
    state = codec.new_stream(2)
    first = codec.decoder.decode_rows(codes[..., :3], state, torch.tensor([3, 3]))
    assert state.valid is None
    rest = codec.decode_chunk(codes[..., 3:], state)
    assert _close(torch.cat([first, rest], -1), want)


# --- starting rows over, copying rows ---------------------------------------------------------------------------
def test_reset_without_a_mask_starts_every_row_over(codec):
    """C16: `reset()` (no mask: every row) built an all-False mask and reset nothing: a reused state went on from
    the last stream's history, so the next stream's audio began with the previous one's tails and positions.
    C14: reset kept the KV caches (masked by the reset positions, so the same samples, but not the fresh state
    `reset` promises: a state copied out of it carried the previous stream's keys)."""
    codes = _codes(2, 4, 3)
    want = codec.decoder.decode(codes)
    state = codec.new_stream(2)
    codec.decode_chunk(_codes(2, 5, 4), state)
    state.reset()
    assert _state_equal(state, codec.new_stream(2))
    assert _close(codec.decode_chunk(codes, state), want)


def test_the_context_cache_counts_every_tensor_of_a_state(codec):
    """C22: `_tensors()` left out the KV caches: zero_rows_ kept them (masked, so the same audio) but the context
    cache counted a state at a fraction of its bytes (the KV cache is most of it), so `max_bytes` held several
    times more memory than it says. C26: a state of exactly `max_bytes` was not kept (`size < max_bytes`)."""
    decoder = copy.deepcopy(codec.decoder)
    ref = _codes(1, 5, 5)[0].T
    state = decoder.context_state(ref)
    everything = [state.positions, *state.conv_history.values(), *state.trans_tail.values(), *state.keys,
                  *state.values]
    total = sum(t.numel() * t.element_size() for t in everything)
    assert _nbytes(state) == total and decoder.context_cache.nbytes == total
    decoder.context_cache = ContextCache(max_bytes=total - 1)  # one byte short: kept nowhere
    decoder.context_state(ref)
    assert len(decoder.context_cache) == 0 and decoder.context_cache.nbytes == 0
    decoder.context_cache = ContextCache(max_bytes=total)  # exactly its size: kept
    decoder.context_state(ref)
    assert len(decoder.context_cache) == 1 and decoder.context_cache.nbytes == total


def test_a_state_computed_twice_at_once_is_kept_and_counted_once(codec):
    """C30: `key not in self._entries` dropped from the insertion: two lookups of one new reference computing at
    once (engines in threads) both inserted it, and its bytes were counted twice while one entry was held, so the
    cache evicted other voices early and never got those bytes back. The race is made deterministic here: the
    second lookup runs inside the first one's computation."""
    decoder = copy.deepcopy(codec.decoder)
    cache = decoder.context_cache
    ref = _codes(1, 4, 6)[0].T
    real = cache._compute
    inner, nested = [], []

    def compute(dec, codes):
        if not nested:
            nested.append(True)
            inner.append(cache.state(dec, codes))  # the same key, looked up while this one computes
        return real(dec, codes)

    cache._compute = compute
    decoder.context_state(ref)
    assert len(cache) == 1 and cache.nbytes == _nbytes(inner[0])


def test_a_state_computed_under_old_weights_is_not_kept(codec):
    """C33: the insertion lost its `weights == self._weights` check: a reference state computed while the weights
    changed (load_state_dict in another thread, a lookup seeing the new weights meanwhile) was kept, and every
    later session of that voice started from the old weights' state: audio of the wrong decoder."""
    decoder = copy.deepcopy(codec.decoder)
    cache = decoder.context_cache
    ref, other = _codes(1, 4, 7)[0].T, _codes(1, 3, 8)[0].T
    real = cache._compute

    def compute(dec, codes):
        state = real(dec, codes)  # under the old weights
        if codes.shape[0] == ref.shape[0]:
            with torch.no_grad():
                dec.decoder[1].block[2].conv1.conv.weight[0, 0, 0] += 0.5  # the weights change meanwhile
            cache.state(dec, other)  # a lookup under the new weights
        return state

    cache._compute = compute
    decoder.context_state(ref)
    cache._compute = real
    fresh = decoder.new_state(1)
    with torch.inference_mode():
        decoder.forward_unclamped(ref.T[None], fresh)
    assert _state_equal(decoder.context_state(ref), fresh)


# --- layers -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("matmul", [False, True], ids=["conv-kernel", "matmul"])
def test_a_causal_transposed_conv_streams_the_full_transposed_conv_with_its_bias(matmul, monkeypatch):
    """C43: the transposed conv's bias was dropped. Streaming and offline decode both lost it (so they still
    agreed) and the tiny checkpoint's parity needs the oracle: every upsampling layer's output was off by its bias.
    Pinned against `F.conv_transpose1d` over the whole input, trimmed causally, fed in chunks of 1, 3 and 2."""
    from qwen_tts_core.codec import layers

    monkeypatch.setitem(layers.MATMUL_ROWS, "trans", 0.0 if matmul else float("inf"))
    torch.manual_seed(0)
    conv = layers.CausalTransConv(6, 4, kernel_size=6, stride=3)
    with torch.no_grad():
        conv.conv.bias.copy_(torch.randn(4))
    conv.state_key = "t"
    x = torch.randn(2, 6, 6)
    want = torch.nn.functional.conv_transpose1d(x, conv.conv.weight, conv.conv.bias, stride=3)[..., : 6 * 3]
    state = CodecStreamState(positions=torch.zeros(2, dtype=torch.long), trans_tail={"t": torch.zeros(2, 4, 3)})
    with torch.no_grad():
        got = torch.cat([conv(x[..., a:b], state) for a, b in ((0, 1), (1, 4), (4, 6))], dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_codebook_entry_never_used_decodes_finite_on_both_lookup_paths(codec):
    """C52, C53: a codebook's `cluster_usage` clamp (min eps) dropped from the few-codes lookup (every streaming
    chunk on CPU) or from the whole-codebook one (GPU, and CPU calls of >= 2048 codes): an entry whose usage is 0 (a
    code the encoder never picked while training: real checkpoints have them) divided by zero, and its frames
    decoded to inf/NaN, which the final clamp does not mend."""
    book = copy.deepcopy(codec.decoder.quantizer.rvq_rest.vq.layers[0]._codebook)
    with torch.no_grad():
        book.cluster_usage[7] = 0.0
        book.embedding_sum[7] = 1e-6
    want = book.embedding_sum[7] / book.eps
    few = book.lookup(torch.tensor([[7, 3]]))                         # fewer codes than entries: rows only
    many = book.lookup(torch.full((1, book.cluster_usage.shape[0]), 7))  # as many: the whole codebook
    for got in (few[0, 0], many[0, -1]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)


# --- the sliding-window mask --------------------------------------------------------------------------------------
@pytest.mark.parametrize("seen", [0, 5], ids=["fresh", "after-5-frames"])
def test_kv_entries_before_a_rows_first_frame_are_never_read(codec, seen):
    """C48, C49: the mask's `k_idx >= cache - positions` let one (C48) or every (C49) cache entry older than the
    row's first frame be attended to. Stream and offline decode both start from zeros, so they still agreed (only
    the oracle parity saw the change); here the cache entries before the first frame hold garbage, as a reused row
    whose KV was not cleared does (`zero_rows_` and `reset` clear them, but the mask is what makes that
    unnecessary): the samples must be those of a clean state."""
    codes = _codes(1, 8, 9)
    clean = codec.new_stream(1)
    dirty = codec.new_stream(1)
    g = torch.Generator().manual_seed(1)
    for cache in (dirty.keys, dirty.values):
        for i, t in enumerate(cache):
            cache[i] = torch.randn(t.shape, generator=g)
    if seen:
        codec.decode_chunk(codes[..., :seen], clean)
        codec.decode_chunk(codes[..., :seen], dirty)
    got = codec.decode_chunk(codes[..., seen:], dirty)
    want = codec.decode_chunk(codes[..., seen:], clean)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
