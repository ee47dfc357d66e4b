"""Randomized differential fuzz of the engine's continuous batching: isolation and exactness under hostile schedules.

One engine runs many sessions on a seeded random schedule: staggered joins, cancels (queued, mid-utterance, on the
step they join), incremental-text sessions paused between pieces, greedy, seeded and unseeded sampling mixed,
several speakers, languages, instructions and both text modes, 1-frame requests, sessions that meet `max_len`
(or whose text cannot fit it), sessions ending in the same step, slots reused at once, and other audio chunk
schedules per session, with `step(emit=...)` on some steps. Per session:

- exactly one last chunk, the final one, with the session's finish reason (an error only where the same request
  fails alone too);
- chunks contiguous (frame_start), first_chunk_frames then chunk_frames each, the samples their frames' length;
- codes equal the same request run alone (incremental text: its whole text), greedy and seeded; a session cut short
  (cancel, guard) has a prefix of them;
- streamed audio equals the offline decode of its codes within 1e-4 (an fp32 decoder; bf16: within bf16's reach).

Paths: the default eager engine, a static eager engine, the graph engine on the CUDA-graph CPU stand-in, and the
bf16 streaming decoder. Every "alone" run is the default eager engine's (the graphs' promise on CPU fp32: the same
codes as the eager engine), cached across the paths (they draw from one pool of requests)."""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from qwen_tts_core import AudioChunk, Engine, EngineBusy, SamplingParams, SynthesisRequest
from qwen_tts_core.generate.graphs import GraphCapture
from qwen_tts_core.types import SAMPLES_PER_FRAME

MAX_LEN = 32  # prompt 10 positions (23 with an instruction): a long session or an instructed long text meets it
SLOTS = 3
TEXTS = ["Hi.", "Hello world.", "Press one for sales, two for support.", "你好，世界。", "Good morning! How are you?"]
SPEAKERS = ["vivian", "ryan", "sohee"]
LANGUAGES = ["english", "auto", "chinese"]
INSTRUCTS = [None, None, None, "Warm and calm."]
SAMPLINGS = [
    dict(do_sample=False, subtalker_dosample=False),
    dict(),                                                        # the defaults: top_k 50, T 0.9
    dict(top_k=5, top_p=0.8, temperature=0.7, subtalker_top_k=3, subtalker_top_p=0.9),
    dict(top_k=0, top_p=0.9, repetition_penalty=1.3, subtalker_dosample=False),
    dict(do_sample=False, subtalker_top_k=0, subtalker_temperature=1.3),
]
EXTREMES = [  # +-inf and NaN-prone logits in one row must not reach the others
    dict(temperature=1e-6, top_k=100000, subtalker_temperature=1e-6),
    dict(temperature=50.0, top_p=0.01, repetition_penalty=10.0, subtalker_top_k=1, subtalker_temperature=1e-30),
]
INJECTED = ("KeyboardInterrupt", "injected fault")  # the errors test_chaos injects
MAX_NEW = [1, 2, 3, 5, 6, 8, 8, 12, 12, 40]


@dataclass(frozen=True)
class Template:
    """What makes a request's codes: the same template gives the same codes alone, whatever its schedule."""

    text: str
    speaker: str
    language: str
    instruct: str | None
    non_streaming: bool
    sampling: SamplingParams
    seed: int | None
    voice: int | None = None  # Base: an index into VOICES (voice clone prompts), speaker and instruct unused

    def request(self, text: str | None = "", **kw) -> SynthesisRequest:
        who = dict(kind="custom_voice", speaker=self.speaker, instruct=self.instruct) if self.voice is None else \
            dict(kind="voice_clone", voice_clone_prompt=VOICES[self.voice])
        return SynthesisRequest(text=self.text if text == "" else text, language=self.language, sampling=self.sampling,
                                seed=self.seed, non_streaming_mode=self.non_streaming, **who, **kw)

    @property
    def ref_codes(self) -> torch.Tensor | None:
        """The codes the decoder continues (an ICL prompt's reference), or None."""
        vp = None if self.voice is None else VOICES[self.voice]
        return vp.ref_code if vp is not None and vp.icl_mode else None


