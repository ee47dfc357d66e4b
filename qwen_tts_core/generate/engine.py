"""The engine: continuous batching of many synthesis sessions in one process.

    engine = Engine(model, max_sessions=8)
    s = engine.add(SynthesisRequest(...))      # thread-safe; RequestError on bad input, EngineBusy when full
    while engine.has_work():
        for chunk in engine.step(): ...        # AudioChunk per session as soon as its frames decode

Each `step()`:
  1) applies cancellations and newly arrived text;
  2) admits queued sessions into free cache slots (interactive before bulk) and prefills their prompts;
  3) runs ONE batched talker step over every session waiting for its next codebook-0 id (sessions sit at different
     positions: each row has its own slot, position and mask) and samples it;
  4) runs ONE batched code-predictor pass (15 codebooks) over every session with a fresh codebook-0 id;
  5) decodes audio chunks and finishes sessions (EOS, max_new_tokens, runaway guard, cancel), freeing slots.
No I/O, no asyncio: serving layers run `step()` in a loop thread.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

import numpy as np
import torch

from ..errors import RequestError
from ..text.prompt import extend_prompt
from ..types import AudioChunk, SynthesisRequest
from .audio_stream import AudioStreamer
from .fast import FastPath, sampling_tensors
from .requests import make_prompt, validate
from .sampling import pick_rows, talker_logits_processors
from .session import Session
from .step import predict_codes, prefill, talker_step
from .text_feed import IncrementalText

log = logging.getLogger(__name__)


class EngineBusy(RuntimeError):
    """The engine's queue is full; retry later."""


