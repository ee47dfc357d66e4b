"""BatchedAudio: many sessions' streaming decode in one call per step, each row exactly its own offline decode.

The tests drive it like the engine does (one push per step for every live row, one decode per step) with seeded
random schedules: rows joining mid-way and leaving, dropped rows, freed row indices re-used, ICL reference priming,
1-frame and 0-frame sessions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from qwen_tts_core.generate.audio_stream import AudioOut, BatchedAudio

SPF = 1920
TOL = 1e-4        # stream == offline (fp32)
SAME = 1e-5       # decoded together == decoded alone


@dataclass
class Plan:
    """One session: its frames, when it opens, its chunking, an optional ICL reference, an optional drop step."""

    key: int
    codes: torch.Tensor                  # [T, 16]
    start: int
    first: int
    every: int
    ref: torch.Tensor | None = None      # [R, 16]
    drop_after: int | None = None        # frames pushed before the row is dropped
    outs: list[AudioOut] = field(default_factory=list)


def _codes(g: torch.Generator, n: int) -> torch.Tensor:
    return torch.randint(0, 2048, (n, 16), generator=g)


def random_plans(seed: int, n: int, max_frames: int = 40, max_start: int = 30, drops: bool = True,
                 refs: bool = True) -> list[Plan]:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    plans = []
    for key in range(n):
        t = rng.choice([0, 1, 2, rng.randint(3, max_frames), rng.randint(3, max_frames)])
        ref = _codes(g, rng.randint(1, 30)) if refs and rng.random() < 0.3 else None
        drop = rng.randint(0, t) if drops and t and rng.random() < 0.2 else None
        plans.append(Plan(key=100 + 7 * key, codes=_codes(g, t), start=rng.randint(0, max_start),
                          first=rng.choice([1, 1, 2, 3]), every=rng.choice([1, 2, 4, 4, 5]), ref=ref,
                          drop_after=drop))
    return plans


def run(codec, plans: list[Plan], max_rows: int, **kwargs) -> list[Plan]:
    """Drive BatchedAudio like Engine.step: open when due and a row is free, push one frame per live row, finish or
    drop, then one decode per step. Fills plan.outs."""
    audio = BatchedAudio(codec, max_rows=max_rows, **kwargs)
    by_key = {p.key: p for p in plans}
    waiting = sorted(plans, key=lambda p: p.start)
    live: dict[int, int] = {}      # key -> frames pushed
    closing: set[int] = set()      # finished, final output not seen yet
    step = 0
    while waiting or live or closing:
        for p in list(waiting):
            if p.start <= step and len(live) + len(closing) < max_rows:
                audio.open(p.key, p.first, p.every, ref_codes=p.ref)
                waiting.remove(p)
                live[p.key] = 0
        pushing = [k for k, n in live.items() if n < by_key[k].codes.shape[0]
                   and by_key[k].drop_after != n]
        if pushing:
            frames = torch.stack([by_key[k].codes[live[k]] for k in pushing])
            audio.push(pushing, frames)
            for k in pushing:
                live[k] += 1
        for k, n in list(live.items()):
            p = by_key[k]
            if p.drop_after == n:
                audio.drop(k)
                del live[k]
            elif n == p.codes.shape[0]:
                audio.finish(k)
                del live[k]
                closing.add(k)
        for out in audio.decode():
            assert out.key in by_key, out.key
            assert out.key in live or out.key in closing, f"output for a row that is gone: {out.key}"
            by_key[out.key].outs.append(out)
            if out.final:
                closing.discard(out.key)
            if out.error is not None:  # the row failed alone and is gone (the engine fails its session)
                live.pop(out.key, None)
        step += 1
        assert step < 10_000
    return plans


def offline(codec, p: Plan) -> np.ndarray:
    """The row's offline decode (after its ICL reference, whose samples are dropped)."""
    codes = p.codes if p.ref is None else torch.cat([p.ref, p.codes])
    if codes.shape[0] == 0:
        return np.zeros(0, np.float32)
    wav = codec.decoder.decode(codes.T[None])[0].numpy()
    skip = 0 if p.ref is None else p.ref.shape[0] * SPF
    return wav[skip:]


