"""`Engine(compile=True)` on CPU: the talker step and the code-predictor pass torch.compiled whole
(`qwen_tts_core/generate/compiled.py`).

One engine is compiled for the module (a compile takes a minute or two on two cores) and driven the ways that could
make a compiled step go wrong: batches that grow and shrink past the padded single row, a cache that grows under
it, a session that pauses for text, seeds. Its codes must be the eager engine's, a session's codes must not depend
on its batch, and nothing may recompile once the engine is built (a recompile mid-traffic stalls every session for
as long as the build took). A compile that fails must leave an engine that works, eagerly.
"""

from __future__ import annotations

import gc
import logging

import pytest
import torch

from qwen_tts_core import Engine, SamplingParams, SynthesisRequest
from qwen_tts_core.generate import compiled
from qwen_tts_core.generate.compiled import MIN_ROWS, CompiledBody, check_compile, compile_mode
from qwen_tts_core.model import layers

TEXTS = ["Once upon a time there was a small village by the sea.", "Please hold.",
         "It was the best of times, it was the worst of times.", "Good morning! How are you today?", "Press one."]


def _reqs(texts, sample: bool, frames: int = 30, **kw):
    sp = SamplingParams(do_sample=sample, subtalker_dosample=sample, max_new_tokens=frames, top_k=40, top_p=0.9)
    return [SynthesisRequest(kind="custom_voice", text=t, speaker="vivian", language="english", sampling=sp,
                             seed=100 + i, decode_audio=False, **kw) for i, t in enumerate(texts)]


def _codes(sessions):
    return [s.codes() for s in sessions]


@pytest.fixture(scope="module")
def tiny(model_factory):
    return model_factory("custom_voice", "tiny")


@pytest.fixture(scope="module")
def engines(tiny):
    """(compiled, eager): 4 slots each, caches starting at 64 positions (so they grow during the tests)."""
    fast = Engine(tiny, max_sessions=4, compile=True, initial_cache_len=64)
    return fast, Engine(tiny, max_sessions=4, initial_cache_len=64)


def _graphs(eng) -> dict:
    return {k: b.graphs for k, b in eng.runner.bodies.items()}


def test_the_compiled_engine_is_built_compiled(engines):
    fast, _ = engines
    r = fast.runner
    assert r.whole and not r.compiled  # whole bodies, not the fused pieces
    assert all(isinstance(b, CompiledBody) and not b.broken for b in r.bodies.values())
    # one graph per body, each traced once: the modules' float constants made symbolic cost a second trace and
    # inductor compile of each body (dynamo's restart to specialize them), ~22% of the build
    assert _graphs(fast) == {"cp": 1, "talker": 1}
    assert fast.compile_s > 0
    assert r.S >= MIN_ROWS


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "seeded"])
def test_compiled_codes_are_the_eager_engines_as_batches_grow_and_shrink(engines, sample):
    """5 sessions of different lengths through 4 slots: the batch goes 4 -> 3 -> 2 -> 1 (padded to 2) as they end,
    and the fifth joins when the first slot frees; keys pass the initial 64-position cache, which grows."""
    fast, eager = engines
    before = _graphs(fast)
    texts = [t * (1 + i % 3) for i, t in enumerate(TEXTS)]
    got = fast.run_all(_reqs(texts, sample, frames=60))
    want = eager.run_all(_reqs(texts, sample, frames=60))
    assert [g.num_frames for g in got] == [w.num_frames for w in want]
    for g, w in zip(_codes(got), _codes(want)):
        assert torch.equal(g, w)
    assert fast.runner.cache.capacity > 64  # the cache grew under the compiled graph
    assert _graphs(fast) == before  # no recompile: the one graph took every batch, key length and cache size


def test_a_session_alone_gets_its_batched_codes(engines):
    fast, _ = engines
    batched = _codes(fast.run_all(_reqs(TEXTS[:4], True)))
    for i in range(4):
        alone = fast.run_all(_reqs(TEXTS[:4], True)[i:i + 1])  # one row: run as two, the second discarded
        assert torch.equal(_codes(alone)[0], batched[i]), i


