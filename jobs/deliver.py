"""What happens to a row's text and audio around synthesis when a job asks for more than a WAV: the hooks that
render.py calls (lexicon, sentence chunks for captions, speed, mastering, measurement, captions) and the ones the
job drivers call once all rows are done (ACX level consistency, the M4B book).

With no mastering, no speed, no lexicon and no captions, every hook is a no-op on keys and audio: outputs and
content keys are exactly what they were before these features existed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from . import audio, captions, levels, mastering
from .lexicon import digest as lexicon_digest
from .quality import QualityConfig, check_audio, check_chunks
from .split import split_text

FIGURES = ("rms_db", "peak_db", "noise_floor_db", "lufs", "true_peak_dbtp", "head_s", "tail_s")


@dataclass
class TextPlan:
    synth: list[str]                              # what is synthesized, one chunk each
    display: list[str]                            # the same chunks as written (captions show these)
    hits: list[Any] = field(default_factory=list)  # lexicon entries that fired (jobs.lexicon.Entry), each once

    @property
    def fired(self) -> list[str]:
        """The words of the lexicon entries that fired (the manifest's `lexicon`)."""
        return [e.word for e in self.hits]


def plan_text(text: str, cfg: Any) -> TextPlan:
    """Chunks to synthesize: the lexicon's respellings applied; one sentence per chunk when captions are on.

    The one place that decides what the lexicon changes: synthesis says `synth`, and the content key names `hits`
    (key_extra), so an entry that fires only within a sentence (the whole text reads "St. Louis", its sentence
    chunk "Louis") is in the key, and editing it renders again."""
    if cfg.captions:
        display = captions.sentence_chunks(text, cfg.max_chars)
        synth, hits = [], {}
        for chunk in display:
            said, fired = cfg.lexicon.apply(chunk)
            synth.append(said)
            hits.update(dict.fromkeys(fired))   # by entry: one word may have an exact and an ignore-case entry
        return TextPlan(synth, display, list(hits))
    said, fired = cfg.lexicon.apply(text)
    chunks = split_text(said, cfg.max_chars)
    return TextPlan(chunks, chunks, fired)


def key_extra(text: str, cfg: Any) -> dict[str, Any]:
    """Content-key fields beyond the original ones; empty unless a feature is on (old keys stay valid)."""
    out: dict[str, Any] = {}
    if cfg.master.active:
        out["master"] = cfg.master.key()
    if cfg.speed != 1.0:
        out["speed"] = cfg.speed
    if cfg.captions:
        out["captions"] = True  # one sentence per chunk: other audio
    if cfg.lexicon:
        hits = plan_text(text, cfg).hits  # the entries synthesis applies, chunk by chunk as it does
        if hits:
            out["lexicon"] = lexicon_digest(hits)
    return out


def extension(fmt: str, cfg: Any) -> str:
    return cfg.master.delivery.ext if cfg.master.active else audio.ENCODINGS[fmt][2]


def _figures(rec: Any, m: levels.Measurements) -> None:
    for name in FIGURES:
        value = getattr(m, name)
        setattr(rec, name, None if value is None else round(float(value), 3))


def finish_audio(row: Any, rec: Any, pcms: list[np.ndarray], sr_in: int, cfg: Any,
                 texts: list[str] | None = None) -> list[tuple[str, bytes, str]]:
    """A row's chunk audio -> the objects to write [(key, bytes, content type)], audio first; fills `rec`
    (flags, figures, rules, duration, sample rate, format, bytes, status, captions)."""
    if cfg.speed != 1.0:
        from qwen_tts_core.audio_fx import time_stretch

        pcms = [time_stretch(p, sr_in, cfg.speed) for p in pcms]
    pcm = audio.join_chunks(pcms, sr_in, cfg.pause_s)
    if not np.isfinite(pcm).all():  # NaN would be written as full-scale samples: never deliver it
        raise ValueError("non-finite samples (NaN/inf) in the audio")
    quality: QualityConfig = cfg.quality
    if cfg.speed != 1.0:  # faster speech says more characters per second
        quality = replace(quality, min_chars_per_s=quality.min_chars_per_s * cfg.speed,
                          max_chars_per_s=quality.max_chars_per_s * cfg.speed)
    rec.flags = check_audio(pcm, sr_in, row.text, quality) + check_chunks(pcms, sr_in, texts, quality)
    rec.speed = cfg.speed
    if cfg.master.active:
        res = mastering.master(pcm, sr_in, cfg.master)
        data, ctype, offset = res.data, res.codec.media_type, res.offset_s
        rec.master, rec.format, rec.sample_rate = cfg.master.preset, res.codec.name, res.codec.sample_rate
        rec.rules = json.dumps(res.rules, sort_keys=True)
        rec.speech_level_dbm0 = res.figures()["speech_level_dbm0"]
        rec.flags = rec.flags + mastering.flag_names(cfg.master.preset, res.rules)
        m = res.measurements
    else:
        out = audio.resample(pcm, sr_in, row.sample_rate)
        data, ctype, offset = audio.encode(out, row.sample_rate, row.format), audio.ENCODINGS[row.format][3], 0.0
        rec.sample_rate = row.sample_rate
        m = levels.measure(out, row.sample_rate)
    _figures(rec, m)
    rec.duration_s = round(m.duration_s, 4)
    rec.bytes = len(data)
    rec.status = "suspect" if rec.flags else "ok"
    objects = [(rec.key, data, ctype)]
    if cfg.captions:
        spans = captions.segments([p.size for p in pcms], sr_in, cfg.pause_s)
        cue_list = captions.cues(texts or [], spans, sr_in, offset, m.duration_s)
        srt_key, vtt_key = captions.caption_keys(rec.key)
        objects += [(srt_key, captions.to_srt(cue_list).encode(), "application/x-subrip"),
                    (vtt_key, captions.to_vtt(cue_list).encode(), "text/vtt")]
        rec.captions = [srt_key, vtt_key]
    return objects


def level_consistency(records: list[Any], cfg: Any) -> None:
    """ACX: flag chapters whose RMS is more than 1 dB off the book's median (across the whole job)."""
    if cfg.master.preset != "acx":
        return
    live = [r for r in records if r.status in ("ok", "suspect") and r.rms_db is not None]
    verdict = mastering.check_consistency({r.id: r.rms_db for r in live})
    for r in live:
        rules = json.loads(r.rules or "{}")
        rules["consistent_level"] = verdict[r.id]
        r.rules = json.dumps(rules, sort_keys=True)
        flag = "acx:consistent_level"
        if not verdict[r.id] and flag not in r.flags:
            r.flags = [*r.flags, flag]
            r.status = "suspect"