def check_plan(codec, p: Plan) -> np.ndarray:
    """Chunk bookkeeping of one row and its PCM == offline; returns the row's PCM."""
    n = p.codes.shape[0]
    dropped = p.drop_after is not None
    pushed = p.drop_after if dropped else n
    frame = 0
    for i, out in enumerate(p.outs):
        assert out.frame_start == frame, (p.key, i, out.frame_start, frame)
        assert out.pcm.dtype == np.float32 and out.pcm.ndim == 1
        assert out.pcm.shape == (out.num_frames * SPF,)
        last = i == len(p.outs) - 1
        assert out.final == (last and not dropped), (p.key, i)
        if not out.final:
            assert out.num_frames == (p.first if i == 0 else p.every), (p.key, i, out.num_frames)
        else:
            assert out.num_frames <= (p.first if i == 0 else p.every)
        frame += out.num_frames
    if dropped:
        assert frame <= pushed
    else:
        assert frame == n and p.outs and p.outs[-1].final
    pcm = np.concatenate([o.pcm for o in p.outs]) if p.outs else np.zeros(0, np.float32)
    ref = offline(codec, p)[: frame * SPF]
    if pcm.size:
        assert float(np.abs(pcm - ref).max()) <= TOL, p.key
    return pcm


MODES = {
    "one-padded-call": {"call_cost": float("inf")},
    "split-by-length": {"call_cost": 0.0},
    "default": {},
    "buckets": {"call_cost": float("inf"), "row_buckets": (2, 4, 8), "frame_buckets": (4, 8)},
    "small-calls": {"call_cost": float("inf"), "max_call_frames": 3},
}


CASES = {  # seed, sessions, rows, longest session
    "12-rows-all-fit": ((0, 12, 16, 40), ["one-padded-call", "split-by-length", "buckets"]),
    "16-sessions-5-rows-reused": ((1, 16, 5, 40), ["one-padded-call", "default", "small-calls"]),
    "one-row": ((2, 10, 1, 40), ["one-padded-call", "buckets"]),
    "24-sessions-8-rows-beyond-the-window": ((3, 24, 8, 100), list(MODES)),
}


@pytest.mark.parametrize("seed,n,max_rows,max_frames,mode", [
    pytest.param(*args, mode, id=f"{case}-{mode}") for case, (args, modes) in CASES.items() for mode in modes
])
def test_random_schedules_equal_offline(codec, seed, n, max_rows, max_frames, mode):
    plans = random_plans(seed, n, max_frames=max_frames)
    if max_frames > 72:
        assert any(p.codes.shape[0] > 72 for p in plans)     # the sliding-window cache wraps
    for p in run(codec, plans, max_rows, **MODES[mode]):
        check_plan(codec, p)


def test_many_rows(codec):
    """40 sessions over 32 rows, most open at once, in one padded call per step."""
    for p in run(codec, random_plans(11, 40, max_frames=24, max_start=8), 32, **MODES["one-padded-call"]):
        check_plan(codec, p)


@pytest.mark.parametrize("mode", ["one-padded-call", "buckets", "graphs"])
def test_together_equals_alone(codec, mode):
    """N rows at different positions decoded together == each decoded alone, chunk by chunk (<= 1e-5); "graphs":
    under the CUDA-graph stand-in (static inputs, outputs rewritten by every replay)."""
    plans = random_plans(7, 10, max_frames=30, max_start=12, drops=True)
    kw, rows = (_graphs(**GRAPHS), 8) if mode == "graphs" else (MODES[mode], 10)
    together = run(codec, plans, max_rows=rows, **kw)
    for p in together:
        alone = run(codec, [Plan(p.key, p.codes, 0, p.first, p.every, p.ref, p.drop_after)], max_rows=1)[0]
        assert [(o.frame_start, o.num_frames, o.final) for o in alone.outs] == \
               [(o.frame_start, o.num_frames, o.final) for o in p.outs]
        for a, b in zip(alone.outs, p.outs):
            if a.pcm.size:
                assert float(np.abs(a.pcm - b.pcm).max()) <= SAME


def test_dropped_row_does_not_disturb_others(codec):
    g = torch.Generator().manual_seed(21)
    base = [Plan(1, _codes(g, 25), 0, 1, 4), Plan(2, _codes(g, 25), 2, 2, 3), Plan(3, _codes(g, 25), 1, 1, 4)]
    with_drop = [Plan(p.key, p.codes, p.start, p.first, p.every) for p in base]
    with_drop[1].drop_after = 9
    a = run(codec, base, max_rows=3)
    b = run(codec, with_drop, max_rows=3)
    for x, y in ((a[0], b[0]), (a[2], b[2])):
        assert len(x.outs) == len(y.outs)
        for o1, o2 in zip(x.outs, y.outs):
            assert (o1.frame_start, o1.num_frames, o1.final) == (o2.frame_start, o2.num_frames, o2.final)
            assert float(np.abs(o1.pcm - o2.pcm).max()) <= SAME
    assert all(not o.final for o in b[1].outs) and sum(o.num_frames for o in b[1].outs) <= 9
    check_plan(codec, b[1])


