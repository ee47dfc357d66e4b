"""The graph path on CPU: the engine with the CUDA-graph stand-in (`FakeCUDAGraph`: a recorded tape replayed on the
captured tensors, outputs rewritten in place on every replay, its pool poisoned between replays, host syncs refused
while capturing) must give exactly what the eager engine gives, through every piece of bookkeeping a GPU run has:
batch buckets crossing 1 -> 2 -> 4 -> 3 as sessions join and leave, key-length buckets crossing, a session paused
for text, streamed audio, seeded sampling, a stored voice. On today's main the stand-in shows defect 1 (frames that
alias the graph's output: every frame equal to the last)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen_tts_core import (
    Engine,
    SamplingParams,
    SynthesisRequest,
    load_voice_prompt,
    save_voice_prompt,
)
from qwen_tts_core.generate.graphs import CaptureError, FakeCUDAGraph, GraphCapture, fake_graph

GREEDY = SamplingParams(do_sample=False, subtalker_dosample=False, max_new_tokens=14)
SAMPLED = SamplingParams(max_new_tokens=12, top_k=20, subtalker_top_k=20)
TEXTS = ["Hello world.", "The quick brown fox jumps over the lazy dog.", "Good morning!", "Press one for sales."]


def req(text, sampling=GREEDY, **kw) -> SynthesisRequest:
    kw.setdefault("decode_audio", False)
    return SynthesisRequest(kind="custom_voice", text=text, speaker="vivian", language="english", sampling=sampling,
                            **kw)


@pytest.fixture(scope="module")
def model(model_factory):
    return model_factory("custom_voice", "tiny")


@pytest.fixture(scope="module")
def graphs(model):
    """One graph engine for the module (capture is the slow part): 4 slots, buckets 1/2/4, keys 64/128."""
    return Engine(model, max_sessions=4, max_len=128, graph_capture=GraphCapture("cpu", fake=True))


def alone(model, r: SynthesisRequest) -> torch.Tensor:
    return Engine(model, max_sessions=1).run_all([r])[0].codes()


def drain(eng, sessions, chunks=None):
    while not all(s.done for s in sessions):
        got = eng.step()
        if chunks is not None:
            chunks += got
    return sessions


# --- the stand-in itself ----------------------------------------------------------------------------------------
def test_stand_in_rewrites_outputs_in_place_and_poisons_its_pool():
    x = torch.tensor([1.0, 2.0])
    g = FakeCUDAGraph()
    with fake_graph(g):
        y = x * 2
        z = y + 1
    assert torch.isnan(y).all() and torch.isnan(z).all()  # captured, not run: outputs hold nothing yet
    kept = z                                                # a caller keeping the static output...
    x.copy_(torch.tensor([3.0, 4.0]))
    g.replay()
    assert kept.tolist() == [7.0, 9.0]
    first = kept.clone()
    x.copy_(torch.tensor([10.0, 20.0]))
    g.replay()
    assert kept.tolist() == [21.0, 41.0] and first.tolist() == [7.0, 9.0]  # ...sees it change at every replay


def test_stand_in_reads_only_the_captured_inputs_and_freezes_python():
    x = torch.zeros(3)
    g = FakeCUDAGraph()
    n = 2
    with fake_graph(g):
        out = x[:n] + n    # slicing bound and constant are frozen at capture
    n = 3
    x = torch.ones(3)      # a new tensor: the graph never sees it
    g.replay()
    assert out.tolist() == [2.0, 2.0]


@pytest.mark.parametrize("sync", [lambda t: t.sum().item(), lambda t: bool(t.any()), lambda t: t.nonzero(),
                                  lambda t: t.tolist()], ids=["item", "bool", "nonzero", "tolist"])
def test_stand_in_refuses_host_syncs_while_capturing(sync):
    t = torch.ones(4)
    with pytest.raises(CaptureError, match="host sync"), fake_graph(FakeCUDAGraph()):
        sync(t * 2)


# --- the engine under graphs ------------------------------------------------------------------------------------
def test_every_bucket_is_captured_before_traffic(graphs):
    r = graphs.runner
    assert r.batch_buckets == (1, 2, 4) and r.len_buckets == (64, 128)
    assert set(r.graphs) == {("cp", b) for b in (1, 2, 4)} | {("cp", b, "topk") for b in (1, 2, 4)} | \
        {("talker", b, n) for b in (1, 2, 4) for n in (64, 128)} | \
        {("prefill", b, n) for b in (1, 2, 4) for n in (16, 32, 64, 128)}
    assert all(g.num_ops > 0 for g in r.graphs.values())
    assert not graphs.has_work() and r.pos.eq(0).all()  # capture left every slot free and at position 0


def test_buckets_cross_as_sessions_join_and_leave_and_codes_equal_eager(model, graphs):
    """1 -> 2 -> 4 sessions, then the first leaves (3 rows in bucket 4, slots compacted), positions crossing the 64
    key bucket; every session's codes equal the eager engine's for it alone."""
    used = {k: g.replays for k, g in graphs.runner.graphs.items()}
    long = SamplingParams(do_sample=False, subtalker_dosample=False, max_new_tokens=30)
    story = "Once upon a time there was a small village by the sea, and every morning the fishermen sang."
    reqs = [req(TEXTS[0], non_streaming_mode=True), req(story, long, non_streaming_mode=True),
            req(TEXTS[2], long), req(TEXTS[3], long)]
    first = graphs.add(reqs[0])
    graphs.step()
    graphs.step()
    second = graphs.add(reqs[1])
    graphs.step()
    graphs.step()
    rest = [graphs.add(r) for r in reqs[2:]]
    sessions = [first, second, *rest]
    widths = []
    while not all(s.done for s in sessions):
        graphs.step()
        widths.append(graphs.num_active)
    assert 4 in widths and 3 in widths
    assert max(s.pos for s in sessions) > 64  # keys read from the 128 bucket at the end
    for s, r in zip(sessions, reqs):
        c = s.codes()
        assert len({tuple(f) for f in c.tolist()}) > 1, "every frame equal: frames alias the graph's output"
        assert torch.equal(c, alone(model, r))
    replayed = {k for k, g in graphs.runner.graphs.items() if g.replays > used[k]}
    # greedy rows: the code predictor's top-k-only graph
    assert {("talker", 1, 64), ("talker", 2, 64), ("talker", 4, 64), ("talker", 4, 128), ("cp", 4, "topk")} <= replayed
    assert graphs.free_slots == [0, 1, 2, 3]


def test_paused_incremental_session_under_graphs(model, graphs):
    full = alone(model, req("The quick brown fox jumps over the lazy dog."))
    s = graphs.add(req(None))
    other = graphs.add(req(TEXTS[2]))  # keeps the batch going while s waits for text
    paused = 0
    for piece in ["The qu", "ick brown ", "fox jumps over", " the lazy dog."]:
        s.append_text(piece)
        for _ in range(3):
            graphs.step()
            p = s.prompt
            paused += int(p is not None and s.phase == "talker" and s.text_step >= len(p.trailing))
    s.end_text()
    drain(graphs, [s, other])
    assert paused > 0
    assert torch.equal(s.codes(), full)
    assert torch.equal(other.codes(), alone(model, req(TEXTS[2])))


def test_streamed_chunks_under_graphs_equal_offline(model, graphs):
    kw = dict(speaker="ryan", language="english", do_sample=False, subtalker_dosample=False, max_new_tokens=12)
    offline = [model.generate_custom_voice(t, non_streaming_mode=False, **kw)[0][0] for t in TEXTS[:2]]
    rs = [SynthesisRequest(kind="custom_voice", text=t, speaker="ryan", language="english",
                           sampling=SamplingParams(do_sample=False, subtalker_dosample=False, max_new_tokens=12),
                           first_chunk_frames=1, chunk_frames=3) for t in TEXTS[:2]]
    replays = graphs.audio.bank.replays
    assert graphs.audio_graphs                                   # the audio decode is captured too
    _check_streams(graphs, rs, offline)
    assert graphs.audio.bank.replays > replays                   # ... and its graphs served these decodes


def _check_streams(eng, rs, offline):
    sessions = [eng.add(r) for r in rs]
    chunks = []
    drain(eng, sessions, chunks)
    for s, off in zip(sessions, offline):
        mine = [c for c in chunks if c.session_id == s.id]
        assert [c.is_last for c in mine].count(True) == 1 and mine[-1].is_last
        assert mine[0].num_frames == 1 and not mine[0].is_last  # a first chunk of one frame, then steady ones
        pcm = np.concatenate([c.pcm for c in mine])
        assert pcm.shape == off.shape and np.abs(pcm - off).max() <= 1e-4


def test_chunk_sizes_the_engine_is_told_about_decode_on_graphs(model, caplog):
    """A service's chunk size above the 8-frame bucket (chunk_frames: 12): the engine told about it captures that
    size too, so every chunk is one replay and the audio stays exact; an engine not told decodes such chunks
    eagerly and says so once."""
    kw = dict(speaker="ryan", language="english", do_sample=False, subtalker_dosample=False, max_new_tokens=30)
    offline = [model.generate_custom_voice(TEXTS[1], non_streaming_mode=False, **kw)[0][0]]
    r = lambda: SynthesisRequest(kind="custom_voice", text=TEXTS[1], speaker="ryan", language="english",  # noqa: E731
                                 sampling=SamplingParams(do_sample=False, subtalker_dosample=False, max_new_tokens=30),
                                 first_chunk_frames=1, chunk_frames=12)
    told = Engine(model, max_sessions=2, max_len=128, graph_capture=GraphCapture("cpu", fake=True),
                  audio_chunk_frames=(1, 12))
    bank = told.audio.bank
    calls = {"eager": 0}
    real_run = bank.run
    bank.run = lambda *a: (calls.__setitem__("eager", calls["eager"] + 1), real_run(*a))[1]
    replays = bank.replays
    _check_streams(told, [r()], offline)
    assert calls["eager"] == 0 and bank.replays - replays == 4  # chunks of 1, 12, 12 and the last 4 frames
    untold = Engine(model, max_sessions=2, max_len=128, graph_capture=GraphCapture("cpu", fake=True))
    with caplog.at_level("WARNING", logger="qwen_tts_core.generate.audio_stream"):
        _check_streams(untold, [r()], offline)
        _check_streams(untold, [r()], offline)
    assert [x.getMessage() for x in caplog.records].count(
        "an audio decode of 12 frames runs eagerly: graphs hold at most 8 (give the engine the chunk sizes in use: "
        "audio_chunk_frames)") == 1
    with pytest.raises(ValueError, match="audio_chunk_frames"):
        Engine(model, max_sessions=1, audio_chunk_frames=(0,))


def test_audio_decoder_falls_back_to_eager_when_its_capture_fails(model, monkeypatch):
    """A capture of the audio decoder that fails (an op CUDA graphs cannot take) leaves the step graphs in place
    and the audio exact, decoded eagerly."""
    from qwen_tts_core.codec.rows import StreamRows

    def refuse(self, capture):
        raise CaptureError("not capturable")
    monkeypatch.setattr(StreamRows, "capture_graphs", refuse)
    eng = Engine(model, max_sessions=2, max_len=64, graph_capture=GraphCapture("cpu", fake=True))
    assert eng.cuda_graphs and not eng.audio_graphs and not eng.audio.bank.graphs
    kw = dict(speaker="ryan", language="english", do_sample=False, subtalker_dosample=False, max_new_tokens=8)
    offline = [model.generate_custom_voice(TEXTS[0], non_streaming_mode=False, **kw)[0][0]]
    _check_streams(eng, [SynthesisRequest(kind="custom_voice", text=TEXTS[0], speaker="ryan", language="english",
                                          sampling=SamplingParams(do_sample=False, subtalker_dosample=False,
                                                                  max_new_tokens=8),
                                          first_chunk_frames=1, chunk_frames=3)], offline)


def test_prefills_replay_graphs_in_row_and_length_pieces_each_row_as_alone(model, graphs):
    """Three sessions starting in one step, prompts of different lengths (one past the 16 and 32 buckets), greedy and
    seeded sampling: one prefill graph for 2 rows and one for 1, each padded to the length bucket above its longest
    prompt; every session's codes equal its eager exact-length prefill alone."""
    story = "Once upon a time there was a small village by the sea, and every morning the fishermen sang."
    reqs = [req(story, non_streaming_mode=True), req(TEXTS[2], SAMPLED, seed=3),
            req(TEXTS[1], SAMPLED, seed=4, non_streaming_mode=True)]
    used = {k: g.replays for k, g in graphs.runner.graphs.items()}
    sessions = drain(graphs, [graphs.add(r) for r in reqs])
    a, b, c = sorted(s.prompt.prefill.shape[0] for s in sessions)  # one group, shortest first
    assert a <= 16 < b <= 32 < c <= 64, (a, b, c)
    replayed = {k: g.replays - used[k] for k, g in graphs.runner.graphs.items() if g.replays > used[k]}
    pieces = {k: n for k, n in replayed.items() if k[0] == "prefill"}
    assert pieces == {("prefill", 2, 32): 1, ("prefill", 1, 64): 1}, pieces  # 3 rows = 2 + 1, padded to buckets
    for s, r in zip(sessions, reqs):
        assert s.error is None
        assert torch.equal(s.codes(), alone(model, r))


