"""Codec-level pieces of batched decode: right-padded chunks with per-row lengths, in-place row reset/scatter,
the length-grouping planner, and the no-host-sync contract of BatchedAudio."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from qwen_tts_core.codec.context import codes_key
from qwen_tts_core.codec.rows import StreamRows, plan_groups, split_calls
from qwen_tts_core.codec.state import window_at
from qwen_tts_core.generate.audio_stream import BatchedAudio

SPF = 1920
TOL = 1e-4


def test_window_at_takes_per_row_slices():
    x = torch.arange(2 * 3 * 10).view(2, 3, 10)
    got = window_at(x, torch.tensor([0, 6]), 4, 2)
    assert torch.equal(got[0], x[0, :, 0:4]) and torch.equal(got[1], x[1, :, 6:10])
    y = torch.arange(2 * 2 * 9 * 3).view(2, 2, 9, 3)
    got = window_at(y, torch.tensor([5, 1]), 3, 2)
    assert torch.equal(got[0], y[0, :, 5:8]) and torch.equal(got[1], y[1, :, 1:4])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decode_rows_with_ragged_lengths_equals_offline(codec, seed):
    """4 rows, 12 calls: each call pads every row to the call's longest chunk (lengths 0..7, some rows idle);
    every row == its own offline decode, positions advance by the real frames only."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    total = 80
    codes = torch.randint(0, 2048, (4, 16, total), generator=g)
    offline = codec.decoder.decode(codes)
    state = codec.new_stream(4)
    done = [0, 0, 0, 0]
    outs: list[list[torch.Tensor]] = [[], [], [], []]
    for _ in range(12):
        lens = [min(rng.choice([0, 1, 2, 4, 7]), total - d) for d in done]
        t = max(max(lens), 1)
        chunk = torch.randint(0, 2048, (4, 16, t), generator=g)       # padding: other valid codes
        for b in range(4):
            chunk[b, :, : lens[b]] = codes[b, :, done[b]: done[b] + lens[b]]
        wav = codec.decoder.decode_rows(chunk, state, torch.tensor(lens))
        assert wav.shape == (4, t * SPF)
        for b in range(4):
            outs[b].append(wav[b, : lens[b] * SPF])
            done[b] += lens[b]
        assert state.positions.tolist() == done
    for b in range(4):
        row = torch.cat(outs[b])
        assert float((row - offline[b, : row.numel()]).abs().max()) <= TOL


def test_decode_rows_refuses_mismatched_shapes(codec):
    state = codec.new_stream(2)
    with pytest.raises(ValueError, match="lengths"):
        codec.decoder.decode_rows(torch.zeros(2, 16, 3, dtype=torch.long), state, torch.tensor([1]))
    with pytest.raises(ValueError, match="frame"):
        codec.decoder.decode_rows(torch.zeros(2, 16, 0, dtype=torch.long), state, torch.tensor([0, 0]))


def test_pending_buffer_grows_keeping_frames(codec):
    bank = StreamRows(codec.decoder, rows=2, capacity=2)
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 2048, (9, 16), generator=g)
    for i in range(9):
        bank.write([1], [i], codes[i: i + 1])
    assert bank.capacity >= 9
    assert torch.equal(bank.pending[1, :9], codes)
    wav = bank.decode([1], [9])
    ref = codec.decoder.decode(codes.T[None])
    assert float((wav[0, : 9 * SPF] - ref[0]).abs().max()) <= TOL


def _cost(groups, lengths, call_cost):
    return sum(call_cost + len(gr) * max(lengths[i] for i in gr) for gr in groups)


def _partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        yield [[first], *part]
        for i in range(len(part)):
            yield [*part[:i], [first, *part[i]], *part[i + 1:]]


@pytest.mark.parametrize("call_cost", [0.0, 1.0, 4.0, 30.0, float("inf")])
def test_plan_groups_is_optimal(call_cost):
    rng = random.Random(int(min(call_cost, 99)))
    for _ in range(40):
        lengths = [rng.choice([1, 1, 2, 3, 4, 4, 4, 9]) for _ in range(rng.randint(1, 6))]
        groups = plan_groups(lengths, call_cost)
        assert sorted(itertools.chain(*groups)) == list(range(len(lengths)))
        best = min(_cost(p, lengths, call_cost) for p in _partitions(list(range(len(lengths)))))
        assert _cost(groups, lengths, call_cost) == best
    assert plan_groups([], 1.0) == []
    assert len(plan_groups([4, 1, 4, 2], float("inf"))) == 1
    assert sorted(map(sorted, plan_groups([4, 1, 4, 2], 0.0))) == [[0, 2], [1], [3]]