@pytest.mark.parametrize("mode", ["one-padded-call", "buckets"])
def test_a_row_whose_decode_fails_fails_alone(codec, mode):
    """A row the codec cannot decode (here a code outside the codebook) failed the whole call: every stream that
    shared it. The call is now retried row by row: that row ends with `error` and is freed, and the others are
    exactly what they are without it."""
    g = torch.Generator().manual_seed(22)
    base = [Plan(1, _codes(g, 25), 0, 1, 4), Plan(2, _codes(g, 25), 2, 2, 3), Plan(3, _codes(g, 25), 1, 1, 4)]
    broken = [Plan(p.key, p.codes.clone(), p.start, p.first, p.every) for p in base]
    broken[1].codes[9, 3] = 5000
    a = run(codec, base, max_rows=3, **MODES[mode])
    b = run(codec, broken, max_rows=3, **MODES[mode])
    for x, y in ((a[0], b[0]), (a[2], b[2])):
        assert [(o.frame_start, o.num_frames, o.final, o.error) for o in x.outs] == \
               [(o.frame_start, o.num_frames, o.final, o.error) for o in y.outs]
        for o1, o2 in zip(x.outs, y.outs):
            assert float(np.abs(o1.pcm - o2.pcm).max(initial=0.0)) <= SAME
    *good, last = b[1].outs
    assert isinstance(last.error, IndexError) and last.final and last.num_frames == 0
    assert all(o.error is None for o in good) and last.frame_start == sum(o.num_frames for o in good) < 10
    assert [o.pcm.tobytes() for o in good] == [o.pcm.tobytes() for o in a[1].outs[:len(good)]]


def test_one_frame_session(codec):
    g = torch.Generator().manual_seed(4)
    p = run(codec, [Plan(5, _codes(g, 1), 0, 2, 4)], max_rows=2)[0]
    assert [(o.frame_start, o.num_frames, o.final) for o in p.outs] == [(0, 1, True)]
    check_plan(codec, p)


def test_zero_frame_session_gives_one_empty_final(codec):
    audio = BatchedAudio(codec, max_rows=2)
    audio.open(9, 1, 4)
    audio.finish(9)
    outs = audio.decode()
    assert len(outs) == 1
    o = outs[0]
    assert (o.key, o.frame_start, o.num_frames, o.final, o.pcm.shape, o.pcm.dtype) == \
           (9, 0, 0, True, (0,), np.float32)
    assert audio.decode() == []


def test_first_due_after_says_when_the_next_frames_complete_the_first_chunk(codec):
    """What the graph engine asks before a step: do this step's frames complete a row's first chunk?"""
    g = torch.Generator().manual_seed(3)
    audio = BatchedAudio(codec, max_rows=2)
    audio.open(1, 3, 2)
    assert not audio.first_due_after(1) and audio.first_due_after(1, 3) and audio.first_due_after(1, 5)
    for want in (False, True):
        audio.push([1], _codes(g, 1))
        assert audio.first_due_after(1) is want
    audio.push([1], _codes(g, 1))
    assert not audio.first_due_after(1)  # due already: these frames do not complete it
    assert [o.num_frames for o in audio.decode()] == [3]
    assert not audio.first_due_after(1) and not audio.first_due_after(1, 4)  # a first chunk is out
    with pytest.raises(KeyError):
        audio.first_due_after(2)


def test_frames_gathered_past_a_chunk_decode_together(codec):
    """A caller that pushes several frames between decodes gets them in one chunk (nothing is lost or split)."""
    g = torch.Generator().manual_seed(12)
    codes = _codes(g, 7)
    audio = BatchedAudio(codec, max_rows=2)
    audio.open(1, 1, 2)
    for i in range(3):
        audio.push([1], codes[i: i + 1])
    got = audio.decode()
    for i in range(3, 7):
        audio.push([1], codes[i: i + 1])
    audio.finish(1)
    got += audio.decode()
    assert [(o.frame_start, o.num_frames, o.final) for o in got] == [(0, 3, False), (3, 4, True)]
    ref = codec.decoder.decode(codes.T[None])[0].numpy()
    assert float(np.abs(np.concatenate([o.pcm for o in got]) - ref).max()) <= TOL


def test_final_right_after_a_full_chunk_is_empty(codec):
    """A row whose frames end exactly on a chunk boundary gets its chunk, then an empty final."""
    g = torch.Generator().manual_seed(8)
    codes = _codes(g, 5)
    audio = BatchedAudio(codec, max_rows=1)
    audio.open(1, 1, 4)
    got = []
    for i in range(5):
        audio.push([1], codes[i: i + 1])
        got += audio.decode()
    audio.finish(1)
    got += audio.decode()
    assert [(o.frame_start, o.num_frames, o.final) for o in got] == [(0, 1, False), (1, 4, False), (5, 0, True)]