VOICES: list = []  # Base voice clone prompts (set by the voice-clone test)


def make_pool(n: int, seed: int = 7, voices: int = 0) -> list[Template]:
    """n templates; with `voices`, Base ones speaking with VOICES[0..voices-1]."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kw = rng.choice(SAMPLINGS)
        sampling = SamplingParams(max_new_tokens=rng.choice(MAX_NEW), **kw)
        greedy = not sampling.do_sample and not sampling.subtalker_dosample
        seed = None if greedy or rng.random() < 0.1 else rng.randrange(4)
        out.append(Template(rng.choice(TEXTS), rng.choice(SPEAKERS), rng.choice(LANGUAGES), rng.choice(INSTRUCTS),
                            rng.random() < 0.2, sampling, seed, rng.randrange(voices) if voices else None))
    return out


POOL = make_pool(16) + [
    Template("Hello world.", "ryan", "english", None, False, SamplingParams(max_new_tokens=8, **EXTREMES[0]), 2),
    Template("Hi.", "vivian", "english", None, False, SamplingParams(max_new_tokens=12, **EXTREMES[1]), 3)]


@dataclass
class Plan:
    """One session's schedule: when it joins, how its text arrives, when it is cancelled, how its audio comes."""

    template: Template
    join: int
    incremental: bool = False
    pieces: list[tuple[int, str]] = field(default_factory=list)  # (step, piece) appended
    end: int | None = None            # step of end_text (None: at drain)
    cancel: int | None = None
    audio: bool = True
    first: int = 1
    every: int = 4
    priority: str = "interactive"
    # filled by the run
    session: object = None
    chunks: list[AudioChunk] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)


def make_plans(rng: random.Random, n: int, span: int, pool: list[Template] = POOL) -> list[Plan]:
    plans = []
    for _ in range(n):
        t = rng.choice(pool)
        p = Plan(t, join=rng.randrange(span), audio=rng.random() < 0.7, first=rng.choice([1, 1, 2, 3, 10]),
                 every=rng.choice([1, 2, 3, 5, 12]), priority=rng.choice(["interactive", "bulk"]))
        icl = t.ref_codes is not None  # an ICL prompt's transcript leads the text: whole text only
        if not t.non_streaming and not icl and rng.random() < 0.4:
            p.incremental = True
            cuts = sorted(rng.sample(range(1, len(t.text)), k=min(len(t.text) - 1, rng.randrange(1, 4))))
            parts = [t.text[a:b] for a, b in zip([0, *cuts], [*cuts, len(t.text)])]
            at = p.join + rng.choice([0, 0, 1, 3])  # the first piece may come steps after the session joined
            for piece in parts:
                p.pieces.append((at, piece))
                at += rng.choice([0, 1, 2, 6])      # a gap of 6 steps: the talker waits for text
            p.end = None if rng.random() < 0.2 else at + rng.choice([0, 1, 4])
        if rng.random() < 0.25:
            p.cancel = p.join + rng.choice([0, 1, 2, 4, 7])
        plans.append(p)
    return plans


class Alone:
    """Codes of templates run alone on the default eager engine (one slot), cached: (codes, finish reason)."""

    def __init__(self, model, max_len: int = MAX_LEN) -> None:
        self.engine = Engine(model, max_sessions=1, max_len=max_len)  # no guard: a guarded session has a prefix
        self.cache: dict[Template, tuple[torch.Tensor, str]] = {}

    def __call__(self, t: Template) -> tuple[torch.Tensor, str]:
        if t not in self.cache:
            s = self.engine.run_all([t.request(decode_audio=False)])[0]
            self.cache[t] = (s.codes(), s.finish_reason)
        return self.cache[t]