def test_a_graph_prefill_launches_no_layer_from_the_host(graphs):
    """The point of the prefill graphs on a GPU: a short prompt's eager prefill is one host launch per op (777
    for the 1.7B talker and its first draw); replayed, the host launches the graph and a few copies."""
    from qwen_tts_core.generate.graphs import OpCounter
    from qwen_tts_core.generate.runner import Start

    r = graphs.runner
    slot = graphs.free_slots[-1]
    x = Start(slot, r.tts_pad.expand(12, -1), [], SamplingParams(), seed=1)
    g = r.graphs[("prefill", 1, 16)]
    before = g.replays
    with torch.inference_mode(), OpCounter() as host:
        r.start_many([x])
    assert g.replays == before + 1
    for op in ("aten::linear", "aten::scaled_dot_product_attention", "aten::rms_norm", "aten::embedding"):
        assert host.by_name[op] == 0, op
    # what remains are the slot's state resets, the seed's hash (host tensors) and the copies into the graph's inputs
    assert host.kernels < g.num_kernels / 2, (host.kernels, g.num_kernels)


def test_prompts_beyond_the_prefill_buckets_prefill_eagerly_under_graphs(model, monkeypatch):
    """With graphs, a prompt longer than the largest prefill bucket runs an exact eager pass (with prompts of its
    own length only: padded to a longer neighbour its prefill's last bits changed); shorter ones replay, also when
    they start beside it. Both give each session's codes alone."""
    from qwen_tts_core.generate import runner as runner_mod

    monkeypatch.setattr(runner_mod, "PREFILL_GRAPH_LENS", (16,))
    eng = Engine(model, max_sessions=2, max_len=128, graph_capture=GraphCapture("cpu", fake=True))
    assert {k for k in eng.runner.graphs if k[0] == "prefill"} == {("prefill", 1, 16), ("prefill", 2, 16)}
    story = "Once upon a time there was a small village by the sea, and every morning the fishermen sang."
    long_short = [req(story, non_streaming_mode=True), req(TEXTS[2], SAMPLED, seed=9)]
    got = drain(eng, [eng.add(r) for r in long_short])
    assert eng.runner.graphs[("prefill", 1, 16)].replays == 1 and eng.runner.graphs[("prefill", 2, 16)].replays == 0
    short = drain(eng, [eng.add(long_short[1])])
    assert eng.runner.graphs[("prefill", 1, 16)].replays == 2
    for s, r in zip(got + short, long_short + long_short[1:]):
        assert torch.equal(s.codes(), alone(model, r))


