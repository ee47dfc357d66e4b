"""The engine: continuous batching of many synthesis sessions in one process.

    engine = Engine(model, max_sessions=8)
    s = engine.add(SynthesisRequest(...))      # thread-safe; RequestError on bad input, EngineBusy when full
    while engine.has_work():
        engine.wait_for_work(1.0)              # blocks while nothing can advance (sessions waiting for text)
        for chunk in engine.step(): ...        # AudioChunk per session as soon as its frames decode

Each `step()`:
  1) applies cancellations and newly arrived text;
  2) admits queued sessions into free slots (interactive before bulk), prefills their prompts and draws their first
     codebook-0 id on the device; keeps the occupied slots dense (a session may move down to a freed slot);
  3) runs the code predictor (15 codebooks) for every session with a pending id, then ONE talker step for every
     session whose text is ready: rows = slots, per-row state on the device (runner.py), one read of the new ids;
  4) ends sessions (EOS, max_new_tokens, max_len, runaway guard, cancel, error), freeing their slots;
  5) decodes audio: one batched codec call for every session with a chunk due (audio_stream.BatchedAudio); without
     CUDA graphs that call runs between 3)'s code predictor and talker step, so a chunk (the first one too) is out
     one talker step sooner (`step(emit=...)` hands it over then), and the last chunks of sessions that the talker
     step ended get a second call at the end. With graphs it runs at the end of the step (one read a step), except
     in a step where a session's first chunk is due: then it runs in between too.
Every session added ends with exactly one `is_last` AudioChunk, whatever happens. No I/O, no asyncio: serving
layers run `step()` in a loop thread. GPU: the step bodies and short prompts' prefills are CUDA graphs captured when
the engine is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import numbers
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..checkpoint.weights import resolve_dtype
from ..codec.context import codes_key
from ..cpu_alloc import keep_freed_memory
from ..errors import RequestError
from ..model.layers import packed_linears
from ..text.prompt import extend_prompt
from ..types import SAMPLES_PER_FRAME, AudioChunk, SamplingParams, SynthesisRequest
from .audio_stream import BatchedAudio
from .compiled import check_compile
from .graphs import GraphCapture
from .requests import check_positions, make_prompt, validate
from .runner import Start, StepRunner, packs_linears
from .session import Session
from .text_feed import IncrementalText

log = logging.getLogger(__name__)



def host_memory_available(root: str = "/") -> int | None:
    """Bytes of host memory available to new allocations: Linux's MemAvailable, or less where this process's cgroup
    (a container, a Kubernetes pod) has a memory limit (its limit less its working set: usage without inactive file
    pages, as the kubelet counts); None where neither is known."""
    def read(path: str) -> str | None:
        try:
            with open(os.path.join(root, path), encoding="ascii") as f:
                return f.read()
        except OSError:
            return None

    def stat_value(text: str | None, key: str) -> int:
        for line in (text or "").splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
        return 0

    known = []
    meminfo = read("proc/meminfo")
    for line in (meminfo or "").splitlines():
        if line.startswith("MemAvailable:") and line.split()[1:2] and line.split()[1].isdigit():
            known.append(int(line.split()[1]) * 1024)
    for limit_f, usage_f, stat_f, inactive in (
            ("sys/fs/cgroup/memory.max", "sys/fs/cgroup/memory.current", "sys/fs/cgroup/memory.stat",
             "inactive_file"),
            ("sys/fs/cgroup/memory/memory.limit_in_bytes", "sys/fs/cgroup/memory/memory.usage_in_bytes",
             "sys/fs/cgroup/memory/memory.stat", "total_inactive_file")):
        limit, usage = (read(limit_f) or "").strip(), (read(usage_f) or "").strip()
        if limit.isdigit() and usage.isdigit() and int(limit) < 1 << 60:   # "max" / a huge number: no limit
            working = max(0, int(usage) - stat_value(read(stat_f), inactive))
            known.append(max(0, int(limit) - working))
            break
    return min(known) if known else None

class EngineBusy(RuntimeError):
    """The engine's queue is full; retry later."""


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool | np.bool_)