def test_split_calls_caps_row_frames():
    lengths = [4, 4, 4, 1, 1, 9]
    calls = split_calls([[0, 1, 2], [3, 4], [5]], lengths, 8)
    assert calls == [[0, 1], [2], [3, 4], [5]]            # 2 rows x 4 frames; a 9-frame row still gets a call
    assert split_calls([[0, 1, 2]], lengths, 0) == [[0, 1, 2]]


class HostReads(TorchFunctionMode):
    """Counts tensor -> host reads (each a device sync on a GPU): item, tolist, cpu, numpy, bool/int/float/index."""

    READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "equal",
             "nonzero", "masked_select", "unique"}

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def test_no_host_reads_but_the_one_pcm_copy(codec):
    """push never reads device memory; decode reads once (the samples), however many rows and groups."""
    g = torch.Generator().manual_seed(2)
    audio = BatchedAudio(codec, max_rows=6, call_cost=0.0)   # split by length: several calls, still one copy
    ref = torch.randint(0, 2048, (5, 16), generator=g)
    key = codes_key(ref)  # the engine takes it when a request arrives, from the voice prompt's host tensor
    with HostReads() as h:
        for k in range(6):
            audio.open(k, 1 + k % 3, 2 + k % 2, ref_codes=ref if k == 2 else None, ref_key=key if k == 2 else None)
    assert h.reads == [], h.reads
    for step in range(6):
        with HostReads() as h:
            audio.push(list(range(6)), torch.randint(0, 2048, (6, 16), generator=g))
        assert h.reads == [], h.reads
        with HostReads() as h:
            outs = audio.decode()
        assert h.reads == (["cpu", "numpy"] if outs else []), (step, h.reads)
    for k in range(6):
        audio.finish(k)
    with HostReads() as h:
        outs = audio.decode()
    assert len(outs) == 6 and all(o.final for o in outs)
    assert h.reads.count("cpu") <= 1


def test_bf16_decode_is_close_and_returns_float32(codec):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2048, (20, 16), generator=g)
    ref = codec.decoder.decode(codes.T[None])[0].numpy()
    audio = BatchedAudio(codec, max_rows=1, dtype=torch.bfloat16)
    assert audio.bank.decoder is not codec.decoder and codec.dtype == torch.float32
    audio.open(1, 1, 4)
    outs = []
    for i in range(20):
        audio.push([1], codes[i: i + 1])
        outs += audio.decode()
    audio.finish(1)
    outs += audio.decode()
    pcm = np.concatenate([o.pcm for o in outs])
    assert pcm.dtype == np.float32 and pcm.shape == ref.shape
    err = float(np.sqrt(np.mean((pcm - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))
    assert 0 < err < 0.15, err          # bf16 really ran, and stayed close


def test_decoders_in_another_dtype_are_one_shared_copy(codec):
    """Engines on one model that decode in bf16 share the codec's one converted decoder (memory, and its weights stay
    warm); the codec's own decoder stays fp32 and untouched."""
    before = {k: v.clone() for k, v in codec.decoder.state_dict().items()}
    a, b = BatchedAudio(codec, max_rows=1, dtype=torch.bfloat16), BatchedAudio(codec, max_rows=2, dtype=torch.bfloat16)
    assert a.bank.decoder is b.bank.decoder is codec.decoder_in(torch.bfloat16)
    assert a.bank.decoder.pre_conv.conv.weight.dtype == torch.bfloat16
    assert codec.decoder_in(None) is codec.decoder_in(torch.float32) is codec.decoder
    assert BatchedAudio(codec, max_rows=1).bank.decoder is codec.decoder
    after = codec.decoder.state_dict()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], v) for k, v in before.items()
               if v.is_floating_point())


def test_a_converted_decoder_follows_weights_changed_since(codec):
    """Weights loaded into the codec after its bf16 copy was made reach the engines made from then on (a stale copy
    decoded with the old weights, silently)."""
    old = codec.decoder_in(torch.bfloat16)
    w = codec.decoder.pre_conv.conv.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.mul_(2)
        new = codec.decoder_in(torch.bfloat16)
        assert new is not old and torch.equal(new.pre_conv.conv.weight, (saved * 2).to(torch.bfloat16))
        assert codec.decoder_in(torch.bfloat16) is new  # one copy per change
        assert torch.equal(old.pre_conv.conv.weight, saved.to(torch.bfloat16))  # a holder's copy is left alone
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert torch.equal(codec.decoder_in(torch.bfloat16).pre_conv.conv.weight, saved.to(torch.bfloat16))
