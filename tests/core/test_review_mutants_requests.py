"""Request checks, the graph stand-in and incremental text: the survivors a mutation review left unclassified.

Reviewed: qwen_tts_core/generate/requests.py (`validate`, the one check of a request against a model that the engine,
the Python API, the service and the jobs all run; `request_from_fields`, the one mapping of the service's and the
jobs' fields; `make_prompt`), generate/graphs.py (the CPU stand-in for CUDA graphs and its kernel count) and
generate/text_feed.py (`IncrementalText`). Each test here failed on a one-line change (a "mutant", named in its
docstring) that the rest of the fast suite let pass. The rules: a bad request is refused naming its field (the
service answers 4xx naming it); a field the caller leaves out gets the documented default; what a request carries
reaches its prompt; the stand-in keeps the contract that makes graph misuse fail on CPU. Tiny random checkpoints, CPU,
no Ray.

Defect found here (the test failed before its fix): a voice clone prompt whose speaker vector or codes were a nested
tensor raised torch's raw "NestedTensorImpl doesn't support sizes" from `validate`, naming no field: the shape check
read `.shape` before the dense-tensor check (`_check_plain`) could refuse it.
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from qwen_tts_core import VoiceClonePromptItem
from qwen_tts_core.generate.graphs import FakeCUDAGraph, GraphCapture, OpCounter, fake_graph
from qwen_tts_core.generate.requests import (
    RequestPolicy,
    make_prompt,
    request_from_fields,
    validate,
)
from qwen_tts_core.generate.text_feed import IncrementalText
from qwen_tts_core.types import SamplingParams, SynthesisRequest
from tests.core.test_review_api import _refused


@pytest.fixture(scope="module")
def vd(model_factory):
    """The tiny random VoiceDesign model (CPU fp32; loaded once per session by `model_factory`)."""
    return model_factory("voice_design")


def _custom(**kw) -> SynthesisRequest:
    return SynthesisRequest(**{"kind": "custom_voice", "text": "Hi.", "speaker": "ryan", "language": "english", **kw})


def _item(model, spk=None, codes=None) -> VoiceClonePromptItem:
    """An ICL voice clone prompt that fits `model` (its own speaker vector and codes unless given)."""
    t = model.cfg.talker
    g = torch.Generator().manual_seed(0)
    spk = torch.randn(t.hidden_size, generator=g) if spk is None else spk
    codes = torch.randint(0, t.codebook_size, (6, t.num_code_groups), generator=g) if codes is None else codes
    return VoiceClonePromptItem(ref_code=codes, ref_spk_embedding=spk, x_vector_only_mode=False, icl_mode=True,
                                ref_text="A reference sentence.")


def _clone(item) -> SynthesisRequest:
    return SynthesisRequest(kind="voice_clone", text="Hello.", language="english", voice_clone_prompt=item)


def _prompt(model, req: SynthesisRequest):
    target = model.tokenizer.target(req.text)
    return make_prompt(model, req, target.role, target.text, text_ended=True)


# ---- validate: what the engine (and so the API, the service and the jobs) refuses or takes ------------------------

def test_a_voice_clone_prompt_belongs_to_voice_clone_requests_only_and_they_need_one(cv, base):
    """(mutants R33: a prompt on a CustomVoice request let through, to fail inside a step; R34: a voice_clone request
    without one refused for a missing `x_vector_only_mode`, a flag the caller never heard of)"""
    _refused("voice_clone_prompt", validate, cv, _custom(voice_clone_prompt=_item(base)))
    e = _refused("voice_clone_prompt", validate, base, _clone(None))
    assert "is required" in e.message, e.message
    validate(base, _clone(_item(base)))


@pytest.mark.parametrize("sampling", [None, {"temperature": 0.5}, "greedy"], ids=["none", "dict", "str"])
def test_sampling_that_is_not_sampling_params_is_refused_naming_it(cv, sampling):
    """(mutant R40: the type unchecked) A dict of sampling fields (what a service sends) is not SamplingParams: it
    failed with an AttributeError inside the engine's step, where every session of the batch fails with it."""
    _refused("sampling", validate, cv, _custom(sampling=sampling))
    validate(cv, _custom(sampling=SamplingParams(temperature=0.5)))