def test_a_session_paused_for_text_resumes_with_the_eager_codes(engines):
    """An incremental-text session waits (a row the talker does not advance) while another runs beside it."""
    fast, eager = engines
    out = []
    for eng in (fast, eager):
        sp = SamplingParams(do_sample=True, subtalker_dosample=True, max_new_tokens=25)
        other = eng.add(_reqs(["It was the best of times."], True)[0])
        waiting = eng.add(SynthesisRequest(kind="custom_voice", text=None, speaker="vivian", language="english",
                                           sampling=sp, seed=7, decode_audio=False))
        waiting.append_text("Hello there, how")
        for _ in range(8):  # it runs out of text and waits while `other` goes on
            eng.step()
        waiting.append_text(" are you today?")
        waiting.end_text()
        while not (waiting.done and other.done):
            eng.step()
        assert waiting.error is None and other.error is None
        out.append((waiting.codes(), other.codes()))
    assert all(torch.equal(a, b) for a, b in zip(*out))


def test_one_slot_engine_runs_its_row_beside_a_discarded_one(tiny):
    eng = Engine(tiny, max_sessions=1, compile=True)
    assert eng.runner.S == MIN_ROWS and eng.max_sessions == 1
    got = eng.run_all(_reqs(TEXTS[:2], True))  # one after the other
    want = Engine(tiny, max_sessions=1).run_all(_reqs(TEXTS[:2], True))
    assert all(torch.equal(g, w) for g, w in zip(_codes(got), _codes(want)))


def test_a_body_that_fails_to_compile_runs_eagerly(tiny, monkeypatch, caplog):
    def exploding(count, gm, example_inputs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(compiled, "_inductor", exploding)
    with caplog.at_level(logging.WARNING, logger=compiled.__name__):
        eng = Engine(tiny, max_sessions=2, compile=True)
    assert all(b.broken for b in eng.runner.bodies.values())
    assert "runs eagerly" in caplog.text
    want = Engine(tiny, max_sessions=2).run_all(_reqs(TEXTS[:2], True))
    got = eng.run_all(_reqs(TEXTS[:2], True))
    assert all(torch.equal(g, w) for g, w in zip(_codes(got), _codes(want)))


def test_an_error_while_the_graph_runs_is_raised_not_swallowed(monkeypatch):
    """Only a failure to compile falls back: an error in the running step (state may be half written) goes up to
    the engine, which fails the step's sessions, as an eager step's error does."""
    calls = []

    def body(x):
        calls.append(x)
        raise RuntimeError("out of memory")

    b = CompiledBody(body, "test")
    monkeypatch.setattr(b, "compiled", body)
    with pytest.raises(RuntimeError, match="out of memory"):
        b(1)
    assert calls == [1] and not b.broken


@pytest.mark.parametrize("bad", [1, 0, "yes", "STEP", None, 2.0, [True]])
def test_compile_takes_only_its_modes(tiny, bad):
    with pytest.raises(ValueError, match="compile"):
        check_compile(bad)
    with pytest.raises(ValueError, match="compile"):
        Engine.check_arguments(compile=bad)


def test_the_mode_true_picks_per_device_and_step_is_refused_where_it_cannot_run():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compile_mode(True, cpu, "device", False) == "step"
    assert compile_mode(True, cpu, "device", True) == "ops"     # graphs (the CPU stand-in): the fused pieces
    assert compile_mode(True, cpu, "torch", False) == "ops"     # the torch sampler draws on the host
    assert compile_mode(True, cuda, "device", True) == "ops"
    assert compile_mode(False, cpu, "device", False) is None and compile_mode("ops", cpu, "device", False) == "ops"
    for args in ((cuda, "device", False), (cpu, "torch", False), (cpu, "device", True)):
        with pytest.raises(ValueError, match="compile='step'"):
            compile_mode("step", *args)


def test_slot_keys_are_unique_and_a_dropped_model_leaves_no_slot_behind():
    """A compiled graph names a packed weight by its slot's key; the registry must not keep dropped models' packed
    weights alive."""
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8))
    assert layers.pack_linears_(m)
    keys = [m[0].pack_slot.key, m[1].pack_slot.key]
    assert len(set(keys)) == 2 and all(layers._SLOTS[k] is s for k, s in zip(keys, (m[0].pack_slot, m[1].pack_slot)))
    x = torch.randn(3, 16)
    with layers.packed_linears(True):
        want = m(x)
        got = layers.slot_linear(layers.slot_linear(x, m[0].weight, m[0].bias, keys[0]), m[1].weight, m[1].bias,
                                 keys[1])
    assert torch.equal(got, want)
    with layers.packed_linears(True), layers.live_rows(1):  # rows past the first are a compiled step's padding
        padded = layers.slot_linear(x, m[0].weight, m[0].bias, keys[0])
        assert torch.equal(padded[:1], m[0](x[:1])) and not padded[1:].any()
    del m
    gc.collect()
    assert all(k not in layers._SLOTS for k in keys)