def run_schedule(engine: Engine, plans: list[Plan], rng: random.Random, max_steps: int = 400) -> None:
    """Drive `engine` through the plans' schedule, then drain it; chunks go to their plans."""
    by_id: dict[int, Plan] = {}
    waiting = sorted(plans, key=lambda p: p.join)

    def take(chunks: list[AudioChunk]) -> None:
        for c in chunks:
            p = by_id[c.session_id]
            assert not (p.chunks and p.chunks[-1].is_last), f"a chunk after the last of session {c.session_id}"
            p.chunks.append(c)

    step = 0
    while step < max_steps and (waiting or engine.has_work()):
        for p in [p for p in waiting if p.join <= step]:
            t = p.template
            req = t.request(None if p.incremental else "", decode_audio=p.audio, first_chunk_frames=p.first,
                            chunk_frames=p.every, priority=p.priority)
            try:
                p.session = engine.add(req)
            except EngineBusy:
                continue
            by_id[p.session.id] = p
            waiting.remove(p)
        for p in by_id.values():
            s = p.session
            if p.incremental and not s.done and not s.cancelled:
                for at, piece in p.pieces[len(p.sent):]:
                    if at > step:
                        break
                    s.append_text(piece)
                    p.sent.append(piece)
                if p.end is not None and p.end <= step and len(p.sent) == len(p.pieces) and not s._end_requested:
                    s.end_text()
            if p.cancel is not None and p.cancel <= step and not s.cancelled:
                engine.cancel(s)
        if step > max_steps // 2 or not waiting:  # drain: end every open text
            for p in by_id.values():
                s = p.session
                if p.incremental and not s.done and not s.cancelled and not s._end_requested:
                    for _, piece in p.pieces[len(p.sent):]:
                        s.append_text(piece)
                        p.sent.append(piece)
                    s.end_text()
        with contextlib.suppress(KeyboardInterrupt):  # an injected one (test_chaos): the engine goes on
            take(engine.step(emit=take if rng.random() < 0.5 else None))
        step += 1
        assert engine.num_active <= SLOTS and len(engine.free_slots) + engine.num_active == SLOTS
    assert not waiting and not engine.has_work(), "the schedule did not drain"
    assert sorted(engine.free_slots) == list(range(SLOTS)) and not engine._audio_rows and not engine._live
    assert engine.audio is None or engine.audio.num_open == 0, "audio rows left open"


def check(model, plans: list[Plan], alone: Alone, stats: Counter, audio_tol: float | None = 1e-4) -> None:
    for p in plans:
        s, t = p.session, p.template
        lasts = [c for c in p.chunks if c.is_last]
        assert len(lasts) == 1 and p.chunks[-1].is_last, f"session {s.id}: {len(lasts)} last chunks"
        last = lasts[0]
        assert s.done and last.finish_reason == s.finish_reason
        stats[s.finish_reason] += 1
        codes = s.codes()
        solo, solo_reason = alone(t)
        injected = s.finish_reason == "error" and last.error in INJECTED
        if s.finish_reason == "error" and not injected:
            # only a request that fails alone too: its text does not fit max_len (not incremental: the text is
            # checked as it arrives, so it may have spoken its first pieces)
            assert last.error and last.error_field == "text", last
            assert solo_reason == "error" or p.incremental, (last.error, solo_reason)
            continue
        if injected:
            stats["injected"] += 1
        elif s.finish_reason == "cancelled":
            assert p.cancel is not None
        else:
            assert s.finish_reason in ("eos", "max_new_tokens", "guard"), s.finish_reason
        # chunks: contiguous, sized by the schedule, their samples their frames'
        at = 0
        for i, c in enumerate(p.chunks if p.audio else []):
            assert c.frame_start == at and c.pcm.dtype == np.float32, (s.id, i, c.frame_start, at)
            assert c.pcm.size == c.num_frames * SAMPLES_PER_FRAME, (s.id, i)
            size = p.first if i == 0 else p.every
            assert c.num_frames == size if not c.is_last else c.num_frames <= size, (s.id, i, c.num_frames, size)
            at += c.num_frames
        if not p.audio:
            assert at == 0 and last.frame_start == len(codes)
        # codes: the request's alone, or a prefix of them where it was cut short
        if t.seed is None and t.sampling.do_sample | t.sampling.subtalker_dosample:
            stats["unseeded"] += 1
        elif solo_reason == "error":
            # incremental text that overflows max_len only once more of it arrives: it may end before that
            assert p.incremental, f"session {s.id} ({t}) ended {s.finish_reason} where it fails alone"
            stats["incremental past max_len"] += 1
        elif s.finish_reason in ("cancelled", "guard") or injected:
            assert len(codes) <= len(solo) and torch.equal(codes, solo[:len(codes)]), f"session {s.id}: prefix"
            stats["prefix checked"] += 1
        else:
            assert s.finish_reason == solo_reason and torch.equal(codes, solo), \
                f"session {s.id} ({t}): codes differ from alone ({len(codes)} vs {len(solo)} frames)"
            stats["codes checked"] += 1
            stats["extremes checked"] += t in POOL[-len(EXTREMES):]
        if p.audio:
            if s.finish_reason != "cancelled" and not injected:
                assert at == len(codes), (s.id, at, len(codes))
            if at:
                pcm = np.concatenate([c.pcm for c in p.chunks])
                offline = model.decode_codes([codes[:at]], [t.ref_codes])[0]
                assert pcm.shape == offline.shape
                err = np.abs(pcm - offline).max()
                tol = audio_tol if audio_tol is not None else 0.1 * max(1e-3, np.abs(offline).max())
                assert err <= tol, f"session {s.id}: audio {err} from the offline decode"
                stats["audio checked"] += 1
                stats[f"audio of voice {t.voice}"] += 1