@pytest.mark.parametrize(("lens", "want"), [
    ([10] * 7, [([0, 1, 2, 3], 16), ([4, 5], 16), ([6], 16)]),
    ([10, 40, 5], [([0, 1], 64), ([2], 16)]),
    ([16, 17], [([0, 1], 32)]),
    ([128], [([0], 128)]),
    ([129, 3], [([0, 1], None)]),  # past the largest bucket: one exact pass for the group
])
def test_prefill_pieces(graphs, lens, want):
    assert graphs.runner.prefill_rows == (1, 2, 4) and graphs.runner.prefill_lens == (16, 32, 64, 128)
    assert graphs.runner._prefill_pieces(lens) == want


def test_graphs_are_captured_with_the_layouts_the_probe_chose(model, monkeypatch):
    """On CUDA the probe may pick the grouped layout for the code predictor too (where enable_gqa gets no fused
    kernel). Graphs are captured after the choice and replay it: the captured predictor steps run grouped, and the
    codes equal an eager engine's with the same layouts, greedy and seeded."""
    from qwen_tts_core.generate.runner import StepRunner
    from qwen_tts_core.model import layers

    def probe_says_grouped(self):
        self.set_decode_layout("grouped", "grouped")
        return {"layout": "grouped", "cp_layout": "grouped"}
    monkeypatch.setattr(StepRunner, "choose_decode_layout", probe_says_grouped)
    cp_keys, lens = model.talker.code_predictor.cfg.num_code_groups, []
    real = layers.grouped_decode_attention
    monkeypatch.setattr(layers, "grouped_decode_attention",
                        lambda q, k, *a: (lens.append(k.shape[2]), real(q, k, *a))[1])
    eng = Engine(model, max_sessions=2, max_len=64, graph_capture=GraphCapture("cpu", fake=True))
    assert any(n <= cp_keys for n in lens) and any(n > cp_keys for n in lens)  # predictor and talker captured
    reqs = [req(TEXTS[1]), req(TEXTS[2], SAMPLED, seed=5)]
    lens.clear()
    got = eng.run_all(reqs)
    assert not lens  # replays run the tape, not the Python body
    want = Engine(model, max_sessions=2).run_all(reqs)
    assert want[0].num_frames > 3
    for a, b in zip(got, want):
        assert torch.equal(a.codes(), b.codes())


