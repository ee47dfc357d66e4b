"""Frozen configuration dataclasses read from (and written to) the official `config.json`.

No Hugging Face `PretrainedConfig` here: `TTSConfig.from_json(path)` reads the plain JSON of an official checkpoint,
`to_json_dict()` writes one that both this engine and the official package load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Real ids of the published 12Hz checkpoints (codec vocab 3072 = 2048 audio codes + specials/languages/speakers).
CODEC_SPECIAL_IDS = dict(
    codec_pad_id=2148, codec_bos_id=2149, codec_eos_token_id=2150,
    codec_think_id=2154, codec_nothink_id=2155, codec_think_bos_id=2156, codec_think_eos_id=2157,
)
CODEC_LANGUAGE_IDS = {
    "english": 2050, "german": 2053, "spanish": 2054, "chinese": 2055, "japanese": 2058, "french": 2061,
    "sichuan_dialect": 2062, "korean": 2064, "russian": 2069, "italian": 2070, "portuguese": 2071,
    "beijing_dialect": 2074,
}
CUSTOM_VOICE_SPEAKERS = {
    "aiden": 2861, "sohee": 2864, "ono_anna": 2873, "eric": 2875, "dylan": 2878, "uncle_fu": 3010,
    "ryan": 3061, "vivian": 3065, "serena": 3066,
}
SPEAKER_DIALECTS: dict[str, str | bool] = {
    "aiden": False, "sohee": False, "ono_anna": False, "eric": "sichuan_dialect", "dylan": "beijing_dialect",
    "uncle_fu": False, "ryan": False, "vivian": False, "serena": False,
}
TEXT_SPECIAL_IDS = dict(
    im_start_token_id=151644, im_end_token_id=151645,
    tts_pad_token_id=151671, tts_bos_token_id=151672, tts_eos_token_id=151673,
)
MODEL_TYPES = ("custom_voice", "voice_design", "base")


@dataclass(frozen=True)
class DecoderStackConfig:
    """A Qwen3 decoder stack (talker or code predictor): q/k-normed GQA attention, SwiGLU MLP, RMSNorm."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    attention_bias: bool = False

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")


@dataclass(frozen=True)
class CodePredictorConfig(DecoderStackConfig):
    vocab_size: int = 2048
    num_code_groups: int = 16


@dataclass(frozen=True)
class TalkerConfig(DecoderStackConfig):
    vocab_size: int = 3072
    text_hidden_size: int = 2048
    text_vocab_size: int = 151936
    num_code_groups: int = 16
    codec_pad_id: int = 2148
    codec_bos_id: int = 2149
    codec_eos_token_id: int = 2150
    codec_think_id: int = 2154
    codec_nothink_id: int = 2155
    codec_think_bos_id: int = 2156
    codec_think_eos_id: int = 2157
    spk_id: dict[str, int] = field(default_factory=dict)
    spk_is_dialect: dict[str, Any] = field(default_factory=dict)
    codec_language_id: dict[str, int] = field(default_factory=dict)
    mrope_section: tuple[int, ...] = (24, 20, 20)
    code_predictor: CodePredictorConfig | None = None

    @property
    def codebook_size(self) -> int:
        """Audio codes of codebook 0 are 0 .. vocab_size-1025; the top 1024 ids are specials (never sampled)."""
        return self.vocab_size - 1024