class Engine:
    def __init__(self, model, max_sessions: int = 8, max_queue: int = 64,
                 guard_frames_per_token: float | None = None, guard_base_frames: int = 64,
                 initial_cache_len: int = 256, static: bool | None = None, max_len: int = 4096,
                 cuda_graphs: bool | None = None, interactive_reserve: int = 0) -> None:
        """static: the fixed-shape fast path (default: on CUDA) with a KV cache of max_len positions per session
        and, on CUDA, CUDA graphs per batch bucket; sampling there uses the device generator (per-request
        seeds apply to the dynamic path). interactive_reserve: slots that bulk sessions never take, so interactive
        requests find room at once."""
        if not 0 <= interactive_reserve < max_sessions:
            raise ValueError(f"interactive_reserve must be in [0, max_sessions), got {interactive_reserve}")
        self.interactive_reserve = interactive_reserve
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self.model, self.talker = model, model.talker
        self.max_sessions, self.max_queue = max_sessions, max_queue
        self.guard_frames_per_token, self.guard_base_frames = guard_frames_per_token, guard_base_frames
        self.device = self.talker.codec_head.weight.device
        self.fast = None
        if static if static is not None else self.device.type == "cuda":
            self.fast = FastPath(self.talker, max_sessions, max_len, use_graphs=cuda_graphs)
            self.cache = self.fast.cache
        else:
            self.cache = self.talker.new_cache(max_sessions, initial_cache_len)
        self.free_slots = list(range(max_sessions))
        self.queues: dict[str, deque[Session]] = {"interactive": deque(), "bulk": deque()}
        self.active: list[Session] = []
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # add/cancel/text wake wait_for_work
        t = model.cfg.talker
        self.eos_id, self.suppress_from = t.codec_eos_token_id, t.vocab_size - 1024

    # --- caller side (thread-safe) ----------------------------------------------------------------------------
    def add(self, req: SynthesisRequest) -> Session:
        validate(self.model, req)
        s = Session(request=req)
        if req.text is None:
            tok = self.model.tokenizer
            s.incremental = IncrementalText(tok.text_only, tok.split_offsets, tok.encode)
        if req.seed is not None:
            s.generator = torch.Generator(device=self.device).manual_seed(int(req.seed))
        s._notify = self._notify
        with self._lock:
            if self.num_queued >= self.max_queue:
                raise EngineBusy(f"engine busy: {self.num_queued} requests queued (max_queue={self.max_queue})")
            self.queues[req.priority].append(s)
            self._work.notify_all()
        return s

    def cancel(self, session: Session) -> None:
        """Stop a session at the next step and free its slot; cancelling twice (or a finished one) is a no-op."""
        session.cancelled = True
        self._notify()

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
        for s in self.active:
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
                if s.incremental is None or s.committed_ids or s.has_pending_text():
                    return True
        return False

    @property
    def num_queued(self) -> int:
        return sum(len(q) for q in self.queues.values())

    @property
    def num_active(self) -> int:
        return len(self.active)

    def has_work(self) -> bool:
        return bool(self.active) or self.num_queued > 0

    # --- the loop ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[AudioChunk]:
        """Advance every session by at most one frame; returns the audio chunks (and last chunks) that are ready.
        Never raises for a failure inside a step: the sessions it touched end with an error chunk instead."""
        out: list[AudioChunk] = []
        try:
            self._step(out)
        except Exception as e:  # noqa: BLE001 - fail what was running, keep the engine usable
            log.exception("engine step failed; failing its active sessions")
            for s in list(self.active):
                self._fail(s, e, out)
        return out

    def _step(self, out: list[AudioChunk]) -> None:
        # 1) cancellations and incremental text
        for s in list(self.active):
            if s.cancelled:
                self._finish(s, "cancelled", out)
            elif s.incremental is not None:
                self._absorb_text(s, out)
        self._drop_cancelled_queued(out)
        # 2) admission + prefill
        self._admit(out)
        # 3) one batched talker step
        rows = [s for s in self.active if s.phase == "talker" and self._text_ready(s)]
        if rows:
            embeds = torch.stack([self._next_input(s) for s in rows])
            slots = torch.tensor([s.slot for s in rows], device=self.device)
            pos = torch.tensor([s.pos for s in rows], device=self.device)
            if self.fast is not None:
                hidden, logits = self.fast.talker_step(slots, pos, embeds)
            else:
                self.cache.ensure(int(pos.max()) + 1)
                hidden, logits = talker_step(self.talker, self.cache, slots, pos, embeds)
            ids = self._sample_code0(rows, logits)
            for i, s in enumerate(rows):
                s.pos += 1
                s.hidden = hidden[i]
                self._take_code0(s, int(ids[i]), out)
        # 4) one batched code-predictor pass
        rows = [s for s in self.active if s.phase == "frame"]
        if rows:
            hidden = torch.stack([s.hidden for s in rows])
            code0 = torch.tensor([s.code0 for s in rows], device=self.device)
            if self.fast is not None:
                params = sampling_tensors([s.request.sampling for s in rows], self.device)
                codes = self.fast.predict_codes(hidden, code0, params)
            else:
                codes = predict_codes(self.talker, hidden, code0, self._cp_picker(rows))
            for i, s in enumerate(rows):
                s.last_codes = codes[i]
                s.frames.append(codes[i])
                s.phase = "talker"
                if s.audio is not None:
                    pcm = s.audio.push(codes[i])
                    if pcm is not None:
                        out.append(AudioChunk(s.id, pcm, s.audio.frame_start, len(pcm) // 1920))
                if s.max_frames is not None and len(s.frames) >= s.max_frames:
                    self._finish(s, "guard", out)

    def run_all(self, requests: list[SynthesisRequest]) -> list[Session]:
        """Run requests to completion (bulk path); returns their finished sessions in order."""
        sessions = [self.add(r) for r in requests]
        while not all(s.done for s in sessions):
            self.step()
        return sessions

    # --- internals --------------------------------------------------------------------------------------------
    def _admit(self, out: list[AudioChunk]) -> None:
        while self.free_slots:
            with self._lock:
                s = self._pop_ready()
            if s is None:
                return
            slot = self.free_slots.pop(0)
            try:
                self._start(s, slot, out)
            except Exception as e:  # a bad request must not take the engine down
                if not isinstance(e, RequestError):
                    log.exception("session %d failed to start", s.id)
                if s not in self.active:
                    self.free_slots.append(slot)
                    self.free_slots.sort()
                self._fail(s, e, out)

    def _pop_ready(self) -> Session | None:
        queues = [self.queues["interactive"]]
        if len(self.free_slots) > self.interactive_reserve:
            queues.append(self.queues["bulk"])
        for q in queues:
            for s in list(q):
                if s.incremental is not None:
                    self._collect_text(s)
                    if not s.committed_ids and not (s.incremental.ended or s.cancelled):
                        continue  # waits for its first token
                q.remove(s)
                return s
        return None

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

    def _absorb_text(self, s: Session, out: list[AudioChunk]) -> None:
        was_ended = s.incremental.ended
        new = self._collect_text(s)
        if s.prompt is not None and (new or (s.incremental.ended and not was_ended)):
            extend_prompt(self.talker, s.prompt, new, end=s.incremental.ended and not was_ended)
            self._set_guard(s)

    def _start(self, s: Session, slot: int, out: list[AudioChunk]) -> None:
        req = s.request
        if s.incremental is not None:
            if not s.committed_ids:
                raise RequestError("text", "must not be empty")
            ended = s.incremental.ended
            s.prompt = make_prompt(self.model, req, list(s.committed_ids), text_ended=ended)
        else:
            s.prompt = make_prompt(self.model, req, self.model.tokenizer.target(req.text).text, True)
        s.slot = slot
        self.active.append(s)
        self._set_guard(s)
        if req.decode_audio and self.model.codec is not None:
            s.audio = AudioStreamer(self.model.codec, req.first_chunk_frames, req.chunk_frames,
                                    ref_codes=s.prompt.ref_codes)
        embeds = s.prompt.prefill
        self.cache.ensure(embeds.shape[0] + 1)
        hidden, logits = prefill(self.talker, self.cache, slot, embeds)
        s.pos, s.hidden = embeds.shape[0], hidden
        ids = self._sample_code0([s], logits[None])
        self._take_code0(s, int(ids[0]), out)  # a session may end at prefill (max_new_tokens=1): its last chunk

    def _set_guard(self, s: Session) -> None:
        per_token = getattr(s.request, "guard_frames_per_token", None) or self.guard_frames_per_token
        if per_token:
            s.max_frames = int(self.guard_base_frames + per_token * s.prompt.num_text_tokens)

    def _text_ready(self, s: Session) -> bool:
        p = s.prompt
        return s.text_step < len(p.trailing) or p.text_ended

    def _next_input(self, s: Session) -> torch.Tensor:
        p = s.prompt
        text = p.trailing[s.text_step] if s.text_step < len(p.trailing) else p.tts_pad
        s.text_step += 1
        return self.talker.embed_frame(s.last_codes) + text

    def _sample_code0(self, rows: list[Session], logits: torch.Tensor) -> torch.Tensor:
        processed = []
        for i, s in enumerate(rows):
            sp = s.request.sampling
            hist = torch.tensor(s.history, dtype=torch.long, device=logits.device) if s.history else None
            processed.append(talker_logits_processors(logits[i].clone(), hist, sp.repetition_penalty,
                                                      len(s.history), self.eos_id, self.suppress_from))
        sps = [s.request.sampling for s in rows]
        return pick_rows(torch.stack(processed), [p.do_sample for p in sps], [p.temperature for p in sps],
                         [p.top_k for p in sps], [p.top_p for p in sps], [s.generator for s in rows])

    def _cp_picker(self, rows: list[Session]):
        sps = [s.request.sampling for s in rows]
        gens = [s.generator for s in rows]
        ds, te = [p.subtalker_dosample for p in sps], [p.subtalker_temperature for p in sps]
        tk, tp = [p.subtalker_top_k for p in sps], [p.subtalker_top_p for p in sps]
        return lambda logits, group: pick_rows(logits, ds, te, tk, tp, gens)

    def _take_code0(self, s: Session, code0: int, out: list[AudioChunk]) -> None:
        s.history.append(code0)
        if code0 == self.eos_id:
            self._finish(s, "eos", out)
        elif len(s.history) >= s.request.sampling.max_new_tokens or s.pos + 1 >= self._max_positions():
            self._finish(s, "max_new_tokens", out)  # the last sampled id never gets its frame (as HF)
        else:
            s.code0, s.phase = code0, "frame"

    def _max_positions(self) -> int:
        return self.cache.capacity if self.cache.static else self.talker.cfg.max_position_embeddings

    def _fail(self, s: Session, e: BaseException, out: list[AudioChunk]) -> None:
        s.error = str(e) or type(e).__name__
        s.error_field = e.field if isinstance(e, RequestError) else None
        self._finish(s, "error", out)

    def _finish(self, s: Session, reason: str, out: list[AudioChunk]) -> None:
        if s.phase == "done":
            return
        s.phase, s.finish_reason = "done", reason
        if s in self.active:
            self.active.remove(s)
            self.free_slots.append(s.slot)
            self.free_slots.sort()
        pcm = np.zeros(0, np.float32)
        start = len(s.frames)
        if s.audio is not None:
            if reason not in ("cancelled", "error"):
                try:
                    pcm = s.audio.finish()
                except Exception as e:  # noqa: BLE001 - the last chunk must still go out
                    log.exception("session %d: final audio decode failed", s.id)
                    s.error, s.error_field, reason, s.finish_reason = str(e), None, "error", "error"
            start = s.audio.emitted_frames
        out.append(AudioChunk(s.id, pcm, start - (len(pcm) // 1920), len(pcm) // 1920, is_last=True,
                              finish_reason=reason, error=s.error if reason == "error" else None,
                              error_field=s.error_field if reason == "error" else None))