@pytest.fixture(scope="module")
def model(model_factory):
    return model_factory("custom_voice", "tiny")


@pytest.fixture(scope="module")
def alone(model) -> Alone:
    return Alone(model)


@pytest.fixture(scope="module")
def eos_model(checkpoint_factory):
    """The tiny model (its own copy) with an EOS row in the codec head that competes with the other ids (random
    weights never end a session): the mean talker output's direction, scaled so that about half the sessions end on EOS."""
    from qwen_tts_core import Qwen3TTSModel

    model = Qwen3TTSModel.from_pretrained(checkpoint_factory("custom_voice", "tiny"), device_map="cpu",
                                          dtype="float32")
    head = model.talker.codec_head
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # decode steps' (hidden, logits)

    def keep(mod, args, out) -> None:
        if args[0].shape[1] == 1:
            seen.append((args[0][:, 0], out[:, 0]))

    hook = head.register_forward_hook(keep)
    Engine(model, max_sessions=2, max_len=MAX_LEN).run_all([t.request(decode_audio=False) for t in POOL[:5]])
    hook.remove()
    hidden, logits = (torch.cat(x) for x in zip(*seen))
    mu = hidden.mean(0)
    mu = mu / mu.norm()
    with torch.no_grad():
        head.weight[model.cfg.talker.codec_eos_token_id] = mu * 1.5 * logits.max(-1).values.mean() / (hidden @ mu).mean()
    return model


def fuzz(model, engine: Engine, alone: Alone, seeds: list[int], n: int = 10, span: int = 12,
         audio_tol: float | None = 1e-4, pool: list[Template] = POOL) -> Counter:
    stats: Counter = Counter()
    move = engine.runner.move

    def counted_move(*args) -> None:  # a session moved down into a freed slot (compaction): it must not notice
        stats["moves"] += 1
        move(*args)

    engine.runner.move = counted_move
    for seed in seeds:
        rng = random.Random(seed)
        plans = make_plans(rng, n, span if seed % 2 else 3 * span, pool)  # a crowd, or a trickle (compaction moves)
        run_schedule(engine, plans, rng)
        check(model, plans, alone, stats, audio_tol)
    print(dict(stats))
    assert stats["codes checked"] >= 5 and stats["audio checked"] >= 3 and stats["moves"] >= 1, dict(stats)
    return stats


def test_fuzz_eager_engine(model, alone):
    stats = fuzz(model, Engine(model, max_sessions=SLOTS, max_len=MAX_LEN), alone, [1, 2, 3, 15])
    assert stats["cancelled"] and stats["max_new_tokens"] and stats["extremes checked"], dict(stats)


@pytest.mark.slow
def test_fuzz_static_eager_engine(model, alone):
    """A static cache, bucketed prefills and batches, one slot kept for interactive sessions; warmed up first (its
    warm-up steps a session of its own in slot 0, which the next session there must not notice)."""
    engine = Engine(model, max_sessions=SLOTS, max_len=MAX_LEN, static=True, interactive_reserve=1)
    engine.warm_up()
    fuzz(model, engine, alone, [4, 5, 11])