def test_seeded_sampling_same_codes_alone_batched_static_and_graphs(model, graphs):
    """The device sampler: a seeded request gives the same codes alone, batched with others, on the CPU static
    path and under graphs; a different seed gives different codes."""
    want = [alone(model, req(t, SAMPLED, seed=100 + i)) for i, t in enumerate(TEXTS[:3])]
    batched = Engine(model, max_sessions=4).run_all([req(t, SAMPLED, seed=100 + i) for i, t in enumerate(TEXTS[:3])])
    static = Engine(model, max_sessions=4, static=True, max_len=128).run_all(
        [req(t, SAMPLED, seed=100 + i) for i, t in enumerate(TEXTS[:3])][::-1])[::-1]  # other slots, other order
    g = drain(graphs, [graphs.add(req(t, SAMPLED, seed=100 + i)) for i, t in enumerate(TEXTS[:3])])
    for i in range(3):
        for got in (batched[i], static[i], g[i]):
            assert torch.equal(got.codes(), want[i])
    assert not torch.equal(alone(model, req(TEXTS[0], SAMPLED, seed=7)), want[0])
    codes = torch.cat(want)
    assert codes.min() >= 0 and codes.max() < 2048 and len(set(codes[:, 0].tolist())) > 3


def test_code_predictor_graph_follows_the_rows_sampling(model, graphs):
    """Rows that sample with top-k only (the official defaults: top_k 50, top_p 1.0) replay the top-k graph; one row
    with subtalker top-p (or a top_k above TOPK_GRAPH_KMAX) sends the step to the general graph. Either way each
    seeded session's codes are the eager engine's for it alone."""
    from qwen_tts_core.generate.runner import TOPK_GRAPH_KMAX

    defaults = SamplingParams(max_new_tokens=10)
    nucleus = SamplingParams(max_new_tokens=10, subtalker_top_p=0.8)
    wide = SamplingParams(max_new_tokens=10, subtalker_top_k=TOPK_GRAPH_KMAX + 1)
    r = graphs.runner
    for mix, key in (([defaults, defaults], ("cp", 2, "topk")), ([defaults, nucleus], ("cp", 2)),
                     ([wide, defaults], ("cp", 2))):
        other = ("cp", 2) if key == ("cp", 2, "topk") else ("cp", 2, "topk")
        before = {k: r.graphs[k].replays for k in (key, other)}
        reqs = [req(TEXTS[i], sp, seed=40 + i) for i, sp in enumerate(mix)]
        got = drain(graphs, [graphs.add(x) for x in reqs])
        assert r.graphs[key].replays > before[key] and r.graphs[other].replays == before[other], (mix, key)
        for s, x in zip(got, reqs):
            assert torch.equal(s.codes(), alone(model, x))