def test_an_eager_product_on_another_thread_while_a_compile_runs_is_not_sent_into_the_compiled_op():
    """torch marks the whole process as compiling while any compile runs (minutes, here): an eager engine's product
    on another thread must still run as a product (it once recursed into `slot_linear` without end), and stay
    differentiable (the compiled op has no autograd formula: keyed on `is_compiling()`, a caller taking gradients
    through the model on another thread failed in backward while some engine compiled; review I's M67)."""
    import threading

    m = torch.nn.Sequential(torch.nn.Linear(16, 32))
    assert layers.pack_linears_(m)
    x = torch.randn(2, 16)
    inside, go, errors = threading.Event(), threading.Event(), []

    def waiting_backend(gm, example_inputs):
        inside.set()
        go.wait(30)
        return gm.forward

    def compile_something():
        try:
            torch.compile(lambda t: t * 2 + 1, backend=waiting_backend)(torch.ones(3))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=compile_something)
    t.start()
    try:
        assert inside.wait(30)
        with layers.packed_linears(True):
            got = m(x)
        m(x).square().sum().backward()
    finally:
        go.set()
        t.join(30)
    assert not errors
    assert torch.allclose(got, torch.nn.functional.linear(x, m[0].weight, m[0].bias), atol=1e-6)
    w = m[0].weight.detach().requires_grad_()
    torch.nn.functional.linear(x, w, m[0].bias.detach()).square().sum().backward()
    assert torch.allclose(m[0].weight.grad, w.grad, atol=1e-6)


def test_a_dropped_compiled_engine_frees_its_runner_and_caches(tiny):
    import weakref

    eng = Engine(tiny, max_sessions=2, compile=True)
    assert all(b.graphs for b in eng.runner.bodies.values())
    runner, cache = weakref.ref(eng.runner), weakref.ref(eng.runner.cache)
    del eng
    gc.collect()
    assert runner() is None and cache() is None


def test_the_recompile_limit_falls_back_to_eager(monkeypatch):
    def limit(*args):
        raise torch._dynamo.exc.FailOnRecompileLimitHit("Hard failure due to fullgraph=True")

    b = CompiledBody(lambda x: x + 1, "test")
    monkeypatch.setattr(b, "compiled", limit)
    assert b(1) == 2 and b.broken
    assert b(2) == 3  # eager from then on


@pytest.mark.parametrize("kw", [dict(sampler="torch"), dict(cuda_graphs=True)], ids=["torch-sampler", "graphs"])
def test_step_mode_is_refused_before_a_build_where_it_cannot_run(kw):
    with pytest.raises(ValueError, match="compile='step'"):
        Engine.check_arguments(compile="step", **kw)
    Engine.check_arguments(compile=True, **kw)  # True picks the fused pieces there