@pytest.mark.slow
def test_fuzz_graph_engine_on_the_stand_in(model, alone):
    engine = Engine(model, max_sessions=SLOTS, max_len=MAX_LEN, graph_capture=GraphCapture("cpu", fake=True),
                    audio_chunk_frames=(1, 2, 3, 5))
    engine.warm_up()
    fuzz(model, engine, alone, [6, 7, 12])


@pytest.mark.slow
def test_fuzz_bf16_model(checkpoint_factory):
    """bf16 where oneDNN packs bf16 (README: codes batched equal alone there; the codec stays fp32: exact audio)."""
    from qwen_tts_core import Qwen3TTSModel
    from qwen_tts_core.model.layers import can_pack

    if not can_pack(torch.zeros(1, dtype=torch.bfloat16)):
        pytest.skip("this CPU cannot pack bf16 (AVX2 only): batched bf16 rows run fp32 copies, not exact")
    model = Qwen3TTSModel.from_pretrained(checkpoint_factory("custom_voice", "tiny"), device_map="cpu",
                                          dtype="bfloat16")
    fuzz(model, Engine(model, max_sessions=SLOTS, max_len=MAX_LEN), Alone(model), [13, 14])


@pytest.mark.slow
def test_fuzz_bf16_audio_decoder(model, alone):
    """Codes stay exact; the audio is bf16's (within a tenth of the offline peak)."""
    fuzz(model, Engine(model, max_sessions=SLOTS, max_len=MAX_LEN, audio_dtype="bfloat16"), alone, [8, 17],
         audio_tol=None)


def test_an_interrupt_while_a_session_is_admitted_fails_it_and_frees_its_slot(model, monkeypatch):
    """A KeyboardInterrupt in the stepping thread while a queued session's prompt is built (the slot taken, the
    session not active yet): it was lost, neither queued nor active, with no last chunk ever, and its slot never
    came back. Now it fails with its last chunk, the slot is free and the engine serves the next session exactly."""
    import qwen_tts_core.generate.engine as engine_mod

    engine = Engine(model, max_sessions=2, max_len=MAX_LEN)
    t = POOL[0]
    s = engine.add(t.request())
    real = engine_mod.make_prompt

    def interrupted(*args, **kwargs):
        monkeypatch.setattr(engine_mod, "make_prompt", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_mod, "make_prompt", interrupted)
    emitted: list[AudioChunk] = []
    with pytest.raises(KeyboardInterrupt):
        engine.step(emit=emitted.extend)
    assert s.done and s.finish_reason == "error" and [c.is_last for c in emitted] == [True], emitted
    assert sorted(engine.free_slots) == [0, 1] and not engine.has_work() and not engine._live
    again = engine.run_all([t.request(decode_audio=False)])[0]
    assert torch.equal(again.codes(), Engine(model, max_sessions=1, max_len=MAX_LEN).run_all(
        [t.request(decode_audio=False)])[0].codes())


@pytest.mark.slow
def test_fuzz_sessions_that_end_on_eos_or_the_guard(eos_model):
    """Sessions end on EOS at any frame (several in one step), or on the runaway guard (a prefix of alone)."""
    engine = Engine(eos_model, max_sessions=SLOTS, max_len=MAX_LEN, guard_frames_per_token=0.5, guard_base_frames=3)
    stats = fuzz(eos_model, engine, Alone(eos_model), [9, 10, 16])
    assert stats["eos"] >= 3 and stats["guard"] >= 1, dict(stats)


