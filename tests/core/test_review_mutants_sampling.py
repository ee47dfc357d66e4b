"""Sampling, request checks, the graph stand-in and incremental text, pinned by a mutation review.

Reviewed: qwen_tts_core/generate/sampling.py (the reference sampler `warp`/`pick`/`pick_rows` and the talker's
processors; the device sampler `sample_device` and its counter-based noise), generate/requests.py (`validate`,
`request_from_fields` and the field checks), generate/graphs.py (`FakeCUDAGraph`, the CPU stand-in for CUDA graphs)
and generate/text_feed.py (`IncrementalText`). Each test here failed on a one-line change (a "mutant", named in its
docstring) that the rest of the fast suite let pass. The rules: the filters keep exactly the ids Hugging Face's
warpers keep (temperature, top-k with ties kept, top-p removing cumulative probability <= 1 - top_p, the most likely
id always kept), in both samplers and on every path of the device sampler; a seeded row draws the same ids whatever
shares its batch; a bad request is refused naming its field, at the bound itself; the stand-in keeps the contract
that makes graph misuse fail on CPU. Pure functions and tiny random checkpoints, CPU, no Ray.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen_tts_core import Engine, SamplingParams, SynthesisRequest
from qwen_tts_core.generate.graphs import CaptureError, FakeCUDAGraph, fake_graph
from qwen_tts_core.generate.requests import (
    check_seed,
    min_positions,
)
from qwen_tts_core.generate.sampling import (
    SamplePlan,
    apply_repetition_penalty,
    pick,
    pick_rows,
    sample_device,
    talker_logits_processors,
    warp,
)
from qwen_tts_core.generate.text_feed import IncrementalText
from tests.core.test_review_api import _refused

# ---- the filters: which ids a draw may land on ------------------------------------------------------------------

def _kept_by_device(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                    plan: SamplePlan | None) -> set[int]:
    """The ids the device sampler may draw for one row: id j is kept iff a noise that favours j alone by far makes
    the draw land on j (Gumbel-max: the draw is argmax(kept logits / T + noise))."""
    V = logits.shape[-1]
    kept = set()
    for j in range(V):
        noise = torch.zeros(1, V)
        noise[0, j] = 1e4
        got = sample_device(logits[None], torch.ones(1, dtype=torch.bool), torch.tensor([temperature]),
                            torch.tensor([top_k]), torch.tensor([top_p]), lambda n=noise: n, plan)
        if int(got) == j:
            kept.add(j)
    return kept


def _kept_by_warp(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> set[int]:
    return set(torch.isfinite(warp(logits, temperature, top_k, top_p)).nonzero().flatten().tolist())


# (logits, temperature, top_k, top_p, how many ids Hugging Face's warpers keep)
FILTER_CASES = [
    pytest.param([0.0, 0.0, 0.0, 0.0], 1.0, 0, 0.5, 2, id="uniform-top-p-half"),      # cum 0.25, 0.5 <= 0.5 removed
    pytest.param([0.0, 0.0, 0.0, 0.0], 1.0, 0, 0.75, 3, id="uniform-top-p-3/4"),
    pytest.param([0.0, 0.0, 0.0, 0.0], 1.0, 0, 1.0, 4, id="no-filter-keeps-all"),
    pytest.param([3.0, 1.0, 0.5, -2.0, -7.0], 1.0, 0, 1.0, 5, id="no-filter-keeps-the-least-likely"),
    pytest.param([3.0, 1.0, 0.5, -2.0, -7.0], 1.0, 5, 1.0, 5, id="top-k-of-V"),
    pytest.param([3.0, 1.0, 0.5, -2.0, -7.0], 1.0, 9, 1.0, 5, id="top-k-above-V"),
    pytest.param([3.0, 1.0, 1.0, 1.0, -7.0], 1.0, 2, 1.0, 4, id="top-k-ties-at-the-kth-kept"),
    pytest.param([3.0, 1.0, 0.5, -2.0, -7.0], 1.0, 2, 1.0, 2, id="top-k-2"),
    pytest.param([3.0, 1.0, 0.5, -2.0, -7.0], 1.0, 1, 1.0, 1, id="top-k-1"),
    pytest.param([2.0, 1.9, 0.0, -1.0, -1.5], 1.0, 3, 0.6, 2, id="top-k-then-top-p"),
    pytest.param([2.0, 1.9, 0.0, -1.0, -1.5], 0.25, 0, 0.9, 2, id="temperature-then-top-p"),
    pytest.param([2.0, 1.9, 0.0, -1.0, -1.5], 4.0, 0, 0.9, 5, id="hot-temperature-then-top-p"),
    pytest.param([3.0, 1.0, 0.5, -2.0, -7.0], 1.0, 0, 1e-9, 1, id="tiny-top-p-keeps-the-top-id"),
]


@pytest.mark.parametrize("logits, temperature, top_k, top_p, n_kept", FILTER_CASES)
def test_both_samplers_keep_the_ids_hugging_faces_warpers_keep(logits, temperature, top_k, top_p, n_kept):
    """(mutants S04-S08 in `warp`; S41-S44 and S50 in the device sampler and its eager plan) Temperature,
    then top-k keeping every id tied with the k-th, then top-p removing the ids whose ascending cumulative
    probability is <= 1 - top_p (the most likely id always stays): the reference sampler's `warp` keeps exactly the
    ids HF keeps, and the device sampler keeps the same ids on its general (graph) path and on its eager plans."""
    x = torch.tensor(logits)
    want = _kept_by_warp(x, temperature, top_k, top_p)
    assert len(want) == n_kept, want
    plan = SamplePlan.of([True], [top_k], [top_p])
    for got in (_kept_by_device(x, temperature, top_k, top_p, None),
                _kept_by_device(x, temperature, top_k, top_p, plan)):
        if len(set(logits)) == 1:  # all tied: which ones top-p keeps is the sort's choice, how many is the rule
            assert len(got) == n_kept, got
        else:
            assert int(x.argmax()) in want and got == want, (got, want)


def test_the_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_ids_only():
    """(mutants S01, S02 per row; S64, S65, S69 batched) HF's repetition penalty: a seen id's logit is divided by
    the penalty when positive and multiplied by it when negative (both make it less likely); unseen ids keep theirs.
    The batched processors (a seen-set) give the per-row values."""
    from qwen_tts_core.generate.sampling import talker_logits_batch

    logits = torch.tensor([2.0, -2.0, 4.0, -4.0, 1.0])
    got = apply_repetition_penalty(logits.clone(), torch.tensor([0, 1, 1]), 2.0)
    assert got.tolist() == [1.0, -4.0, 4.0, -4.0, 1.0]
    seen = torch.tensor([[True, True, False, False, False]])
    batched = talker_logits_batch(logits[None].clone(), seen, torch.tensor([2.0]), torch.tensor([5]),
                                  torch.zeros(5, dtype=torch.bool), eos_id=4)
    assert batched[0].tolist() == got.tolist()


def test_the_talkers_processors_penalise_suppress_from_the_first_special_id_and_hold_eos_for_two_ids():
    """(mutants S19, S21; also S17, S18, S20) The talker's per-row processors, as the reference's generate() sets them:
    the repetition penalty on the codebook-0 history, every id from `suppress_from` on is -inf except EOS, and EOS
    is -inf for the first two ids (min_new_tokens=2) and then keeps its own logit (not the suppressed -inf)."""
    eos, first_special = 6, 4
    logits = torch.tensor([1.0, 2.0, -1.0, 0.5, 3.0, 3.0, 0.25, 3.0])
    for n in range(4):
        got = talker_logits_processors(logits.clone(), torch.tensor([1, 2]), 2.0, n, eos, first_special)
        assert got[:first_special].tolist() == [1.0, 1.0, -2.0, 0.5]
        assert got[[4, 5, 7]].isneginf().all()
        assert (got[eos].isneginf().item() if n < 2 else got[eos].item() == 0.25), n


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_the_reference_sampler_draws_from_the_warped_distribution():
    """(mutant S09: `pick` drew from softmax(logits), ignoring temperature, top-k and top-p) A top-k of 1 or a tiny
    top-p leaves the most likely id only: every draw is it, whatever the generator."""
    logits = torch.zeros(1000)
    logits[7] = 0.5
    for seed in range(20):
        assert int(pick(logits, True, 1.0, 1, 1.0, _gen(seed))) == 7
        assert int(pick(logits, True, 1.0, 0, 1e-6, _gen(seed))) == 7


def test_a_tempered_logit_at_infinity_draws_the_greedy_id_of_the_logits():
    """(mutants S10, S11, S53, S54, S58) A temperature so small that logits / T overflows to +inf (two ids at +inf:
    softmax is NaN, where the reference's multinomial raises) draws the greedy id of the logits themselves, its
    limit: not an error, and not the first id that overflowed. Both samplers, every path of the device sampler."""
    logits = torch.tensor([1.0, 2.0, -1.0, -0.5])
    T = 1e-39
    assert torch.isposinf(logits / T).tolist() == [True, True, False, False]
    assert int(pick(logits, True, T, 0, 1.0, _gen(0))) == 1
    assert pick_rows(logits[None], [True], [T], [0], [1.0], [None]).tolist() == [1]
    for top_k, top_p in ((0, 1.0), (2, 1.0), (0, 0.9)):
        noise = torch.zeros(1, 4)
        noise[0, 0] = 50.0  # favours id 0, the first at +inf
        for plan in (None, SamplePlan.of([True], [top_k], [top_p])):
            got = sample_device(logits[None], torch.ones(1, dtype=torch.bool), torch.tensor([T]),
                                torch.tensor([top_k]), torch.tensor([top_p]), lambda n=noise: n, plan)
            assert got.tolist() == [1], (top_k, top_p, plan)


def test_rows_of_the_reference_sampler_each_draw_as_alone():
    """(mutants S12-S16) `pick_rows` draws each row as `pick` draws it alone: a greedy row next to a sampling one
    takes its argmax and the sampling row still samples; a seeded row keeps its generator's draw next to an unseeded
    row with the same parameters; each row uses its own generator and its own top_k."""
    torch.manual_seed(0)
    V = 1000
    logits = torch.zeros(2, V)
    logits[:, 3] = 0.01  # argmax 3; nearly uniform otherwise
    alone = [int(pick(logits[1], True, 1.0, 0, 1.0, _gen(s))) for s in (11, 12)]
    assert alone[0] != 3 and alone[0] != alone[1]
    # greedy next to sampling (S12: all greedy; S13: the greedy row sampled on the shared fast path)
    got = pick_rows(logits, [False, True], [1.0, 1.0], [0, 0], [1.0, 1.0], [None, _gen(11)])
    assert got.tolist() == [3, alone[0]]
    got = pick_rows(logits, [False, True], [1.0, 1.0], [0, 0], [1.0, 1.0], [None, None])
    assert got[0] == 3
    # a seeded row next to an unseeded one with the same parameters (S14)
    got = pick_rows(logits, [True, True], [1.0, 1.0], [0, 0], [1.0, 1.0], [_gen(11), None])
    assert got[0] == alone[0]
    # each row its own generator (S15)
    got = pick_rows(logits, [True, True], [1.0, 1.0], [0, 0], [1.0, 1.0], [_gen(12), _gen(11)])
    assert got.tolist() == [alone[1], alone[0]]
    # each row its own top_k on the unseeded path (S16)
    for _ in range(5):
        got = pick_rows(logits, [True, True], [1.0, 1.0], [0, 1], [1.0, 1.0], [None, None])
        assert got[1] == 3


def _row_noise(B: int, V: int, favour: list[int]) -> torch.Tensor:
    noise = torch.zeros(B, V)
    noise[torch.arange(B), torch.tensor(favour)] = 1e4
    return noise


def test_a_row_of_an_eager_device_step_keeps_its_own_filters_whatever_shares_its_batch():
    """(mutant S62: the eager plan's top-p only when every row uses it; S47, S56, S61, S63 are pinned elsewhere)
    Rows with different filters in one device draw:
    a row without top-k next to a top-k row keeps every id (not only the top one); a top-k 4 row next to a top-k 2
    row keeps its 4 (the plan's kmax is the largest); a top-p row next to a row without one keeps only its nucleus;
    a sampling row next to a greedy one samples. Each row's kept set equals the set it keeps alone."""
    V = 6
    logits = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.0, -1.0]).repeat(2, 1)
    cases = [  # (do_sample, top_k, top_p) of rows 0 and 1
        ([True, True], [2, 0], [1.0, 1.0]),
        ([True, True], [2, 4], [1.0, 1.0]),
        ([True, True], [0, 0], [1.0, 0.5]),
        ([False, True], [0, 0], [1.0, 1.0]),
    ]
    for do, ks, ps in cases:
        plan = SamplePlan.of(do, ks, ps)
        for row in (0, 1):
            alone = _kept_by_device(logits[row], 1.0, ks[row], ps[row], None) if do[row] else {0}
            kept = set()
            for j in range(V):
                got = sample_device(logits, torch.tensor(do), torch.ones(2), torch.tensor(ks), torch.tensor(ps),
                                    lambda j=j: _row_noise(2, V, [j, j]), plan)
                if int(got[row]) == j:
                    kept.add(j)
            assert kept == alone, (do, ks, ps, row, kept, alone)


# ---- request checks ----------------------------------------------------------------------------------------------

def test_a_seed_is_an_int_in_0_to_2_63_and_the_bounds_are_the_bounds():
    """(mutants R10, R12) Seeds are integers in [0, 2**63): 0 and 2**63 - 1 are taken, 2**63 and -1 refused naming
    seed, as are True and numpy's True (a truthy switch is not a seed); a numpy integer comes back a Python int (the
    job's manifest and the service's response carry it as JSON)."""
    assert check_seed(0) == 0 and check_seed(2**63 - 1) == 2**63 - 1 and check_seed(None) is None
    got = check_seed(np.int64(5))
    assert got == 5 and type(got) is int
    for bad in (2**63, -1, True, np.bool_(True), 1.0):
        _refused("seed", check_seed, bad)


def _cv_req(**kw) -> SynthesisRequest:
    kw.setdefault("decode_audio", False)
    return SynthesisRequest(kind="custom_voice", text=kw.pop("text", "Hello."), speaker="ryan", language="english",
                            sampling=SamplingParams(max_new_tokens=2, do_sample=False, subtalker_dosample=False), **kw)


@pytest.mark.parametrize("field, value", [
    ("first_chunk_frames", 0), ("chunk_frames", 0), ("first_chunk_frames", True), ("chunk_frames", True),
    ("priority", None), ("non_streaming_mode", "false"), ("decode_audio", "false"), ("seed", 2**63),
], ids=lambda v: repr(v))
def test_the_engine_refuses_each_bad_request_field_naming_it(cv, field, value):
    """(mutant R38: a chunk size of True taken as 1; R37, R41, R42 are pinned elsewhere) `validate` at Engine.add:
    chunk sizes are integers >= 1 (0 and True refused),
    priority is 'interactive' or 'bulk', the switches are booleans (the string "false" is truthy), the seed is
    checked there too (a SynthesisRequest built by hand does not pass through request_from_fields)."""
    _refused(field, Engine(cv, max_sessions=1).add, _cv_req(**{field: value}))


def test_the_least_positions_count_every_token_the_prompt_and_its_text_take():
    """(mutants R62, R63, R64, R68) min_positions: the instruction and the role, then the larger of the text side
    (an ICL transcript, the text, tts_eos once ended) and the codec side (bos + each reference frame)."""
    role, text, instruct, ref = [1, 2, 3], [4] * 5, [9] * 7, [8] * 4
    assert min_positions(role, text, False) == 3 + 5
    assert min_positions(role, text, True) == 3 + 6
    assert min_positions(role, text, True, instruct) == 7 + 3 + 6
    assert min_positions(role, text, True, None, ref, torch.zeros(9, 16)) == 3 + 4 + 6      # text side: 10
    assert min_positions(role, text, True, None, ref, torch.zeros(10, 16)) == 3 + 11       # codec side: 1 + 10


# ---- incremental text ----------------------------------------------------------------------------------------------

def _feed() -> IncrementalText:
    """A feed over a toy tokenizer: a piece starts at each space; the first committed segment encodes as the start of
    an utterance (ids + 1000), later ones plainly; the role is that of the first segment (its length)."""
    return IncrementalText(encode=lambda s: [1000 + ord(c) for c in s],
                           split_offsets=lambda t: [0] + [i for i in range(1, len(t)) if t[i] == " "],
                           encode_more=lambda s: [ord(c) for c in s], role_of=lambda s: [len(s)])


def test_the_first_segment_sets_the_role_and_its_encoding_later_ones_keep_them():
    """(mutant T16: a bytearray piece refused; also T10, T11) The role and the utterance-start encoding belong to
    the first committed segment
    only; later segments are encoded as text that continues (`encode_more`) and leave the role as it was. A
    bytearray piece is bytes."""
    feed = _feed()
    assert feed.append("ab cd ef") == [1000 + ord(c) for c in "ab cd"]
    assert feed.role == [5]
    assert feed.append(bytearray(b" gh")) == [ord(c) for c in " ef"]
    assert feed.end() == [ord(c) for c in " gh"]
    assert feed.role == [5] and feed.text == "ab cd ef gh"


def test_the_feed_refuses_text_after_its_end_a_second_end_and_a_cut_utf8_character():
    """(mutants T03, T08, T09) After end() no piece is taken and end() is not taken twice; an end inside a UTF-8
    character begun by a bytes piece raises (UnicodeDecodeError, a ValueError) rather than dropping its bytes."""
    feed = _feed()
    feed.append("ok")
    feed.end()
    with pytest.raises(ValueError):
        feed.append("more")
    with pytest.raises(ValueError):
        feed.end()
    cut = _feed()
    cut.append(b"caf\xc3")
    with pytest.raises(UnicodeDecodeError):
        cut.end()


def test_pieces_are_normalized_as_they_arrive_so_committed_ids_are_those_of_the_normalized_text():
    """(mutant T14: append without the tokenizer's normalization) A letter and its combining accent in separate
    pieces are one NFC character before the tail is split and encoded: the committed ids are the normalized text's
    (the tokenizer normalizes the whole text the same way), not those of the decomposed pieces."""
    import unicodedata

    feed = IncrementalText(encode=lambda s: [ord(c) for c in s],
                           split_offsets=lambda t: [0] + [i for i in range(1, len(t)) if t[i] == " "],
                           normalize=lambda t: unicodedata.normalize("NFC", t))
    got = feed.append("cafe") + feed.append("\u0301 au") + feed.append(" lait") + feed.end()
    assert got == [ord(c) for c in "caf\u00e9 au lait"]


# ---- the graph stand-in ------------------------------------------------------------------------------------------

def test_the_stand_in_refuses_a_python_number_written_into_one_element_while_capturing():
    """(mutant G10: `_host_scalar_copy` without its one-element case) `t[i] = <Python number>` with an int index
    copies a host scalar into one element: on CUDA a blocking host-to-device copy a capture refuses (torch 2.11), so
    the stand-in refuses it too; a fill of a slice (`t[1:] = 0`) is a kernel and is captured."""
    t = torch.zeros(3)
    with pytest.raises(CaptureError, match="host-to-device"), fake_graph(FakeCUDAGraph()):
        t[1] = 2.0
    g = FakeCUDAGraph()
    with fake_graph(g):
        t[1:] = 5.0
    t.zero_()
    g.replay()
    assert t.tolist() == [0.0, 5.0, 5.0]


def test_the_stand_in_poisons_integer_and_bool_outputs_too():
    """(mutant G26) Every dtype of the graph's pool holds garbage until a replay writes
    it: integers a huge negative value, bools True (ids and masks read before their replay must not look valid)."""
    x = torch.tensor([1, 2, 3])
    g = FakeCUDAGraph()
    with fake_graph(g):
        ids = x * 2
        mask = x > 1
    assert (ids < -(2**40)).all() and mask.all()
    g.replay()
    assert ids.tolist() == [2, 4, 6] and mask.tolist() == [False, True, True]