def test_reference_codes_of_the_longest_reference_and_one_more_frame_are_taken(base):
    """(mutant R14: MAX_REF_CODE_FRAMES without its + 1) 120 s at 24 kHz is 1500 frames; voices stored before
    `to_24k` capped the length carry 1501 (the reference's float ceiling at 44.1 kHz): they must still be taken.
    1502 is refused naming the prompt."""
    groups = base.cfg.talker.num_code_groups
    validate(base, _clone(_item(base, codes=torch.zeros(1501, groups, dtype=torch.long))))
    e = _refused("voice_clone_prompt", validate, base, _clone(_item(base, codes=torch.zeros(1502, groups,
                                                                                            dtype=torch.long))))
    assert "1502 frames" in e.message, e.message


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
@pytest.mark.parametrize("which", ["spk", "codes"])
def test_nested_tensors_in_a_voice_prompt_are_refused_naming_it(base, which):
    """DEFECT (and mutant R26: the nested check dropped, which the defect made dead code) A nested tensor as the
    speaker vector or the codes raised torch's raw RuntimeError ("NestedTensorImpl doesn't support sizes") from the
    shape check, naming no field: the dense-tensor check now runs first."""
    t = base.cfg.talker
    item = (_item(base, spk=torch.nested.nested_tensor([torch.ones(t.hidden_size)])) if which == "spk" else
            _item(base, codes=torch.nested.nested_tensor([torch.ones(t.num_code_groups, dtype=torch.long)] * 3)))
    e = _refused("voice_clone_prompt", validate, base, _clone(item))
    assert "dense" in e.message and "nested" in e.message, e.message


# ---- request_from_fields: the service's and the jobs' fields ------------------------------------------------------

@pytest.mark.parametrize("value", ["false", "no"])
def test_a_non_streaming_mode_that_is_not_a_switch_is_refused_by_the_fields_mapping(cv, value):
    """(mutant R46: the fields mapping does not check it) The mapping runs `bool()` on it to build the request, so
    unchecked there "false" became True before `validate` could see what the caller sent."""
    _refused("non_streaming_mode", request_from_fields, cv, text="Hi.", non_streaming_mode=value)
    assert request_from_fields(cv, text="Hi.", non_streaming_mode=True).non_streaming_mode is True


def test_a_custom_voice_request_without_a_voice_speaks_with_the_first_speaker(cv):
    """(mutant R48: no default speaker) The documented default of `voice` for a CustomVoice model is its first
    speaker; without one the prompt carried no speaker at all (another voice, unasked)."""
    req = request_from_fields(cv, text="Hi.")
    assert req.speaker == cv.get_supported_speakers()[0]


def test_a_voice_design_request_naming_a_voice_is_refused_naming_voice(vd):
    """(mutant R49: the voice ignored) A VoiceDesign model has no voices to pick: a caller who names one gets a
    voice they did not ask for, so it is refused naming `voice`."""
    _refused("voice", request_from_fields, vd, text="Hi.", voice="ryan", instructions="A calm, low voice.")
    assert request_from_fields(vd, text="Hi.", instructions="A calm, low voice.").instruct == "A calm, low voice."


def test_the_first_chunk_size_comes_from_the_policys_first_chunk(cv):
    """(mutant R59: first_chunk_frames taken from chunk_frames) A deployment's small first chunk is what makes the
    first audio early: it must reach the request as configured."""
    req = request_from_fields(cv, text="Hi.", policy=RequestPolicy(first_chunk_frames=2, chunk_frames=5))
    assert (req.first_chunk_frames, req.chunk_frames) == (2, 5)