@pytest.mark.slow
def test_fuzz_voice_clones_on_the_graph_engine(model_factory, ref_wav_path):
    """Base: two ICL voices (other references: the decoder rows continue each one's own codes, its context state
    cached by content and copied per session) and an x-vector voice, batched together."""
    import soundfile as sf

    base = model_factory("base", "tiny")
    wav, sr = sf.read(ref_wav_path, dtype="float32")
    other = np.roll(wav[::-1], 4000).copy()  # another recording: other codes, another context state
    VOICES[:] = [base.create_voice_clone_prompt(str(ref_wav_path), ref_text="A short reference sentence.")[0],
                 base.create_voice_clone_prompt((other, sr), ref_text="Another one.")[0],
                 base.create_voice_clone_prompt(str(ref_wav_path), x_vector_only_mode=True)[0]]
    assert not torch.equal(VOICES[0].ref_code[:5], VOICES[1].ref_code[:5])
    try:
        engine = Engine(base, max_sessions=SLOTS, max_len=MAX_LEN * 4, graph_capture=GraphCapture("cpu", fake=True),
                        audio_chunk_frames=(1, 2, 3, 5))
        alone = Alone(base, max_len=MAX_LEN * 4)
        stats = fuzz(base, engine, alone, [18], n=12, pool=make_pool(10, seed=8, voices=len(VOICES)))
        assert all(stats[f"audio of voice {v}"] for v in range(len(VOICES))), dict(stats)
    finally:
        VOICES.clear()


def test_an_interrupt_while_an_audio_row_opens_gives_the_row_back(model):
    """A KeyboardInterrupt in the stepping thread while a session's audio row was opened (its decoder state reset:
    for an ICL voice the decode of its reference, the longest part of a start; the API steps in the caller's
    thread, so Ctrl-C lands there): the session failed but its decoder row was never given back, and after
    max_sessions such interrupts every later session failed to start ("all 2 rows are in use")."""
    engine = Engine(model, max_sessions=2, max_len=MAX_LEN)
    real = engine.audio.bank.reset

    def interrupted(*args, **kwargs):
        engine.audio.bank.reset = real
        raise KeyboardInterrupt

    t = POOL[0]
    for _ in range(2):
        engine.audio.bank.reset = interrupted
        s = engine.add(t.request())
        with pytest.raises(KeyboardInterrupt):
            engine.step()
        assert s.finish_reason == "error"
    assert [c.is_last for c in engine.step()] == [True, True]  # the interrupted steps' last chunks
    assert engine.audio.free == [0, 1] and not engine.has_work()
    s = engine.run_all([t.request()])[0]
    assert s.finish_reason == "max_new_tokens" and torch.equal(s.codes(), Alone(model)(t)[0])


def test_last_chunks_of_an_interrupted_step_without_emit_come_from_the_next_step(model):
    """step() without `emit` (jobs' loops, README's `for chunk in engine.step()`) interrupted midway fails its
    sessions and raises again: their last chunks were lost with the raise (no emit to take them), so those sessions
    never ended for the caller. Now has_work() stays true and the next step() returns them first."""
    engine = Engine(model, max_sessions=2, max_len=MAX_LEN)
    a, b = engine.add(POOL[0].request()), engine.add(POOL[5].request())
    got = engine.step()
    real = engine.runner.step

    def interrupted(*args, **kwargs):
        engine.runner.step = real
        raise KeyboardInterrupt

    engine.runner.step = interrupted
    with pytest.raises(KeyboardInterrupt):
        engine.step()
    assert a.done and b.done and engine.has_work() and engine.runnable()
    got += engine.step()
    assert not engine.has_work()
    lasts = [c for c in got if c.is_last]
    assert sorted(c.session_id for c in lasts) == sorted([a.id, b.id])
    assert all(c.finish_reason == "error" and c.error == "KeyboardInterrupt" for c in lasts)


FAULT_POINTS = [("runner", "step"), ("runner", "start_many"), ("runner", "move"), ("runner", "set_text"),
                ("audio", "decode"), ("audio", "push"), ("audio", "open"), ("audio", "finish"), ("engine", "_started"),
                ("engine", "_take_frames"), ("engine", "_decode_audio"), ("engine", "_absorb_text"),
                ("engine", "_compact"), ("engine", "_prepare")]