@dataclass(frozen=True)
class TTSConfig:
    talker: TalkerConfig
    speaker_encoder: dict[str, Any]
    tts_model_type: str
    tts_model_size: str
    tokenizer_type: str = "qwen3_tts_tokenizer_12hz"
    im_start_token_id: int = 151644
    im_end_token_id: int = 151645
    tts_pad_token_id: int = 151671
    tts_bos_token_id: int = 151672
    tts_eos_token_id: int = 151673

    def __post_init__(self) -> None:
        if self.tts_model_type not in MODEL_TYPES:
            raise ValueError(f"tts_model_type must be one of {MODEL_TYPES}, got {self.tts_model_type!r}")

    @classmethod
    def from_json(cls, path: str | Path) -> TTSConfig:
        raw = json.loads(Path(path).read_text())
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TTSConfig:
        if raw.get("model_type") not in (None, "qwen3_tts"):
            raise ValueError(f"config.json: model_type must be 'qwen3_tts', got {raw.get('model_type')!r}")
        if "talker_config" not in raw:
            raise ValueError("config.json has no talker_config: not a Qwen3-TTS checkpoint")
        t = dict(raw["talker_config"])
        cp = dict(t.get("code_predictor_config") or {})
        stack_keys = DecoderStackConfig.__dataclass_fields__.keys()
        cp_cfg = CodePredictorConfig(
            **{k: cp[k] for k in stack_keys if k in cp},
            vocab_size=cp.get("vocab_size", 2048), num_code_groups=cp.get("num_code_groups", 16),
        )
        rope_scaling = t.get("rope_scaling") or {}
        talker = TalkerConfig(
            **{k: t[k] for k in stack_keys if k in t},
            **{k: t[k] for k in ("vocab_size", "text_hidden_size", "text_vocab_size", "num_code_groups",
                                 *CODEC_SPECIAL_IDS) if k in t},
            spk_id={k.lower(): int(v) for k, v in (t.get("spk_id") or {}).items()},
            spk_is_dialect={k.lower(): v for k, v in (t.get("spk_is_dialect") or {}).items()},
            codec_language_id={k.lower(): int(v) for k, v in (t.get("codec_language_id") or {}).items()},
            mrope_section=tuple(rope_scaling.get("mrope_section", (24, 20, 20))),
            code_predictor=cp_cfg,
        )
        return cls(
            talker=talker,
            speaker_encoder=dict(raw.get("speaker_encoder_config") or {}),
            tts_model_type=raw.get("tts_model_type", "custom_voice"),
            tts_model_size=str(raw.get("tts_model_size", "")),
            tokenizer_type=raw.get("tokenizer_type", "qwen3_tts_tokenizer_12hz"),
            **{k: raw[k] for k in TEXT_SPECIAL_IDS if k in raw},
        )

    def to_json_dict(self) -> dict[str, Any]:
        """The official config.json layout (keys the reference's config classes accept)."""
        t = self.talker
        cp = t.code_predictor
        assert cp is not None

        def stack(c: DecoderStackConfig) -> dict[str, Any]:
            d = {k: getattr(c, k) for k in DecoderStackConfig.__dataclass_fields__}
            d.update(hidden_act="silu", use_sliding_window=False, sliding_window=None,
                     attention_dropout=0.0, initializer_range=0.02, tie_word_embeddings=False, use_cache=True)
            return d

        cp_d = stack(cp)
        cp_d.update(vocab_size=cp.vocab_size, num_code_groups=cp.num_code_groups, rope_scaling=None,
                    max_window_layers=cp.num_hidden_layers, layer_types=["full_attention"] * cp.num_hidden_layers)
        talker_d = stack(t)
        talker_d.update(
            vocab_size=t.vocab_size, text_hidden_size=t.text_hidden_size, text_vocab_size=t.text_vocab_size,
            num_code_groups=t.num_code_groups,
            rope_scaling={"interleaved": True, "mrope_section": list(t.mrope_section), "rope_type": "default"},
            **{k: getattr(t, k) for k in CODEC_SPECIAL_IDS},
            spk_id=dict(t.spk_id), spk_is_dialect=dict(t.spk_is_dialect),
            codec_language_id=dict(t.codec_language_id), position_id_per_seconds=13,
            code_predictor_config=cp_d,
        )
        return {
            "architectures": ["Qwen3TTSForConditionalGeneration"],
            "model_type": "qwen3_tts",
            "tokenizer_type": self.tokenizer_type,
            "tts_model_size": self.tts_model_size,
            "tts_model_type": self.tts_model_type,
            **{k: getattr(self, k) for k in TEXT_SPECIAL_IDS},
            "talker_config": talker_d,
            "speaker_encoder_config": dict(self.speaker_encoder),
        }


# Named sizes (published shapes for 0.6B / 1.7B; "tiny" keeps the real vocabularies, ids and geometry).
TALKER_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, text_hidden_size=64, mrope_section=(3, 3, 2)),
    "0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, text_hidden_size=2048),
    "1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, text_hidden_size=2048),
}
CODE_PREDICTOR_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=65536),
    "tiny-proj": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=65536),
    "full": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=5, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, max_position_embeddings=65536),
}
SIZE_TAGS = {"tiny": "tiny", "tiny-proj": "tiny", "0.6b": "0b6", "1.7b": "1b7"}


def make_config(model_type: str, size: str = "tiny", enc_dim: int | None = None) -> TTSConfig:
    """The config of a checkpoint of the given type and named size ("tiny", "tiny-proj", "0.6b", "1.7b").

    "tiny-proj" is tiny with a code predictor narrower than the talker (exercises `small_to_mtp_projection`).
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if size not in SIZE_TAGS:
        raise ValueError(f"size must be one of {sorted(SIZE_TAGS)}, got {size!r}")
    talker_kw = dict(TALKER_SIZES["tiny" if size.startswith("tiny") else size])
    cp_kw = CODE_PREDICTOR_SIZES[size if size.startswith("tiny") else "full"]
    custom = model_type == "custom_voice"
    talker = TalkerConfig(
        **talker_kw,
        code_predictor=CodePredictorConfig(**cp_kw),
        spk_id=dict(CUSTOM_VOICE_SPEAKERS) if custom else {},
        spk_is_dialect=dict(SPEAKER_DIALECTS) if custom else {},
        codec_language_id=dict(CODEC_LANGUAGE_IDS),
    )
    speaker_encoder = {"enc_dim": enc_dim or talker.hidden_size, "sample_rate": 24000}
    return TTSConfig(talker=talker, speaker_encoder=speaker_encoder, tts_model_type=model_type,
                     tts_model_size=SIZE_TAGS[size])


def sampling_defaults_from_generation_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The sampling keys of generation_config.json that SamplingParams understands."""
    keys = ("do_sample", "top_k", "top_p", "temperature", "repetition_penalty", "subtalker_dosample",
            "subtalker_top_k", "subtalker_top_p", "subtalker_temperature", "max_new_tokens")
    return {k: raw[k] for k in keys if k in raw}


def default_generation_config() -> dict[str, Any]:
    return dict(do_sample=True, top_k=50, top_p=1.0, temperature=0.9, repetition_penalty=1.05,
                subtalker_dosample=True, subtalker_top_k=50, subtalker_top_p=1.0, subtalker_temperature=0.9,
                max_new_tokens=8192)


__all__ = ["TTSConfig", "TalkerConfig", "CodePredictorConfig", "make_config"]