def test_freed_key_and_row_can_be_reused(codec):
    g = torch.Generator().manual_seed(6)
    audio = BatchedAudio(codec, max_rows=1)
    first = _codes(g, 3)
    audio.open(1, 3, 3)
    audio.push([1], first[0:1])
    audio.push([1], first[1:2])
    audio.drop(1)                        # cancelled with 2 frames pending: nothing is emitted for it
    assert audio.decode() == []
    audio.open(1, 1, 1)                  # same key, same (only) row: starts fresh
    audio.push([1], first[2:3])
    audio.finish(1)
    (o,) = audio.decode()
    ref = codec.decoder.decode(first[2:3].T[None])[0].numpy()
    assert o.final and o.num_frames == 1 and float(np.abs(o.pcm - ref).max()) <= TOL


def test_bad_calls_are_refused(codec):
    audio = BatchedAudio(codec, max_rows=1)
    with pytest.raises(ValueError, match="max_rows"):
        BatchedAudio(codec, max_rows=0)
    audio.open(1, 1, 4)
    with pytest.raises(ValueError, match="already open"):
        audio.open(1, 1, 4)
    with pytest.raises(ValueError, match="max_rows"):
        audio.open(2, 1, 4)
    with pytest.raises(KeyError):
        audio.push([2], torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="codes"):
        audio.push([1], torch.zeros(2, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="codes"):
        audio.push([1], torch.zeros(1, 15, dtype=torch.long))
    audio.finish(1)
    with pytest.raises(ValueError, match="finished"):
        audio.push([1], torch.zeros(1, 16, dtype=torch.long))
    audio.drop(1)
    audio.drop(1)                        # dropping twice (or an unknown key) is a no-op
    with pytest.raises(ValueError, match="chunk_frames"):
        audio.open(3, 1, 0)
    with pytest.raises(ValueError, match="ref_codes"):
        audio.open(3, 1, 4, ref_codes=torch.zeros(2, 15, dtype=torch.long))
    with pytest.raises(ValueError, match="ref_codes"):
        audio.open(3, 1, 4, ref_codes=[[0] * 16])
    assert audio.num_open == 0           # refused opens hold no row
    with pytest.raises(KeyError):
        audio.finish(3)


# --- CUDA graphs (the CPU stand-in): one replay per decode, same samples ---------------------------------------------
GRAPHS = {"row_buckets": (1, 2, 4, 8), "frame_buckets": (1, 2, 4)}


def _graphs(**kw):
    from qwen_tts_core.generate.graphs import GraphCapture

    return {"capture": GraphCapture("cpu", fake=True), **kw}


@pytest.mark.parametrize("seed,n,max_rows,max_frames", [(0, 12, 8, 40), (3, 16, 8, 100)],
                         ids=["12-sessions", "beyond-the-window"])
def test_graphs_random_schedules_equal_offline(codec, seed, n, max_rows, max_frames):
    """Under the graph stand-in (static inputs, outputs rewritten by every replay, pool poisoned between replays)
    every row still equals its offline decode; chunks of 5 frames (beyond the largest frames bucket) run eagerly."""
    plans = random_plans(seed, n, max_frames=max_frames)
    kw = _graphs(**GRAPHS)
    for p in run(codec, plans, max_rows, **kw):
        check_plan(codec, p)


def test_graphs_replay_once_per_decode_and_fall_back_beyond_the_buckets(codec):
    from qwen_tts_core.generate.graphs import OpCounter

    audio = BatchedAudio(codec, max_rows=4, **_graphs(frame_buckets=(1, 2, 4)))
    bank = audio.bank
    assert set(bank.graphs) == {(b, t) for b in (1, 2, 4) for t in (1, 2, 4)}
    assert bank.state.positions.eq(0).all()                 # the captures touched the scratch row only
    g = torch.Generator().manual_seed(5)
    codes = _codes(g, 12)
    audio.open(1, 3, 6)
    audio.open(2, 1, 4)
    got: dict[int, list] = {1: [], 2: []}
    for i in range(12):
        audio.push([1, 2], torch.stack([codes[i], codes[11 - i]]))
        before = bank.replays
        with OpCounter() as c:
            outs = audio.decode()
        for o in outs:
            got[o.key].append(o)
        if any(o.key == 1 and o.num_frames == 6 for o in outs):
            assert bank.replays == before                    # 6 frames > the largest bucket: eager
        elif outs:
            assert bank.replays == before + 1 and c.kernels <= 8  # one replay; the host launches a handful of ops
    audio.finish(1)
    audio.finish(2)
    for o in audio.decode():
        got[o.key].append(o)
    assert all(got[k][-1].final for k in (1, 2))
    for key, frames in ((1, codes), (2, codes.flip(0))):
        pcm = np.concatenate([o.pcm for o in got[key]])
        ref = codec.decoder.decode(frames.T[None])[0].numpy()
        assert pcm.shape == ref.shape and float(np.abs(pcm - ref).max()) <= TOL