def inject_faults(engine: Engine, rng: random.Random, n: int, calls: int, hit: Counter) -> None:
    """Make `n` of the next `calls` calls into the engine's parts (FAULT_POINTS) raise: a KeyboardInterrupt (as
    Ctrl-C in the stepping thread) or a RuntimeError (a device or decoder failure); `hit` counts where."""
    at = {c: rng.choice([KeyboardInterrupt, RuntimeError]) for c in rng.sample(range(1, calls), n)}
    count = [0]
    owners = {"runner": engine.runner, "audio": engine.audio, "engine": engine}
    for owner, name in FAULT_POINTS:
        obj = owners[owner]
        real = getattr(obj, name)

        def wrapped(*args, _real=real, _name=name, **kwargs):
            count[0] += 1
            fault = at.get(count[0])
            if fault is not None:
                hit[f"{_name} {fault.__name__}"] += 1
                raise fault() if fault is KeyboardInterrupt else fault("injected fault")
            return _real(*args, **kwargs)

        setattr(obj, name, wrapped)


@pytest.mark.slow
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_chaos(model, alone, graphs):
    """Faults injected anywhere in a step (an interrupt or an error in the runner, the audio decoder, admission,
    compaction, text): the sessions a fault hits end with one error chunk and a prefix of their codes and audio;
    every other session is still exact; no slot or decoder row leaks; the engine serves what comes after."""
    capture = dict(graph_capture=GraphCapture("cpu", fake=True), audio_chunk_frames=(1, 2, 3, 5)) if graphs else {}
    stats: Counter = Counter()
    hit: Counter = Counter()
    engine = Engine(model, max_sessions=SLOTS, max_len=MAX_LEN, **capture)  # one engine serves on after faults
    inject_faults(engine, random.Random(19), n=24, calls=1800, hit=hit)
    for seed in range(20, 26):
        rng = random.Random(seed)
        plans = make_plans(rng, 8, 10 if seed % 2 else 30)
        run_schedule(engine, plans, rng)
        check(model, plans, alone, stats)
        assert engine.audio.free == list(range(SLOTS)), "a decoder row leaked"
    print(dict(stats), dict(hit))
    assert stats["injected"] >= 4 and stats["codes checked"] >= 5 and len(hit) >= 8, (dict(stats), dict(hit))


@pytest.mark.slow
def test_threads_reading_one_driver_get_their_own_exact_sessions(model, alone):
    """Callers in threads share one engine through EngineDriver (as the API's generate_* and stream_* do): whoever
    needs progress steps it for all. Each thread reads only its own session's chunks: its codes are its request's
    alone, its audio the offline decode of them; a reader closed early cancels its session (a prefix), and appended
    text from another thread's schedule is never seen by anyone else."""
    import threading

    from qwen_tts_core.generate.driver import EngineDriver

    driver = EngineDriver(Engine(model, max_sessions=SLOTS, max_queue=64, max_len=MAX_LEN))
    rng = random.Random(30)
    plans = [p for p in make_plans(rng, 12, 1) if not p.incremental]
    for p in plans:
        p.audio, p.cancel = True, (rng.randrange(1, 4) if rng.random() < 0.3 else None)  # cancel: chunks read
    errors: list[BaseException] = []

    def read(p: Plan) -> None:
        try:
            t = p.template
            p.session = driver.open(t.request(first_chunk_frames=p.first, chunk_frames=p.every))
            reader = driver.chunks(p.session)
            for c in reader:
                p.chunks.append(c)
                if p.cancel is not None and len(p.chunks) >= p.cancel and not c.is_last:
                    reader.close()
                    break
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=read, args=(p,)) for p in plans]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors and not any(th.is_alive() for th in threads), errors
    for _ in range(50):  # the sessions of closed readers end at the engine's next steps
        if not driver.engine.has_work():
            break
        driver.engine.step()
    stats: Counter = Counter()
    for p in plans:
        s, t = p.session, p.template
        codes, (solo, solo_reason) = s.codes(), alone(t)
        if p.chunks and p.chunks[-1].is_last:
            assert [c.is_last for c in p.chunks].count(True) == 1 and p.chunks[-1].finish_reason == s.finish_reason
        else:  # closed early: cancelled, its chunks so far a prefix
            assert p.cancel is not None and s.finish_reason in ("cancelled", "max_new_tokens", "eos"), s.finish_reason
        if solo_reason == "error" or t.seed is None and t.sampling.do_sample | t.sampling.subtalker_dosample:
            continue
        assert torch.equal(codes, solo[:len(codes)]) and (s.finish_reason != solo_reason or len(codes) == len(solo))
        at = sum(c.num_frames for c in p.chunks)
        assert [c.session_id for c in p.chunks] == [s.id] * len(p.chunks) and at <= len(codes)
        if at:
            pcm = np.concatenate([c.pcm for c in p.chunks])
            assert np.abs(pcm - model.decode_codes([codes[:at]])[0]).max() <= 1e-4
        stats["checked"] += 1
    assert stats["checked"] >= 5, dict(stats)


