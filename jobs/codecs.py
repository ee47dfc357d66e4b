"""Delivery encodings for mastered audio: one table, one encoder, one decoder (FFmpeg through PyAV).

A `Codec` names what a file is: its container, FFmpeg encoder, sample rate, bit rate, extension and media type.
Headerless telephony files (ulaw, alaw, sln, sln16, g722) are what Asterisk-style PBXs read from their sounds
folders; the WAV variants carry the same audio with a header for everything else.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction

import numpy as np


@dataclass(frozen=True)
class Codec:
    name: str
    container: str           # FFmpeg muxer
    encoder: str             # FFmpeg encoder
    sample_rate: int
    ext: str
    media_type: str
    bit_rate: int | None = None
    options: tuple[tuple[str, str], ...] = ()


CODECS: dict[str, Codec] = {c.name: c for c in (
    # MP3: LAME, constant bit rate, quality 5 of 0 (best) .. 9 (fastest); FFmpeg writes the LAME/Info tag (gapless).
    Codec("mp3-192", "mp3", "libmp3lame", 44100, "mp3", "audio/mpeg", 192_000, (("compression_level", "5"),)),
    Codec("mp3-128", "mp3", "libmp3lame", 44100, "mp3", "audio/mpeg", 128_000, (("compression_level", "5"),)),
    Codec("opus", "ogg", "libopus", 48000, "opus", "audio/ogg", 64_000),
    Codec("aac", "ipod", "aac", 44100, "m4b", "audio/mp4", 64_000),
    Codec("wav-ulaw", "wav", "pcm_mulaw", 8000, "wav", "audio/wav"),
    Codec("wav-alaw", "wav", "pcm_alaw", 8000, "wav", "audio/wav"),
    Codec("wav-8k", "wav", "pcm_s16le", 8000, "wav", "audio/wav"),
    Codec("wav-16k", "wav", "pcm_s16le", 16000, "wav", "audio/wav"),
    Codec("ulaw", "mulaw", "pcm_mulaw", 8000, "ulaw", "audio/basic"),
    Codec("alaw", "alaw", "pcm_alaw", 8000, "alaw", "audio/x-alaw-basic"),
    Codec("sln", "s16le", "pcm_s16le", 8000, "sln", "audio/L16;rate=8000"),
    Codec("sln16", "s16le", "pcm_s16le", 16000, "sln16", "audio/L16;rate=16000"),
    Codec("g722", "g722", "g722", 16000, "g722", "audio/G722"),
)}
RAW_CODECS = ("ulaw", "alaw", "sln", "sln16", "g722")  # headerless: decoding needs the name
# Containers that FFmpeg cannot read back without a sample in them: an MP3 of only its Xing/Info tag, an Ogg Opus of
# only headers, an M4B without an audio packet. Zero samples are encoded there as one sample of silence.
NEEDS_A_SAMPLE = ("mp3", "ogg", "ipod")


def get(name: str) -> Codec:
    if name not in CODECS:
        raise ValueError(f"codec must be one of {sorted(CODECS)}, got {name!r}")
    return CODECS[name]


def encode(pcm: np.ndarray, codec: str | Codec, metadata: dict[str, str] | None = None) -> bytes:
    """Mono float32 [N] already at the codec's sample rate -> file bytes.

    Zero samples give a valid file: the header alone for WAV, no bytes for the headerless RAW_CODECS (both exactly
    0 samples), one sample of silence for the NEEDS_A_SAMPLE containers (mp3, opus, aac).
    """
    import av

    c = get(codec) if isinstance(codec, str) else codec
    x = np.ascontiguousarray(np.clip(np.asarray(pcm, dtype=np.float32).reshape(-1), -1.0, 1.0))
    if not x.size and c.container in NEEDS_A_SAMPLE:
        x = np.zeros(1, np.float32)
    buf = io.BytesIO()
    with av.open(buf, "w", format=c.container) as out:
        for k, v in (metadata or {}).items():
            out.metadata[k] = v
        stream = out.add_stream(c.encoder, rate=c.sample_rate, layout="mono", options=dict(c.options))
        if c.bit_rate:
            stream.bit_rate = c.bit_rate
        out.start_encoding()  # writes the header even when no packet follows (a WAV of zero samples)
        step = 1 << 16
        for i in range(0, x.size, step):
            frame = av.AudioFrame.from_ndarray(x[None, i:i + step], format="flt", layout="mono")
            frame.sample_rate = c.sample_rate
            if c.container == "ogg":  # its sample position: without it Ogg's granules start one Opus pre-skip
                # late and a file of one page decoded 312 samples long (some unreadable by libsndfile), as the
                # service's OpusEncoder found (other containers are left as they were: MP4's edit list would
                # then trim an empty AAC master's one sample away)
                frame.pts, frame.time_base = i, Fraction(1, c.sample_rate)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def decode(data: bytes, codec: str | None = None) -> tuple[np.ndarray, int]:
    """File bytes -> (mono float32 [N], sample rate). `codec` is required for the headerless RAW_CODECS.

    Raises:
        ValueError: the bytes are not audio FFmpeg can read.
    """
    import av

    kwargs: dict = {}
    if codec in RAW_CODECS:
        c = CODECS[codec]
        kwargs = {"format": c.container, "options": {"sample_rate": str(c.sample_rate), "ch_layout": "mono"}}
        if codec == "g722":
            kwargs["options"] = {"sample_rate": "16000"}
    try:
        with av.open(io.BytesIO(data), **kwargs) as f:
            stream = f.streams.audio[0]
            rate = stream.rate or stream.codec_context.sample_rate
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            parts = []
            for frame in f.decode(stream):
                for r in resampler.resample(frame):
                    parts.append(r.to_ndarray().reshape(-1))
            for r in resampler.resample(None):
                parts.append(r.to_ndarray().reshape(-1))
    except (av.error.FFmpegError, IndexError) as e:
        raise ValueError(f"not decodable audio ({type(e).__name__}: {e})") from e
    pcm = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
    return pcm, int(rate)


# What the media code asks of FFmpeg beyond the table above (book: jobs/book.py; speed and limiter: audio_fx).
EXTRA_MUXERS = ("mp4",)
EXTRA_DECODERS = ("png", "mjpeg")  # cover images, probed before use
FILTERS = ("abuffer", "abuffersink", "atempo", "alimiter")
# configure flags that put GPL (or unredistributable) code into FFmpeg's libraries
GPL_CONFIGURE = ("--enable-gpl", "--enable-nonfree", "--enable-libx264", "--enable-libx265", "--enable-libxvid",
                 "--enable-librubberband", "--enable-libvidstab", "--enable-frei0r", "--enable-libcdio",
                 "--enable-libdavs2", "--enable-libxavs", "--enable-libxavs2", "--enable-libsmbclient",
                 "--enable-libfdk-aac", "--enable-postproc")


def ffmpeg_report() -> dict[str, list[str]]:
    """The FFmpeg that PyAV loaded, checked against this project's needs and licence:
    {"missing": encoders/muxers/decoders/filters the media code uses but this build lacks,
     "gpl": configure flags that bring GPL code in (a GPL-free image needs []),
     "license": what each library says of itself}.

    PyPI's PyAV wheels (up to 18.x at least) link libx264 and libx265 (GPL) into libavcodec while it reports
    "LGPL"; an image that must carry no GPL terms builds PyAV from source against an FFmpeg configured without
    them (jobs/README.md). `python -c "from jobs.codecs import ffmpeg_report; print(ffmpeg_report())"`.
    """
    import av
    import av.filter

    missing = []
    for kind, names, mode in (("encoder", {c.encoder for c in CODECS.values()}, "w"),
                              ("decoder", set(EXTRA_DECODERS), "r")):
        for name in sorted(names):
            try:
                av.Codec(name, mode)
            except Exception:  # noqa: BLE001 - PyAV raises different types across versions
                missing.append(f"{kind} {name}")
    muxers = {c.container for c in CODECS.values()} | set(EXTRA_MUXERS)
    missing += [f"muxer {m}" for m in sorted(muxers) if m not in av.formats_available]
    missing += [f"filter {f}" for f in FILTERS if f not in av.filter.filters_available]
    meta = getattr(getattr(av, "_core", None), "library_meta", {}) or {}
    config = " ".join(str(m.get("configuration", "")) for m in meta.values())
    gpl = [flag for flag in GPL_CONFIGURE if f"{flag} " in f"{config} " or f"{flag}=" in config]
    return {"missing": missing, "gpl": gpl,
            "license": sorted({f"{k}: {m.get('license')}" for k, m in meta.items()})}