def test_unseeded_device_sampling_follows_torch_manual_seed(model):
    eng = Engine(model, max_sessions=2)
    torch.manual_seed(5)
    a = eng.run_all([req(TEXTS[0], SAMPLED)])[0].codes()
    torch.manual_seed(5)
    b = eng.run_all([req(TEXTS[0], SAMPLED)])[0].codes()
    assert torch.equal(a, b)


def test_stored_voice_on_graphs_in_bf16(model_factory, ref_wav_path, tmp_path, checkpoint_factory):
    """A voice saved to disk and loaded back (fp32, CPU tensors) used by a bf16 model: everything the request brings
    is moved to the model's device and dtype once, at add(); graphs and eager agree."""
    from qwen_tts_core import Qwen3TTSModel

    base32 = model_factory("base", "tiny")
    (item,) = base32.create_voice_clone_prompt(str(ref_wav_path), ref_text="Good morning, how are you today?")
    back = load_voice_prompt(save_voice_prompt(item, tmp_path / "v.safetensors"))
    assert back.ref_spk_embedding.dtype == torch.float32
    base = Qwen3TTSModel.from_pretrained(checkpoint_factory("base", "tiny"), device_map="cpu", dtype="bfloat16")
    r = SynthesisRequest(kind="voice_clone", text="Hello world.", language="english", voice_clone_prompt=back,
                         sampling=GREEDY, decode_audio=False)
    eng = Engine(base, max_sessions=2, max_len=128, graph_capture=GraphCapture("cpu", fake=True))
    s = eng.add(r)
    vp = s.request.voice_clone_prompt
    assert vp.ref_spk_embedding.dtype == torch.bfloat16 and vp.ref_code.dtype == torch.long
    assert back.ref_spk_embedding.dtype == torch.float32  # the caller's voice is left as it was
    drain(eng, [s])
    assert s.finish_reason == "max_new_tokens" and s.error is None
    # eager with the graphs' shapes (static: prompts padded to the prefill buckets) gives the same bits; the default
    # CPU engine prefills exact lengths, and in bf16 a padded prompt's sums may differ in the last bit (runner.py),
    # enough to flip a greedy code on a CPU with AMX
    eager = Engine(base, max_sessions=2, max_len=128, static=True).run_all([r])[0]
    assert torch.equal(s.codes(), eager.codes())


