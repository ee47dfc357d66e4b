"""`Qwen3TTSModel`: the drop-in Python API of the official package, on our engine.

    from qwen_tts_core import Qwen3TTSModel
    model = Qwen3TTSModel.from_pretrained("Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice", device_map="cuda:0",
                                          dtype=torch.bfloat16)
    wavs, sr = model.generate_custom_voice(text="Hello", speaker="Ryan", language="English")

Same method names, arguments, defaults, list (batch) inputs and `(list[np.ndarray], 24000)` results as the reference,
plus `seed=` and the `stream_*` methods that yield audio while codes are generated.
"""

from __future__ import annotations

import functools
import logging
import numbers
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint.weights import (
    checkpoint_dtype,
    load_module,
    read_tensors,
    resolve_checkpoint,
    resolve_dtype,
    safetensors_files,
)
from .config import TTSConfig, generation_defaults
from .errors import ECHO_CHARS, RequestError, shown
from .generate.driver import EngineDriver
from .generate.engine import Engine
from .generate.requests import (
    INSTRUCT_DROPPED,
    check_language,
    check_seed,
    check_text,
    instruct_supported,
)
from .model.layers import RotaryTable, prepare_for_inference_
from .model.talker import Talker
from .text.tokenizer import TextTokenizer
from .types import SAMPLE_RATE, AudioChunk, SamplingParams, SynthesisRequest
from .voice_prompt import VoiceClonePromptItem, prompt_items

log = logging.getLogger(__name__)

REFERENCE_DECODE_CHUNK = 300
HARD_DEFAULTS = dict(do_sample=True, top_k=50, top_p=1.0, temperature=0.9, repetition_penalty=1.05,
                     subtalker_dosample=True, subtalker_top_k=50, subtalker_top_p=1.0,
                     subtalker_temperature=0.9, max_new_tokens=2048)
def _resolve_device(device_map: Any) -> torch.device:
    if isinstance(device_map, dict):  # transformers' {"": device}: the whole model on one device
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError(f"device_map={device_map!r}: the model runs on one device; give one (e.g. 'cuda:0')")
        device_map = devices.pop()
        device_map = f"cuda:{device_map}" if isinstance(device_map, int) and not isinstance(device_map, bool) \
            else device_map
    if device_map is None:  # as transformers' from_pretrained without a device_map: the CPU
        return torch.device("cpu")
    if device_map == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device_map)
    except (RuntimeError, TypeError):
        raise ValueError(f"device_map={device_map!r} is not a device (use 'cpu', 'cuda' or 'cuda:N')") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device_map={device_map!r} but CUDA is not available")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device_map={device_map!r} but this machine has {n} CUDA device(s)")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _as_list(x: Any, n: int, name: str) -> list:
    xs = x if isinstance(x, list) else [x]
    if len(xs) == 1 and n > 1:
        xs = xs * n
    if len(xs) != n:
        raise RequestError(name, f"batch size mismatch: text has {n} item(s), {name} has {len(xs)}")
    return xs


def _switch(value: Any) -> Any:
    """The forms of a switch the reference runs (None, 0/1, NumPy's bools) as a bool; anything else as it is, for
    `validate` to refuse naming the argument (bool() took "false" for True)."""
    if value is None or isinstance(value, bool | np.bool_) or \
            isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    return value


def _session_error(message: str | None, field: str | None) -> ValueError:
    return RequestError(field, message.removeprefix(f"{field}: ")) if field else ValueError(message or "failed")


HUB_ARGUMENTS = ("token", "local_files_only", "force_download")
"""from_pretrained arguments handed to huggingface_hub's download (a private repo needs its token)."""