def _check_arguments(max_sessions, max_queue, max_len, interactive_reserve, guard_base_frames, guard_frames_per_token,
                     sampler, compile=False, cuda_graphs=None) -> None:
    """The Engine's value checks (ValueError naming the argument), made before anything is allocated."""
    for name, v, lo in (("max_sessions", max_sessions, 1), ("max_queue", max_queue, 1), ("max_len", max_len, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if not _is_int(interactive_reserve) or not 0 <= interactive_reserve < max_sessions:
        raise ValueError(f"interactive_reserve must be an integer in [0, max_sessions), got {interactive_reserve!r}")
    if not _is_int(guard_base_frames) or guard_base_frames < 0:
        raise ValueError(f"guard_base_frames must be an integer >= 0, got {guard_base_frames!r}")
    if guard_frames_per_token is not None and (
            isinstance(guard_frames_per_token, bool | np.bool_) or not isinstance(guard_frames_per_token, numbers.Real)
            or not math.isfinite(guard_frames_per_token) or guard_frames_per_token <= 0):
        raise ValueError(f"guard_frames_per_token must be None or a finite number > 0, got {guard_frames_per_token!r}")
    if sampler not in ("device", "torch"):
        raise ValueError(f"sampler must be 'device' or 'torch', got {sampler!r}")
    check_compile(compile, sampler, cuda_graphs)


class Engine:
    @classmethod
    def check_arguments(cls, **kwargs) -> None:
        """Check Engine arguments without building one (nothing allocated, no graphs): TypeError naming an unknown
        argument, ValueError naming a bad value of those checked before allocation; what only a build can tell (the
        device, memory) still shows when one is built."""
        bound = inspect.signature(cls.__init__).bind(None, None, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        _check_arguments(a["max_sessions"], a["max_queue"], a["max_len"], a["interactive_reserve"],
                         a["guard_base_frames"], a["guard_frames_per_token"], a["sampler"], a["compile"],
                         a["cuda_graphs"])

    def __init__(self, model, max_sessions: int = 8, max_queue: int = 64,
                 guard_frames_per_token: float | None = None, guard_base_frames: int = 64,
                 initial_cache_len: int = 256, static: bool | None = None, max_len: int = 4096,
                 cuda_graphs: bool | None = None, batch_buckets: tuple[int, ...] | list[int] | None = None,
                 compile: bool | str = False, sampler: str = "device", interactive_reserve: int = 0,
                 audio_dtype: torch.dtype | str | None = None, graph_capture: GraphCapture | None = None,
                 audio_chunk_frames: Sequence[int] = ()) -> None:
        """max_sessions: sessions decoded together (slots); max_queue: sessions waiting for a slot before EngineBusy
        (>= 1: every added session waits in the queue until the next step admits it, free slots or not).
        max_len: positions per session (prompt + generated frames); a session that reaches it ends with
        finish_reason "max_new_tokens". cuda_graphs: capture the step bodies in CUDA graphs at construction (default:
        on for a CUDA model with the device sampler; True on a CPU model is an error). batch_buckets: the batch
        sizes graphs are captured for (default 1, 2, 4, ... up to max_sessions). compile: torch.compile, True for
        what suits the model: "step" on a CPU with the device sampler and no graphs (the whole talker step and the
        whole code-predictor pass become one graph each, compiled while the engine is built: minutes on a few
        cores; the random 0.6B 0.96-1.04x (fp32) / 1.14x (bf16) a frame, the same codes in fp32;
        generate/compiled.py), "ops" elsewhere
        (the layers' elementwise pieces, residual add + RMSNorm, q/k norm + RoPE, SiLU x up, and the sampler, about
        one kernel each on a GPU; model/fused.py; compiled at capture). Either falls back to the eager code when
        compiling fails (logged). static: a KV cache of max_len allocated up front, and prompts of up to 256 positions
        prefilled in the graphs' (rows, length) buckets (default: with graphs; otherwise the cache grows as sessions
        need and prompts prefill at their own lengths). sampler: "device" (counter-based RNG per (seed, frame,
        codebook): the same draws alone or batched, eager or graphs; on CPU without graphs the same codes too, bit
        for bit: single rows run as two through oneDNN where its one-row kernel differs, the decode attention is
        grouped and prompts are not padded; under graphs the same codes as a static eager engine) or "torch"
        (torch's generators in the reference's draw order: exact seeded
        parity with the official package; eager only).
        interactive_reserve: slots that bulk sessions never take, so interactive requests find room at once.
        audio_dtype: the streaming audio decoder's compute dtype (default: the codec's, fp32, which matches the
        offline decode within 1e-4; "bfloat16" decodes ~2-3x faster on CPU and GPU at bf16 precision: a row's samples
        then also depend on the rows decoded with it, by about as much as bf16 moves them from fp32).
        graph_capture: inject the graph backend (e.g. `GraphCapture(device, fake=True)`, the CPU stand-in).
        audio_chunk_frames: the chunk sizes (frames) requests will use, e.g. a service's first_chunk_frames and
        chunk_frames: with graphs, audio decodes of these sizes are captured too (beside 1, 2, 4 and 8 frames); a
        decode of more frames than any captured size runs eagerly (logged once)."""
        _check_arguments(max_sessions, max_queue, max_len, interactive_reserve, guard_base_frames,
                         guard_frames_per_token, sampler, compile, cuda_graphs)
        for v in audio_chunk_frames:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"audio_chunk_frames must hold integers >= 1, got {v!r}")
        self.interactive_reserve = interactive_reserve
        self.model, self.talker = model, model.talker
        self.max_sessions, self.max_queue = max_sessions, max_queue
        self.guard_frames_per_token, self.guard_base_frames = guard_frames_per_token, guard_base_frames
        self.device = self.talker.codec_head.weight.device
        if self.device.type == "cpu":
            keep_freed_memory()  # a step's large buffers stay mapped for the next step (cpu_alloc)
        self.sampler = sampler
        if cuda_graphs is None:
            cuda_graphs = graph_capture is not None or (self.device.type == "cuda" and sampler == "device")
        if cuda_graphs and sampler != "device":
            raise ValueError("cuda_graphs=True needs sampler='device' (the torch sampler draws on the host)")
        capture = None
        if cuda_graphs:
            capture = graph_capture or GraphCapture(self.device)  # ValueError without CUDA
        self.cuda_graphs = capture is not None
        static = self.cuda_graphs if static is None else bool(static) or self.cuda_graphs
        t = model.cfg.talker
        self.max_len = min(max_len, self.talker.rope.max_positions)
        self.eos_id, self.suppress_from = t.codec_eos_token_id, t.vocab_size - 1024
        if static:
            self._check_memory(self.max_len)
        with torch.inference_mode(), packed_linears(packs_linears(self.talker, sampler)):
            # the pad fed once a session's text is used up: the prompts' own (`build_prompt`'s row of the [bos, eos,
            # pad] projection, as the reference computes it), under the prompts' linears (`text_projection`)
            cfg = model.cfg
            pad = self.talker.embed_text(torch.tensor([cfg.tts_bos_token_id, cfg.tts_eos_token_id,
                                                       cfg.tts_pad_token_id], device=self.device))[2]
        with torch.inference_mode():
            self.runner = StepRunner(self.talker, max_sessions, self.max_len, tts_pad=pad, eos_id=self.eos_id,
                                     suppress_from=self.suppress_from, static=static, capture=capture,
                                     buckets=batch_buckets, sampler=sampler, compile=compile,
                                     initial_len=initial_cache_len)
        self.sdpa = self.runner.choose_decode_layout()
        if audio_dtype is not None:
            audio_dtype = resolve_dtype(audio_dtype, "audio_dtype")
        self._capture = capture
        self._audio_rows: dict[int, Session] = {}   # session id -> session with an open audio row
        self.free_slots = list(range(max_sessions))
        self.queues: dict[str, deque[Session]] = {"interactive": deque(), "bulk": deque()}
        self.active: list[Session] = []
        self._lock = threading.Lock()
        self._undelivered: list[AudioChunk] = []  # an interrupted step's chunks with no emit: the next step's first
        self._live: dict[int, Session] = {}  # every session added whose last chunk is still to be made
        self._work = threading.Condition(self._lock)  # add/cancel/text wake wait_for_work
        self.steps = 0
        self.capture_s = 0.0
        if capture is not None:
            t0 = time.perf_counter()
            self.runner.capture_all()
            self.capture_s = time.perf_counter() - t0
        self.compile_s = self.runner.compile_all()
        self.audio = self._audio_decoder(model.codec, max_sessions, audio_dtype, audio_chunk_frames) \
            if model.codec is not None else None
        self.audio_graphs = self.audio is not None and bool(self.audio.bank.graphs)

    def _audio_decoder(self, codec, max_sessions: int, audio_dtype, chunk_frames: Sequence[int]) -> BatchedAudio:
        """The batched audio decoder. With graphs, every (rows, frames) bucket of it is captured now, in the engine's
        pool, after the step graphs; when that capture fails the decoder runs eagerly (logged): codes stay on graphs
        and audio stays exact, only slower."""
        if self._capture is None:
            return BatchedAudio(codec, max_sessions, dtype=audio_dtype)
        try:
            audio = BatchedAudio(codec, max_sessions, dtype=audio_dtype, capture=self._capture,
                                 row_buckets=self.runner.batch_buckets,
                                 frame_buckets=sorted({*BatchedAudio.FRAME_BUCKETS, *chunk_frames}))
        except Exception:  # noqa: BLE001 - any capture failure: fall back to the eager decoder
            log.warning("capturing the audio decoder in CUDA graphs failed; it runs eagerly", exc_info=True)
            return BatchedAudio(codec, max_sessions, dtype=audio_dtype)
        self.capture_s += audio.capture_s
        return audio

    def _check_memory(self, max_len: int) -> None:
        t = self.model.cfg.talker
        elt = self.talker.codec_head.weight.element_size()
        need = (2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim + t.hidden_size) * \
            self.max_sessions * max_len * elt
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
        else:  # host memory: the cache's pages are touched as sessions grow, so too big a cache is an OOM kill later
            free = host_memory_available()
            if free is None:
                return
        if need > 0.9 * free:
            raise ValueError(f"max_sessions={self.max_sessions} x max_len={max_len} needs {need / 2**30:.1f} GiB of "
                             f"cache on {self.device}, {free / 2**30:.1f} GiB free: lower max_sessions or max_len")

    # --- caller side (thread-safe) ----------------------------------------------------------------------------
    def add(self, req: SynthesisRequest) -> Session:
        req = _own_copy(req)
        validate(self.model, req)
        req, ref_key = self._on_device(req)
        s = Session(request=req, ref_key=ref_key)
        if req.text is None:
            s.incremental = IncrementalText.of(self.model.tokenizer)
        else:  # here, on the caller's thread: a long text would otherwise stall every session's steps
            s.target = self.model.tokenizer.target(req.text)
        if self.sampler == "torch":
            if req.seed is not None:
                s.generator = torch.Generator(device=self.device).manual_seed(int(req.seed))
            s.seed = 0 if req.seed is None else int(req.seed)
        else:  # an unseeded request takes its seed from torch's global generator (torch.manual_seed applies)
            s.seed = int(req.seed) if req.seed is not None else int(torch.randint(0, 2**62, ()))
        s._notify = self._notify
        with self._lock:
            if self.num_queued >= self.max_queue:
                raise EngineBusy(f"engine busy: {self.num_queued} requests queued (max_queue={self.max_queue})")
            self.queues[req.priority].append(s)
            self._live[s.id] = s
            self._work.notify_all()
        return s

    def _on_device(self, req: SynthesisRequest) -> tuple[SynthesisRequest, tuple | None]:
        """Everything a (validated) request brings (a stored voice: speaker vector, reference codes) copied to the
        model's device and dtype, once, here, with the reference codes' context-cache key (read on the host). The
        session owns these copies: it shared the caller's tensors (`.to()` on their device copies nothing), so a
        caller that reused its buffer after `add` changed the session's voice, and the decoder state of the new
        codes was cached under the key of the old ones, for every later session of that voice, anyone's."""
        vp = req.voice_clone_prompt
        code = getattr(vp, "ref_code", None)
        if vp is None or not dataclasses.is_dataclass(vp):
            return req, None if code is None else codes_key(code)
        moved, key = {}, None
        if getattr(vp, "ref_spk_embedding", None) is not None:
            moved["ref_spk_embedding"] = vp.ref_spk_embedding.detach().to(
                self.device, self.talker.codec_head.weight.dtype, copy=True)
        if code is not None:
            host = code.detach().to("cpu", torch.long, copy=True)
            key = codes_key(host)
            moved["ref_code"] = host.to(self.device)
        return dataclasses.replace(req, voice_clone_prompt=dataclasses.replace(vp, **moved)), key

    def cancel(self, session: Session) -> None:
        """Stop a session at the next step and free its slot; cancelling twice (or a finished one) is a no-op."""
        session.cancelled = True
        self._notify()

    def probe_device(self) -> None:
        """One tiny op on the engine's device, read back: raises when the device cannot compute any more (on CUDA, a
        sticky error after a device-side assert or an illegal access fails every later call, steps included). Safe
        from another thread; on a GPU it waits at most for the step in flight."""
        x = torch.ones(1, device=self.device)
        got = (x + x).item()
        if got != 2.0:
            raise RuntimeError(f"{self.device} computed 1 + 1 = {got}")

    def _notify(self) -> None:
        with self._lock:
            self._work.notify_all()

    def wait_for_work(self, timeout_s: float) -> bool:
        """Block (on a condition, no polling) until `step()` can advance something now, or until `timeout_s`;
        `add`, `cancel`, `append_text` and `end_text` wake it. Returns whether there is work. A session that waits
        for text costs nothing here. Call it from the thread that calls `step()`."""
        with self._work:
            return self._work.wait_for(self._runnable_locked, timeout=max(0.0, timeout_s))

    def runnable(self) -> bool:
        """Whether `step()` would advance something now (an admissible queued session, an active session that can
        run or has news, a cancellation to deliver)."""
        with self._lock:
            return self._runnable_locked()

    def _runnable_locked(self) -> bool:
        if self._undelivered:
            return True
        for s in list(self.active):
            if s.cancelled or s.phase == "frame" or s.has_pending_text() or (
                    s.phase == "talker" and self._text_ready(s)):
                return True
        free = len(self.free_slots)
        for prio, q in self.queues.items():
            for s in q:
                if s.cancelled:
                    return True
                if free == 0 or (prio == "bulk" and free <= self.interactive_reserve):
                    continue
                if s.has_pending_text() or not self._waits_for_text(s):
                    return True
        return False

    @staticmethod
    def _waits_for_text(s: Session) -> bool:
        """A queued incremental session with nothing to start on yet: no token committed, or its text so far blank
        (started on blank text that then ended, it spoke to max_new_tokens; a whole blank text is refused). The one
        rule of both admission (`_pop_ready`) and `runnable` (which disagreed: the loop spun without waiting)."""
        inc = s.incremental
        return inc is not None and not (inc.ended or s.cancelled) and (not s.committed_ids or inc.blank)

    @property
    def num_queued(self) -> int:
        return sum(len(q) for q in self.queues.values())

    @property
    def num_active(self) -> int:
        return len(self.active)

    def has_work(self) -> bool:
        return bool(self.active) or self.num_queued > 0 or bool(self._undelivered)

    # --- the loop ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, emit: Callable[[list[AudioChunk]], None] | None = None) -> list[AudioChunk]:
        """Advance every session by at most one frame; returns the audio chunks (and last chunks) that are ready.
        Never raises for a failure inside a step: the sessions it touched end with an error chunk instead (an
        interrupt, e.g. KeyboardInterrupt, fails them too, hands their chunks to `emit`, and is raised again; with no
        `emit`, the next step() returns them first, and has_work() is true until it has).

        emit: called in this thread with chunks that are ready before the step ends; those are not returned again.
        Without CUDA graphs a chunk due after the code predictor is decoded before the talker step runs, so with
        `emit` it leaves one talker step sooner (first audio included); with graphs, a step where a first chunk is
        due does the same."""
        out, self._undelivered = self._undelivered, []
        try:
            self._step(out, emit)
        except BaseException as e:  # fail what was running, keep the engine usable
            # an interrupt (KeyboardInterrupt in the thread stepping) too: a step left midway (a frame drawn on the
            # device, not taken by its sessions) would go on with wrong codes, silently
            if isinstance(e, Exception):
                log.exception("engine step failed; failing its active sessions")
            for s in list(self.active) + list(self._audio_rows.values()):
                self._fail(s, e, out)
            self._close_lost(e, out)
            if not isinstance(e, Exception):
                self.steps += 1
                if emit is not None and out:  # the sessions' last chunks, where the caller takes them
                    emit(list(out))
                else:  # no emit: they would be lost with the raise, so the next step() returns them first
                    self._undelivered = out
                raise
        self.steps += 1
        return out

    def _step(self, out: list[AudioChunk], emit: Callable[[list[AudioChunk]], None] | None) -> None:
        for s in list(self.active):
            if s.cancelled:
                self._finish(s, "cancelled", out)
            elif s.incremental is not None:
                try:
                    self._absorb_text(s)
                except Exception as e:  # noqa: BLE001 - this session's text, not the engine
                    self._fail(s, e, out)
        self._drop_cancelled_queued(out)
        self._admit(out)
        self._compact()
        cp = [s for s in self.active if s.phase == "frame"]
        tk = [s for s in self.active if s.phase in ("frame", "talker") and self._text_ready(s)]
        if cp or tk:
            self._advance(cp, tk, out, emit)
        self._decode_audio(out)  # with graphs: every chunk due; eager: the last chunks of sessions the talker ended

    def _advance(self, cp: list[Session], tk: list[Session], out: list[AudioChunk],
                 emit: Callable[[list[AudioChunk]], None] | None) -> None:
        r = self.runner
        if self.sampler == "torch":
            cp_s, tk_s = sorted(cp, key=lambda s: s.slot), sorted(tk, key=lambda s: s.slot)
            r.torch_rows = {k: ([s.slot for s in v], [s.request.sampling for s in v], [s.generator for s in v])
                            for k, v in (("cp", cp_s), ("talker", tk_s))}

        def frames_ready(rows: np.ndarray) -> None:  # eager: decode what is due before the talker step
            self._take_frames(cp, rows, out)
            self._decode_audio(out)
            if emit is not None and out:
                ready = list(out)
                out.clear()  # handed over before the call: an emit that raises must not get them returned again
                emit(ready)

        # with graphs the step stays one replay after another and one read (the talker step is a few ms there),
        # except in a step that completes a session's FIRST chunk: time to first audio is worth a read more
        early = self.audio is not None and bool(self._audio_rows) and (
            self._capture is None or any(self.audio.first_due_after(s.id) for s in cp if s.id in self._audio_rows))
        rows = r.step([s.slot for s in cp], [s.slot for s in tk], max((s.pos for s in tk), default=0),
                      between=frames_ready if early and cp else None,
                      write_pos=max(s.pos for s in self.active))  # rows 0..n-1 after _compact: every active one
        if not (early and cp):
            self._take_frames(cp, rows, out)
        # the talker rows' next ids
        for s in tk:
            if s.done:
                continue
            s.pos += 1
            s.text_step += 1
            s.num_ids += 1
            self._take_id(s, int(rows[s.slot, -1]), out)

    def _take_frames(self, cp: list[Session], rows: np.ndarray, out: list[AudioChunk]) -> None:
        """The code-predictor rows' frames (the first one also reveals the id drawn at prefill) -> sessions, audio."""
        framed: list[Session] = []
        for s in cp:
            codes = rows[s.slot, :-1].copy()  # not a view: it would keep every slot's row of this step alive
            if s.first_id_unread:
                s.first_id_unread = False
                s.history.append(int(codes[0]))
                if codes[0] == self.eos_id:
                    self._finish(s, "eos", out)
                    continue
            s.frames.append(codes)
            s.phase = "talker"
            framed.append(s)
        pushed = [s for s in framed if s.id in self._audio_rows]
        if pushed:
            self.audio.push([s.id for s in pushed], self.runner.frame_codes([s.slot for s in pushed]))
        for s in framed:
            if s.max_frames is not None and len(s.frames) >= s.max_frames:
                self._finish(s, "guard", out)

    def run_all(self, requests: list[SynthesisRequest]) -> list[Session]:
        """Run requests to completion (bulk path); returns their finished sessions in order."""
        sessions = [self.add(r) for r in requests]
        while not all(s.done for s in sessions):
            self.step()
        return sessions

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Pay the first-call costs before traffic, for every model type and with no request: graphs (already
        captured at construction), a prefill, a few steps in a free slot, and an audio decode. Returns seconds."""
        if self.active or self.num_queued:
            raise RuntimeError("warm_up() is for an idle engine")
        t0 = time.perf_counter()
        r = self.runner
        r.capture_all()
        r.torch_rows = {"cp": ([], [], []), "talker": ([], [], [])}
        greedy = SamplingParams(do_sample=False, subtalker_dosample=False, max_new_tokens=4)  # draws nothing
        # a prompt and two steps within max_len (a static cache has no more), leaving the slot's position below it as
        # a session's is (a free row of a batch writes a masked key there)
        T = max(1, min(16, self.max_len - 3))
        r.start(0, r.tts_pad.expand(T, -1), [], greedy, seed=0)
        for pos in range(T, min(T + 2, self.max_len - 1)):
            r.step([0], [0], pos)
        if self.audio is not None:
            key = -1
            self.audio.open(key, 1, 2)
            self.audio.push([key], torch.zeros(1, r.last_codes.shape[1], dtype=torch.long, device=self.device))
            self.audio.decode()
            self.audio.finish(key)
            self.audio.decode()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    # --- internals --------------------------------------------------------------------------------------------
    def _admit(self, out: list[AudioChunk]) -> None:
        """Start queued sessions in the free slots; those starting together share batched prefills."""
        starting: list[Session] = []
        while self.free_slots:
            with self._lock:
                s, text_error = self._pop_ready()
            if s is None:
                break
            if s.cancelled:  # cancelled by another thread since this step dropped the cancelled ones
                self._finish(s, "cancelled", out)
                continue
            if text_error is not None:  # its text was refused while it waited: it fails alone, not the step
                self._fail(s, text_error, out)
                continue
            slot = self.free_slots.pop(0)
            try:
                self._prepare(s, slot)
                starting.append(s)
            except BaseException as e:  # a bad request must not take the engine down
                # an interrupt too: `s` is in no queue and maybe not active yet, where step() would not find it
                self._start_failed(s, slot, e, out)
                if not isinstance(e, Exception):
                    raise
        for group in self.runner.prefill_groups([s.prompt.prefill.shape[0] for s in starting]):
            for batch in self._prefill([starting[i] for i in group], out):
                for s in batch:
                    try:
                        self._started(s, out)
                    except Exception as e:  # noqa: BLE001
                        self._start_failed(s, s.slot, e, out)

    def _prefill(self, batch: list[Session], out: list[AudioChunk]) -> list[list[Session]]:
        """Prefill `batch` together; when that fails, each session alone, so only the one at fault fails (a
        request must never fail the others it shares a prefill with). Returns the batches that started."""
        try:
            self.runner.start_many([Start(s.slot, s.prompt.prefill, s.prompt.trailing, s.request.sampling,
                                          s.seed, s.generator) for s in batch])
            return [batch]
        except Exception as e:  # noqa: BLE001 - the engine goes on
            if len(batch) > 1:
                log.warning("prefill of sessions %s failed (%s); prefilling them one by one",
                            [s.id for s in batch], e)
                return [b for s in batch for b in self._prefill([s], out)]
            log.exception("prefill of session %d failed", batch[0].id)
            self._fail(batch[0], e, out)
            return []

    def _start_failed(self, s: Session, slot: int, e: BaseException, out: list[AudioChunk]) -> None:
        if not isinstance(e, RequestError):
            log.exception("session %d failed to start", s.id)
        if s not in self.active and slot not in self.free_slots:
            self.free_slots.append(slot)
            self.free_slots.sort()
        self._fail(s, e, out)

    def _pop_ready(self) -> tuple[Session | None, Exception | None]:
        """The next queued session that can start, with the error its text raised while it waited (or None)."""
        queues = [self.queues["interactive"]]
        if len(self.free_slots) > self.interactive_reserve:
            queues.append(self.queues["bulk"])
        for q in queues:
            for s in list(q):
                if s.incremental is not None:
                    try:
                        self._collect_text(s)
                    except Exception as e:  # noqa: BLE001 - this session's text, not the engine
                        q.remove(s)
                        return s, e
                    if self._waits_for_text(s):
                        continue
                q.remove(s)
                return s, None
        return None, None

    def _drop_cancelled_queued(self, out: list[AudioChunk]) -> None:
        with self._lock:
            dropped = [s for q in self.queues.values() for s in q if s.cancelled]
            for s in dropped:
                self.queues[s.request.priority].remove(s)
        for s in dropped:
            self._finish(s, "cancelled", out)

    def _collect_text(self, s: Session) -> list[int]:
        new: list[int] = []
        for piece in s.take_pending():
            new += s.incremental.end() if piece is None else s.incremental.append(piece)
        s.committed_ids += new
        return new

    def text_projection(self) -> contextlib.AbstractContextManager:
        """What this engine projects text in (prompts at admission, text committed later, the pad): its talker
        steps' linears. With the device sampler on CPU those are oneDNN's packed weights, where a row's bits do not
        depend on how many rows are projected with it (`layers.linear`: from two rows on, one row runs as two where
        its kernel differs, and batches run in pieces where larger ones take another kernel: bf16 with AMX), so a
        text's embeddings are the same bits whole or committed piece by piece (incremental text), and its codes the
        same. Elsewhere, torch's GEMM (the torch sampler: the reference's numbers for a whole text; CUDA): a row may
        get other last bits with another row count, so incremental text equals the whole text to rounding only. bf16 on a CPU that oneDNN cannot run bf16 on (AVX2 only) projects
        one row in bf16 and more in fp32: to rounding there too."""
        return packed_linears(self.runner.packed)

    def _absorb_text(self, s: Session) -> None:
        was_ended = s.incremental.ended
        new = self._collect_text(s)
        if s.prompt is not None and (new or (s.incremental.ended and not was_ended)):
            old = len(s.prompt.trailing)
            with self.text_projection():
                extend_prompt(self.talker, s.prompt, new, end=s.incremental.ended and not was_ended)
            # as at admission (_prepare): text past max_len would never be spoken, so the session fails naming it
            check_positions(s.prompt.prefill.shape[0] + len(s.prompt.trailing), self.max_len)
            self.runner.set_text(s.slot, s.prompt.trailing, old)
            self._set_guard(s)

    def _prepare(self, s: Session, slot: int) -> None:
        """Build the session's prompt (validating what only the prompt shows) and give it `slot`."""
        req = s.request
        if s.incremental is not None:
            if not s.committed_ids or s.incremental.ended and s.incremental.blank:
                raise RequestError("text", "must not be empty")  # blank, as a whole text would be refused
            role, ids, ended = s.incremental.role, list(s.committed_ids), s.incremental.ended
        else:
            role, ids, ended = s.target.role, s.target.text, True
        # max_len bounds the prompt AND the text it will be fed (an ICL transcript trails into generation): what
        # the token ids show is refused before any embedding is made, the built prompt's exact count after
        with self.text_projection():
            s.prompt = make_prompt(self.model, req, role, ids, text_ended=ended, max_len=self.max_len)
        check_positions(s.prompt.prefill.shape[0] + len(s.prompt.trailing), self.max_len)
        s.slot = slot
        self.active.append(s)
        self._set_guard(s)

    def _started(self, s: Session, out: list[AudioChunk]) -> None:
        """The session's prompt is in its slot and its first id drawn."""
        req = s.request
        s.pos, s.text_step, s.num_ids, s.first_id_unread = s.prompt.prefill.shape[0], 0, 1, True
        if req.decode_audio and self.audio is not None:
            vp = req.voice_clone_prompt  # its codes are the decoder's left context whenever it has them (an
            #                              x-vector prompt's too), as the reference decodes them
            self.audio.open(s.id, req.first_chunk_frames, req.chunk_frames,
                            ref_codes=None if vp is None else vp.ref_code, ref_key=s.ref_key)
            self._audio_rows[s.id] = s
        if req.sampling.max_new_tokens <= 1 or s.pos + 1 >= self.max_len:
            self._finish(s, "max_new_tokens", out)  # the id drawn at prefill never gets a frame (as HF)
        else:
            s.phase = "frame"

    def _compact(self) -> None:
        """Keep the occupied slots 0..n-1 so a step's batch is no wider than the sessions in it: the session in the
        highest slot moves down into a freed one (its cache rows and state are copied on the device)."""
        n = len(self.active)
        if not n:
            return
        for s in sorted(self.active, key=lambda x: -x.slot):
            if s.slot < n:
                return
            hole = self.free_slots[0]
            self.runner.move(s.slot, hole, s.pos, len(s.prompt.trailing))  # may raise: the hole stays free
            self.free_slots.pop(0)
            self.free_slots.append(s.slot)
            self.free_slots.sort()
            s.slot = hole

    def _set_guard(self, s: Session) -> None:
        if self.guard_frames_per_token:
            s.max_frames = int(self.guard_base_frames + self.guard_frames_per_token * s.prompt.num_text_tokens)

    def _text_ready(self, s: Session) -> bool:
        p = s.prompt
        return s.text_step < len(p.trailing) or p.text_ended

    def _take_id(self, s: Session, code0: int, out: list[AudioChunk]) -> None:
        s.history.append(code0)
        if code0 == self.eos_id:
            self._finish(s, "eos", out)
        elif s.num_ids >= s.request.sampling.max_new_tokens or s.pos + 1 >= self.max_len:
            self._finish(s, "max_new_tokens", out)  # the last sampled id never gets its frame (as HF)
        else:
            s.phase = "frame"

    def _fail(self, s: Session, e: BaseException, out: list[AudioChunk]) -> None:
        s.error = str(e) or type(e).__name__
        s.error_field = e.field if isinstance(e, RequestError) else None
        if s.phase == "done":  # its last chunk was still to come from the audio decode
            if s.id in self._audio_rows:
                self._end_now(s, "error", out)
            return
        self._finish(s, "error", out)

    def _finish(self, s: Session, reason: str, out: list[AudioChunk]) -> None:
        if s.phase == "done":
            return
        if s.id in self._audio_rows and reason not in ("cancelled", "error"):
            s.phase, s.finish_reason = "done", reason
            self._free_slot(s)
            self.audio.finish(s.id)  # its last chunk is the final decode of this step
            return
        self._end_now(s, reason, out)

    def _free_slot(self, s: Session) -> None:
        if s in self.active:
            self.active.remove(s)
            if s.slot not in self.free_slots:
                self.free_slots.append(s.slot)
                self.free_slots.sort()

    def _end_now(self, s: Session, reason: str, out: list[AudioChunk]) -> None:
        """End `s` with no more audio, whatever state it is in: its slot and audio row given back, its last chunk."""
        s.phase, s.finish_reason = "done", reason
        self._free_slot(s)
        if self._audio_rows.pop(s.id, None) is not None:
            self.audio.drop(s.id)
        out.append(self._last_chunk(s, np.zeros(0, np.float32), s.audio_frames if s.request.decode_audio
                                    else len(s.frames), 0))

    def _close_lost(self, e: BaseException, out: list[AudioChunk]) -> None:
        """After a failed step: end the sessions it caught between the engine's structures (taken out of a queue and
        not started or ended yet, or half ended: an interrupt lands anywhere) with an error chunk, freeing what they
        held, so that every session still gets its one last chunk and no slot is lost."""
        with self._lock:  # add() registers sessions under it
            queued = {s.id for q in self.queues.values() for s in q}
            lost = [s for sid, s in self._live.items() if sid not in queued]
        for s in lost:
            s.error, s.error_field = str(e) or type(e).__name__, None
            self._end_now(s, "error", out)

    def _last_chunk(self, s: Session, pcm: np.ndarray, start: int, frames: int) -> AudioChunk:
        self._live.pop(s.id, None)
        err = s.finish_reason == "error"
        return AudioChunk(s.id, pcm, start, frames, is_last=True, finish_reason=s.finish_reason,
                          error=s.error if err else None, error_field=s.error_field if err else None)

    def _decode_audio(self, out: list[AudioChunk]) -> None:
        if not self._audio_rows:
            return
        try:
            with self._capture.device_context() if self._capture is not None else contextlib.nullcontext():
                decoded = self.audio.decode()
        except Exception as e:  # noqa: BLE001 - every session decoding now fails, visibly
            log.exception("audio decode failed")
            for s in list(self._audio_rows.values()):
                self._fail(s, e, out)
            return
        for a in decoded:
            s = self._audio_rows.get(a.key)
            if s is None:
                continue
            if a.error is not None:  # this session's decode failed alone: it fails, the others go on
                log.error("audio decode of session %d failed: %s: %s", s.id, type(a.error).__name__, a.error)
                self._fail(s, a.error, out)
                continue
            s.audio_frames = a.frame_start + a.num_frames
            if a.final:
                del self._audio_rows[a.key]
                out.append(self._last_chunk(s, a.pcm, a.frame_start, a.num_frames))
            elif a.pcm.size:
                out.append(AudioChunk(s.id, a.pcm, a.frame_start, a.num_frames))


__all__ = ["Engine", "EngineBusy", "SAMPLES_PER_FRAME"]


def _own_copy(req: SynthesisRequest) -> SynthesisRequest:
    """The session's own request and voice prompt objects, taken before validation: a caller may change a request
    (or its prompt) after `add`, or add it again as a template with another priority, text or sampling, and the
    queued or running session must not see that (its queue was looked up by the changed priority on cancel: the
    wrong deque, and every later step failed). SamplingParams is frozen; the prompt's tensors are copied once
    validated (`_on_device`)."""
    if not isinstance(req, SynthesisRequest):
        raise RequestError("request", f"must be a SynthesisRequest, got {type(req).__name__}")
    vp = req.voice_clone_prompt
    if dataclasses.is_dataclass(vp) and not isinstance(vp, type):
        return dataclasses.replace(req, voice_clone_prompt=dataclasses.replace(vp))
    return dataclasses.replace(req)