def test_warm_up_needs_no_request_for_any_model_type(model_factory):
    base = model_factory("base", "tiny")
    eng = Engine(base, max_sessions=2, max_len=128, graph_capture=GraphCapture("cpu", fake=True))
    assert eng.warm_up() > 0
    assert not eng.has_work() and eng.free_slots == [0, 1]
    assert Engine(base, max_sessions=1).warm_up() > 0


def test_graph_options_are_checked(model):
    with pytest.raises(ValueError, match="cuda_graphs"):
        Engine(model, max_sessions=2, cuda_graphs=True)  # a CPU model
    with pytest.raises(ValueError, match="sampler"):
        Engine(model, max_sessions=2, sampler="torch", graph_capture=GraphCapture("cpu", fake=True))
    with pytest.raises(ValueError, match="batch_buckets"):
        Engine(model, max_sessions=2, batch_buckets=(0, 2))
    e = Engine(model, max_sessions=6, max_len=64, batch_buckets=(1, 4, 16),
               graph_capture=GraphCapture("cpu", fake=True))
    assert e.runner.batch_buckets == (1, 4, 6) and e.runner.len_buckets == (64,)


def test_kernels_per_captured_step_stay_within_budget():
    """The GPU steps are launch-bound (a 1.7B code-predictor pass was 5273 kernels, 12.2 ms on an H200), so the
    kernel count of each captured body is a budget: counted with the stand-in at the real layer counts of 1.7B.
    Before the one-kernel norm, the q/k norm + RoPE done once for q and k together, and the code predictor's noise
    drawn for its 15 codebooks at once: 5273 (pass) and 1660 (talker step); after: 2226 and 757, and 2046 for the
    pass that samples with top-k only (the official defaults). Then the pass's constants made once per pass (RoPE
    table, q/k norm weights, the samplers' per-row filter indices): 2031 and 1878. Then a row whose tempered logits
    reach +inf (a tiny temperature) drawing the greedy id, two kernels per draw: 2061 and 1908."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from gpu_opcount import shaped_talker, step_counts

    counts = step_counts(shaped_talker("1.7b"), (1, 8))
    assert counts["cp_pass_b1"] <= 2100 and counts["cp_pass_b8"] <= 2100, counts
    assert counts["cp_pass_topk_b1"] <= 1950 and counts["cp_pass_topk_b8"] <= 1950, counts
    assert counts["talker_step_b1"] <= 800 and counts["talker_step_b8"] <= 800, counts
    # compile=True (model/fused.py), estimated as one kernel per fused call (three around a sort or top-k): 407
    # and 1023 when written, 408 and 988 with the pass's constants
    assert counts["talker_step_b8_compiled_est"] <= 450 and counts["cp_pass_topk_b8_compiled_est"] <= 1100, counts
    assert counts["cp_pass_b8_compiled_est"] <= 1100, counts