class Qwen3TTSModel:
    def __init__(self, path: Path, cfg: TTSConfig, talker: Talker, tokenizer: TextTokenizer, codec,
                 speaker_encoder, generate_defaults: dict[str, Any]) -> None:
        self.path, self.cfg, self.talker, self.tokenizer = path, cfg, talker, tokenizer
        self.codec, self.speaker_encoder = codec, speaker_encoder
        self.generate_defaults = generate_defaults
        # generate_* decode like the reference (its 300-frame pieces re-decoded with 25 frames of context) so the
        # drop-in output matches it at any length; True: the exact causal decode (what stream_* produces)
        self.exact_decode = False
        # True (drop-in default): sampled runs draw from torch's generators exactly as the reference does (the same
        # codes after torch.manual_seed; eager). False: the engine's device sampler (counter-based per-request
        # seeds, CUDA graphs on GPU). Set with configure_engine().
        self.reference_sampling = True
        self.engine_options: dict[str, Any] = {}
        self._driver: EngineDriver | None = None
        self._driver_lock = threading.RLock()
        # one token per generate_*/stream_* call holding the driver: added under _driver_lock with the taking of
        # the driver, so configure_engine sees a call that has the engine but has not added its session yet;
        # discarded without the lock (a dropped stream's finalizer may run in any thread, inside any lock)
        self._in_flight: set[object] = set()

    # --- loading ----------------------------------------------------------------------------------------------
    @classmethod
    @torch.inference_mode(False)   # normal tensors even when called under inference mode: they keep version counters,
    # which the packed CPU products follow when a weight is replaced (an inference tensor's packed copy is not used)
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, device_map: Any = None,
                        dtype: Any = None, attn_implementation: str | None = None,
                        torch_dtype: Any = None, revision: str | None = None, cache_dir: str | None = None,
                        **kwargs: Any) -> Qwen3TTSModel:
        """Load an official Qwen3-TTS 12Hz checkpoint (local folder or hub id). device_map: None loads on the CPU,
        as the reference (transformers) does; "auto" on cuda:0 when CUDA is there. `attn_implementation` is
        accepted for compatibility: attention runs on torch SDPA (flash kernels where torch has them)."""
        hub = {k: kwargs.pop(k) for k in HUB_ARGUMENTS if k in kwargs}
        subfolder = kwargs.pop("subfolder", None)
        quantized = sorted(set(kwargs) & {"quantization_config", "load_in_8bit", "load_in_4bit"})
        if quantized:
            raise ValueError(f"{quantized[0]}: quantized loading is not supported (weights load in `dtype`)")
        if kwargs:
            log.warning("from_pretrained: ignoring unsupported argument(s) %s", sorted(kwargs))
        path = resolve_checkpoint(pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir,
                                  subfolder=subfolder, hub=hub)
        wanted = dtype if dtype is not None else torch_dtype
        device = _resolve_device(device_map)
        dt = checkpoint_dtype(path) if wanted == "auto" else resolve_dtype(wanted)  # None: float32, as transformers
        cfg = TTSConfig.from_json(path / "config.json")
        defaults = generation_defaults(path / "generation_config.json")  # a bad file fails before any weights load
        files = safetensors_files(path)
        with torch.device("meta"):
            talker = Talker(cfg.talker)
        load_module(talker, read_tensors(files, "talker."), "talker", device, dt, prefix="talker.")
        t = cfg.talker
        talker.rope = RotaryTable(t.head_dim, t.rope_theta, t.max_position_embeddings).to(device)
        cp = t.code_predictor
        talker.code_predictor.rope = RotaryTable(cp.head_dim, cp.rope_theta, cp.num_code_groups + 1).to(device)
        talker.eval()
        # column_major=True makes CPU fp32 batch-1 matrix-vector products ~25% faster but batched (M=8) ones slower;
        # the engine serves batches, so rows stay row-major unless QTTS_COLUMN_MAJOR=1
        prepare_for_inference_(talker, column_major=device.type == "cpu" and dt == torch.float32
                               and os.environ.get("QTTS_COLUMN_MAJOR") == "1")
        tokenizer = TextTokenizer(path)
        tokenizer.check_special_ids(cfg.im_start_token_id, cfg.im_end_token_id, str(path))
        tokenizer.check_ids_below(t.text_vocab_size, path)
        codec = None
        if (path / "speech_tokenizer").is_dir():
            from .codec.load import load_codec

            # the voice-clone encoder's weights are checked where they are used: Base models (else at a first use)
            codec = load_codec(path / "speech_tokenizer", device=device, dtype=torch.float32,
                               encoder=cfg.tts_model_type == "base")
        else:
            log.warning("%s has no speech_tokenizer/: codes only, no audio", path)
        speaker_encoder = None
        if cfg.tts_model_type == "base":
            from .speaker.build import speaker_encoder_from_state
            from .speaker.config import SpeakerEncoderConfig

            speaker_encoder = speaker_encoder_from_state(
                SpeakerEncoderConfig.from_dict(cfg.speaker_encoder), read_tensors(files, "speaker_encoder."),
                device=device, dtype=dt).eval()
        return cls(path, cfg, talker, tokenizer, codec, speaker_encoder, defaults)

    # --- properties -------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.talker.codec_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.talker.codec_head.weight.dtype

    @property
    def tts_model_type(self) -> str:
        return self.cfg.tts_model_type

    @property
    def tts_model_size(self) -> str:
        return self.cfg.tts_model_size

    @property
    def tokenizer_type(self) -> str:
        return self.cfg.tokenizer_type

    def get_supported_speakers(self) -> list[str]:
        """The speaker names (CustomVoice); [] for Base and VoiceDesign checkpoints, as the reference."""
        return sorted(self.cfg.talker.spk_id or [])

    def get_supported_languages(self) -> list[str]:
        return self.cfg.languages

    # --- the long-lived engine ---------------------------------------------------------------------------------
    def configure_engine(self, reference_sampling: bool | None = None, **engine_kwargs: Any) -> None:
        """Options of the engine that generate_* and stream_* share (Engine's arguments: max_sessions, max_len,
        cuda_graphs, batch_buckets, compile, ...). Takes effect at the next call (the engine is rebuilt then, after
        the current one, which must be idle, is let go: never two engines' caches at once). An unknown option or a bad
        value Engine checks before allocating raises here, naming it, and leaves the engine and its options as they
        were."""
        with self._driver_lock:
            if self._in_flight or self._driver is not None and not self._driver.idle():
                raise RuntimeError(f"configure_engine: the engine is busy ({len(self._in_flight)} generate/stream "
                                   "call(s) in flight; a stream holds it until read to its end, closed or dropped)")
            ref = self.reference_sampling if reference_sampling is None else bool(reference_sampling)
            options = {**self.engine_options, **engine_kwargs}
            Engine.check_arguments(**self._engine_options(ref, options))
            self.reference_sampling, self.engine_options, self._driver = ref, options, None

    def _engine_options(self, reference_sampling: bool, options: dict[str, Any]) -> dict[str, Any]:
        """The long-lived engine's arguments: its defaults for this sampling mode, then the configured options."""
        opts: dict[str, Any] = dict(max_sessions=8, max_queue=1 << 16,
                                    sampler="torch" if reference_sampling else "device",
                                    # eager (reference sampling): the cache grows, so allow what the model does;
                                    # graphs: a static cache of 4096 positions per session
                                    max_len=self.cfg.talker.max_position_embeddings if reference_sampling else 4096)
        return {**opts, **options}

    @property
    def engine(self) -> Engine:
        """The one Engine behind generate_* and stream_* (built at first use, kept for the model's life)."""
        return self._engine_driver().engine

    def _engine_driver(self) -> EngineDriver:
        with self._driver_lock:
            if self._driver is None:
                self._driver = EngineDriver(Engine(self, **self._engine_options(self.reference_sampling,
                                                                                self.engine_options)))
            return self._driver

    def _hold_driver(self) -> tuple[EngineDriver, Callable[[], None]]:
        """The driver for one call and its release (idempotent, lock-free): until released, configure_engine
        refuses, so the engine is never dropped under a call that took it (two engines' caches at once)."""
        token = object()
        with self._driver_lock:   # reentrant: _engine_driver takes it too
            driver = self._engine_driver()
            self._in_flight.add(token)
        return driver, functools.partial(self._in_flight.discard, token)

    # --- sampling defaults ------------------------------------------------------------------------------------
    def sampling_params(self, **user: Any) -> SamplingParams:
        """user kwargs win, then generation_config.json, then the reference's hard defaults."""
        unknown = sorted(set(user) - set(HARD_DEFAULTS))
        if unknown:   # a caller's names, echoed bounded (a **{"x" * 10**5: 1} came back whole, twice)
            first = unknown[0]
            raise RequestError(first if len(first) <= ECHO_CHARS else "kwargs",
                               f"unsupported generation argument(s): {shown(unknown)}; "
                               f"supported: {sorted(HARD_DEFAULTS)} and seed")
        merged = {k: (user[k] if user.get(k) is not None else self.generate_defaults.get(k, d))
                  for k, d in HARD_DEFAULTS.items()}
        return SamplingParams(**merged)

    # --- the drop-in generate_* API ---------------------------------------------------------------------------
    def generate_custom_voice(self, text: str | list[str], speaker: str | list[str], language: Any = None,
                              instruct: Any = None, non_streaming_mode: bool = True, seed: Any = None,
                              **kwargs: Any) -> tuple[list[np.ndarray], int]:
        reqs = self._requests("custom_voice", text, language, seed, non_streaming_mode, kwargs,
                              speaker=speaker, instruct=instruct)
        return self._run(reqs), SAMPLE_RATE

    def generate_voice_design(self, text: str | list[str], instruct: str | list[str], language: Any = None,
                              non_streaming_mode: bool = True, seed: Any = None,
                              **kwargs: Any) -> tuple[list[np.ndarray], int]:
        reqs = self._requests("voice_design", text, language, seed, non_streaming_mode, kwargs, instruct=instruct)
        return self._run(reqs), SAMPLE_RATE

    def generate_voice_clone(self, text: str | list[str], language: Any = None, ref_audio: Any = None,
                             ref_text: Any = None, x_vector_only_mode: Any = False,
                             voice_clone_prompt: Any = None, non_streaming_mode: bool = False, seed: Any = None,
                             **kwargs: Any) -> tuple[list[np.ndarray], int]:
        reqs = self._clone_requests(text, language, ref_audio, ref_text, x_vector_only_mode, voice_clone_prompt,
                                    seed, non_streaming_mode, kwargs)
        return self._run(reqs), SAMPLE_RATE

    def create_voice_clone_prompt(self, ref_audio: Any, ref_text: Any = None, x_vector_only_mode: Any = False,
                                  allow_urls: bool = True) -> list[VoiceClonePromptItem]:
        from .voice_clone import create_voice_clone_prompt

        return create_voice_clone_prompt(self, ref_audio, ref_text, x_vector_only_mode, allow_urls=allow_urls)

    # --- streaming --------------------------------------------------------------------------------------------
    def stream_custom_voice(self, text: str, speaker: str, language: str | None = None, instruct: str | None = None,
                            non_streaming_mode: bool = True, seed: int | None = None, first_chunk_frames: int = 1,
                            chunk_frames: int = 4, **kwargs: Any) -> Iterator[np.ndarray]:
        (req,) = self._requests("custom_voice", text, language, seed, non_streaming_mode, kwargs,
                                speaker=speaker, instruct=instruct, single=True)
        return self._stream(req, first_chunk_frames, chunk_frames)

    def stream_voice_design(self, text: str, instruct: str, language: str | None = None,
                            non_streaming_mode: bool = True, seed: int | None = None, first_chunk_frames: int = 1,
                            chunk_frames: int = 4, **kwargs: Any) -> Iterator[np.ndarray]:
        (req,) = self._requests("voice_design", text, language, seed, non_streaming_mode, kwargs,
                                instruct=instruct, single=True)
        return self._stream(req, first_chunk_frames, chunk_frames)

    def stream_voice_clone(self, text: str, language: str | None = None, ref_audio: Any = None,
                           ref_text: str | None = None, x_vector_only_mode: bool = False,
                           voice_clone_prompt: Any = None, non_streaming_mode: bool = False,
                           seed: int | None = None, first_chunk_frames: int = 1, chunk_frames: int = 4,
                           **kwargs: Any) -> Iterator[np.ndarray]:
        (req,) = self._clone_requests(text, language, ref_audio, ref_text, x_vector_only_mode, voice_clone_prompt,
                                      seed, non_streaming_mode, kwargs, single=True)
        return self._stream(req, first_chunk_frames, chunk_frames)

    def _stream(self, req: SynthesisRequest, first_chunk_frames: int, chunk_frames: int) -> Iterator[np.ndarray]:
        if self.codec is None:
            raise ValueError("this checkpoint has no speech_tokenizer/: cannot stream audio")
        req.first_chunk_frames, req.chunk_frames, req.decode_audio = first_chunk_frames, chunk_frames, True
        driver, release = self._hold_driver()
        try:
            session = driver.open(req)
        except BaseException:
            release()
            raise

        def pcm(chunks: Iterator[AudioChunk]) -> Iterator[np.ndarray]:
            for ch in chunks:
                if ch.finish_reason == "error":
                    raise _session_error(ch.error, ch.error_field)
                if ch.pcm.size:
                    yield ch.pcm
        # closed or dropped before its end (read or not): its session must not run on others' steps
        return driver.chunks(session, through=pcm, on_end=release)

    # --- internals --------------------------------------------------------------------------------------------
    def _clone_requests(self, text, language, ref_audio, ref_text, x_vector_only_mode, voice_clone_prompt, seed,
                        non_streaming_mode, gen_kwargs, single: bool = False) -> list[SynthesisRequest]:
        """Voice-clone requests: the cheap checks (model type, text, language, seed, generation arguments) before the
        reference audio is fetched, decoded and encoded (seconds of work), as the reference refuses a language first."""
        if self.tts_model_type != "base":
            raise ValueError(f"generate_voice_clone needs a Base checkpoint; this one is {self.tts_model_type!r}")
        reqs = self._requests("voice_clone", text, language, seed, non_streaming_mode, gen_kwargs, single=single)
        items = self._voice_items(text, ref_audio, ref_text, x_vector_only_mode, voice_clone_prompt)
        for r, item in zip(reqs, items):
            r.voice_clone_prompt = item
        return reqs

    def _voice_items(self, text, ref_audio, ref_text, x_vector_only_mode, voice_clone_prompt):
        n = len(text) if isinstance(text, list) else 1
        if voice_clone_prompt is None:
            if ref_audio is None:
                raise RequestError("ref_audio", "either voice_clone_prompt or ref_audio must be provided")
            _as_list(ref_audio, n, "ref_audio")   # one per text (or one for all), before any is decoded
            voice_clone_prompt = self.create_voice_clone_prompt(ref_audio, ref_text, x_vector_only_mode)
        return _as_list(prompt_items(voice_clone_prompt), n, "voice_clone_prompt")

    def _requests(self, kind: str, text, language, seed, non_streaming_mode, gen_kwargs, speaker=None,
                  instruct=None, voice_clone_prompt=None, single: bool = False) -> list[SynthesisRequest]:
        if single and isinstance(text, list):
            raise RequestError("text", "streaming takes one text (str); use generate_* for batches")
        texts = text if isinstance(text, list) else [text]
        if not texts:
            raise RequestError("text", "must not be empty")
        for t in texts:
            check_text(t)
        n = len(texts)
        langs = _as_list(language if language is not None else "auto", n, "language")
        for lang in langs:
            check_language(self, lang)   # here, before any voice prompt is made (validate checks it again)
        if kind == "custom_voice" and not instruct_supported(self.cfg.tts_model_size) and instruct is not None:
            log.warning(INSTRUCT_DROPPED)   # before any check of it, as the reference drops it
            instruct = None
        seeds = _as_list(seed, n, "seed") if isinstance(seed, list) else \
            [None if seed is None else check_seed(seed) + i for i in range(n)]  # 1.9 or "5" is no seed
        speakers = _as_list(speaker, n, "speaker")
        instructs = _as_list(instruct, n, "instruct")
        prompts = voice_clone_prompt or [None] * n
        sampling = self.sampling_params(**gen_kwargs)
        return [SynthesisRequest(kind=kind, text=texts[i], speaker=speakers[i], language=langs[i],
                                 instruct=None if isinstance(instructs[i], str) and not instructs[i] else instructs[i],
                                 voice_clone_prompt=prompts[i], non_streaming_mode=_switch(non_streaming_mode),
                                 sampling=sampling, seed=seeds[i],
                                 decode_audio=False)
                for i in range(n)]

    def _run(self, reqs: list[SynthesisRequest]) -> list[np.ndarray]:
        if self.codec is None:  # before generating, not after
            raise ValueError("this checkpoint has no speech_tokenizer/: cannot decode audio")
        driver, release = self._hold_driver()
        try:
            sessions = driver.run(reqs)
        finally:
            release()
        for s in sessions:
            if s.finish_reason == "error":
                raise _session_error(s.error, s.error_field)
        return self.decode_codes([s.codes() for s in sessions],
                                 [None if r.voice_clone_prompt is None else r.voice_clone_prompt.ref_code
                                  for r in reqs])  # as the reference: any prompt's codes, x-vector ones too

    def decode_codes(self, codes: list[torch.Tensor], ref_codes: list[torch.Tensor | None] | None = None,
                     ) -> list[np.ndarray]:
        """Codes [T, 16] per item -> waveforms; ICL reference codes are decoded as context and cut as the
        reference does. Up to 300 frames this is the exact causal decode; beyond, see `exact_decode`."""
        if self.codec is None:
            raise ValueError("this checkpoint has no speech_tokenizer/: cannot decode audio")
        ref_codes = ref_codes or [None] * len(codes)
        full = [c if r is None else torch.cat([r.to(c.device).long(), c]) for c, r in zip(codes, ref_codes)]
        if max((len(f) for f in full), default=0) <= REFERENCE_DECODE_CHUNK or self.exact_decode:
            wavs = self.codec.decode(full)
        else:  # beyond 300 frames the reference re-decodes pieces with 25 frames of context: do the same
            with torch.inference_mode():
                wavs = [self.codec.decoder.decode_like_reference(f.T[None].to(self.codec.device).long())[0]
                        .float().cpu().numpy() for f in full]
        out = []
        for w, r, f in zip(wavs, ref_codes, full):
            if r is not None:
                cut = int(r.shape[0] / max(f.shape[0], 1) * w.shape[0])
                w = w[cut:]
            out.append(np.asarray(w, dtype=np.float32))
        return out