@pytest.mark.slow
def test_fuzz_growing_cache(model):
    """The default engine's cache and text buffer grow (doubling, copying every slot) while sessions run: long
    sessions past the first 64 positions beside short ones joining and leaving."""
    long = [dataclasses.replace(t, sampling=dataclasses.replace(t.sampling, max_new_tokens=n))
            for t, n in zip(POOL[4:10], (70, 3, 90, 8, 75, 2))]
    engine = Engine(model, max_sessions=SLOTS, max_len=160, initial_cache_len=64)
    assert engine.runner.cache.capacity == 64
    fuzz(model, engine, Alone(model, max_len=160), [32, 33], n=8, span=20, pool=long)
    assert engine.runner.cache.capacity > 64


@pytest.mark.parametrize("kind", ["eager", "static", "graphs"])
def test_warm_up_fits_any_max_len(model, kind):
    """warm_up() prefilled a 16-position prompt and stepped twice whatever max_len was: an engine of max_len 17 or
    less could not warm up (ValueError, or on a static cache an IndexError writing past its end). Its warm-up
    session now fits max_len, and the next session is still its request's alone."""
    opts = {"eager": {}, "static": dict(static=True), "graphs": dict(graph_capture=GraphCapture("cpu", fake=True))}
    for max_len in (2, 12, 17):
        engine = Engine(model, max_sessions=2, max_len=max_len, **opts[kind])
        engine.warm_up()
        assert int(engine.runner.pos[0]) < max_len  # as a session leaves its slot
        t = POOL[5]  # greedy codebook 0, seeded codebooks 1-15: 5 frames, 10 prompt positions
        s = engine.run_all([t.request(decode_audio=False)])[0]
        solo = Engine(model, max_sessions=1, max_len=max_len).run_all([t.request(decode_audio=False)])[0]
        assert s.finish_reason == solo.finish_reason and torch.equal(s.codes(), solo.codes()), max_len


def test_an_interrupt_while_cancelled_queued_sessions_end_loses_none(model):
    """Cancelled queued sessions are taken out of the queues, then ended one by one: an interrupt between (here: in
    the first one's end) lost them all, out of the queues and never active, never done, with no last chunk."""
    engine = Engine(model, max_sessions=1, max_len=MAX_LEN)
    a, b = engine.add(POOL[0].request()), engine.add(POOL[0].request())
    engine.cancel(a)
    engine.cancel(b)
    real = engine._finish

    def interrupted(*args):
        engine._finish = real
        raise KeyboardInterrupt

    engine._finish = interrupted
    with pytest.raises(KeyboardInterrupt):
        engine.step()
    lasts = [c for c in engine.step() if c.is_last]
    assert a.done and b.done and sorted(c.session_id for c in lasts) == [a.id, b.id], lasts
    assert not engine.has_work() and engine.free_slots == [0]


def test_chunks_handed_to_an_emit_that_raises_are_not_returned_again(model):
    """step(emit=...) documents that chunks handed to emit are not returned again. An emit that took a chunk and then
    raised (a consumer's bug) failed the step, and step() returned that chunk too: the caller saw it twice."""
    engine = Engine(model, max_sessions=2, max_len=MAX_LEN)
    s = engine.add(POOL[5].request(first_chunk_frames=1))
    emitted: list[AudioChunk] = []

    def emit(chunks: list[AudioChunk]) -> None:
        emitted.extend(chunks)
        raise ValueError("a consumer's bug")

    returned = engine.step(emit=emit)
    assert [c.frame_start for c in emitted] == [0] and not emitted[0].is_last
    assert [(c.session_id, c.is_last) for c in returned] == [(s.id, True)] and s.finish_reason == "error"