# ---- make_prompt: what a request carries reaches its prompt ------------------------------------------------------

def test_a_voice_design_description_is_kept_on_the_sizes_that_drop_custom_voice_instructions(vd):
    """(mutant R67: instruct dropped for every kind on 0.6B) The reference drops `instruct` for 0.6B CustomVoice
    only; VoiceDesign's instruct is the voice itself (its description) and is kept on every size."""
    small = types.SimpleNamespace(tokenizer=vd.tokenizer, talker=vd.talker,
                                  cfg=dataclasses.replace(vd.cfg, tts_model_size="0b6"))
    described = _prompt(small, SynthesisRequest(kind="voice_design", text="Hello.", instruct="A calm, low voice.",
                                                language="english"))
    bare = _prompt(small, SynthesisRequest(kind="voice_design", text="Hello.", language="english"))
    assert described.prefill.shape[0] > bare.prefill.shape[0]


def test_an_icl_prompt_speaks_with_its_speaker_vector(base):
    """(mutant R69: the speaker vector used for x-vector-only prompts only) An ICL prompt carries the reference
    speaker's vector as the reference's does: two prompts that differ only in it give different prefills."""
    t = base.cfg.talker
    one = _prompt(base, _clone(_item(base, spk=torch.ones(t.hidden_size))))
    other = _prompt(base, _clone(_item(base, spk=-torch.ones(t.hidden_size))))
    assert not torch.equal(one.prefill, other.prefill)


# ---- the graph stand-in --------------------------------------------------------------------------------------------

def test_the_stand_in_refuses_to_replay_a_graph_that_captured_nothing():
    """(mutant G13: the empty replay allowed) A graph never captured (or reset) has nothing to launch; replaying it
    is a caller's bug (a capture that failed, a reset graph used again), so the stand-in raises as CUDA does."""
    g = FakeCUDAGraph()
    with pytest.raises(RuntimeError, match="captured nothing"):
        g.replay()
    x = torch.zeros(2)
    with fake_graph(g):
        x.add_(1)
    g.replay()
    assert x.tolist() == [2.0, 2.0]
    g.reset()
    with pytest.raises(RuntimeError, match="captured nothing"):
        g.replay()


def test_in_place_ops_count_as_kernels():
    """(mutant G15: mutating ops counted only when their output is new memory) An in-place update (`add_`, `fill_`)
    launches a kernel though it returns its input; a view launches none. The kernels-per-step budget counts these."""
    t = torch.zeros(4)
    with OpCounter() as c:
        t.add_(1)
        t[1:].fill_(0)
    assert c.kernels == 2 and set(c.by_name) == {"aten::add_", "aten::fill_"}, c.by_name
    g = FakeCUDAGraph()
    with fake_graph(g):
        t.mul_(2)
    assert g.num_kernels == 1


def test_a_capture_runs_the_body_warmup_times_first():
    """(mutant G16: the stand-in captures without warming up) As on CUDA (the side stream), the body runs `warmup`
    times before the captured call: whatever it sets up lazily on its first call is made outside the graph."""
    x = torch.zeros(1)
    cap = GraphCapture(torch.device("cpu"), fake=True, warmup=2)
    g = cap.capture(lambda: x.add_(1))
    assert x.item() == 3.0  # two warm-up calls, then the captured one
    g.replay()
    assert x.item() == 4.0


# ---- incremental text ----------------------------------------------------------------------------------------------

def test_an_open_tail_of_exactly_the_limit_is_taken_one_more_character_is_refused():
    """(mutant T18: MAX_OPEN_CHARS 1023) 1024 characters without a boundary wait; the 1025th is refused naming
    `text` (the bound itself is allowed)."""
    feed = IncrementalText(encode=lambda s: [ord(c) for c in s], split_offsets=lambda t: [0])
    assert feed.append("a" * 1024) == []
    _refused("text", feed.append, "a")
