"""Configuration of the 12Hz speech tokenizer (codec): `speech_tokenizer/config.json`.

The official file is a `Qwen3TTSTokenizerV2Config`: top-level rates, an `encoder_config` block (a transformers
`MimiConfig`) and a `decoder_config` block. `CodecConfig` keeps the decoder fields as typed attributes and the Mimi
block as a plain dict (it is only handed to transformers' `MimiModel`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_TYPE = "qwen3_tts_tokenizer_12hz"

# decoder_config keys that map 1:1 onto `CodecConfig` attributes (official name -> attribute name).
_DECODER_KEYS: dict[str, str] = {
    "codebook_size": "codebook_size",
    "codebook_dim": "codebook_dim",
    "num_quantizers": "num_quantizers",
    "hidden_size": "hidden_size",
    "latent_dim": "latent_dim",
    "num_hidden_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "intermediate_size": "intermediate_size",
    "hidden_act": "hidden_act",
    "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "sliding_window": "sliding_window",
    "layer_scale_initial_scale": "layer_scale_initial_scale",
    "attention_bias": "attention_bias",
    "max_position_embeddings": "max_position_embeddings",
    "upsample_rates": "upsample_rates",
    "upsampling_ratios": "upsampling_ratios",
    "decoder_dim": "decoder_dim",
}

# Defaults of the official `Qwen3TTSTokenizerV2DecoderConfig.__init__` (used when a key is absent from the JSON).
_DECODER_DEFAULTS: dict[str, Any] = {
    "codebook_size": 2048,
    "hidden_size": 1024,
    "latent_dim": 1024,
    "max_position_embeddings": 8000,
    "rope_theta": 10000.0,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "attention_bias": False,
    "sliding_window": 72,
    "intermediate_size": 3072,
    "hidden_act": "silu",
    "layer_scale_initial_scale": 0.01,
    "rms_norm_eps": 1e-5,
    "num_hidden_layers": 8,
    "num_quantizers": 16,
    "upsample_rates": (8, 5, 4, 3),
    "upsampling_ratios": (2, 2),
    "decoder_dim": 1536,
}

SUPPORTED_ACTS = ("silu", "gelu", "relu")


def _label(attr: str) -> str:
    """The config.json field of a CodecConfig attribute."""
    if attr == "sample_rate":
        return "output_sample_rate"
    return f"decoder_config.{attr}" if attr in _DECODER_KEYS else attr

# Upper bounds with a wide margin over the published codec (hidden 512, latent 1024, decoder_dim 1536, inter 1024,
# 8 layers, 16 heads of 64, sliding window 72, 16 x 2048 codebooks of dim 512). The decoder is built on the meta
# device and only filled from weights that match it, but a config still sizes what is allocated beside the weights
# (a streaming row's keys and values: layers * kv heads * head_dim * (sliding_window - 1) each).
_INT_LIMITS: dict[str, int] = {
    "codebook_size": 1 << 14, "codebook_dim": 4096, "num_quantizers": 64, "hidden_size": 4096, "latent_dim": 8192,
    "num_hidden_layers": 64, "num_attention_heads": 128, "num_key_value_heads": 128, "head_dim": 512,
    "intermediate_size": 8192, "sliding_window": 1024, "max_position_embeddings": 1 << 16,
    "decoder_dim": 8192, "sample_rate": 192000, "decode_upsample_rate": 1 << 20, "encode_downsample_rate": 1 << 20,
    "encoder_valid_num_quantizers": 64,
}

# encoder_config: the transformers `MimiConfig` fields that shape the Mimi encoder (built at the first
# voice-clone prompt), checked here so a bad block fails at load, not at a request. Official values in comments
# (kyutai/mimi); bounds far beyond them. Other keys (PretrainedConfig bookkeeping such as `architectures`,
# `_frame_rate`, `torch_dtype`) go to MimiConfig as they are.
_MIMI_INTS: dict[str, tuple[int, int]] = {
    "sampling_rate": (1, 192000),        # 24000 (must equal the codec's)
    "audio_channels": (1, 1),            # mono
    "hidden_size": (1, 4096),            # 512
    "num_filters": (1, 1024),            # 64
    "num_residual_layers": (1, 8),       # 1
    "kernel_size": (1, 63),              # 7
    "last_kernel_size": (1, 63),         # 3
    "residual_kernel_size": (1, 63),     # 3
    "dilation_growth_rate": (1, 16),     # 2
    "compress": (1, 64),                 # 2
    "codebook_size": (2, 1 << 14),       # 2048 (must equal the decoder's)
    "codebook_dim": (1, 4096),           # 256
    "num_quantizers": (2, 64),           # 32 (the first encoder_valid_num_quantizers = 16 are kept)
    "vector_quantization_hidden_dimension": (1, 4096),  # 256
    "num_semantic_quantizers": (1, 63),  # 1
    "upsample_groups": (1, 4096),        # 512
    "num_hidden_layers": (1, 64),        # 8
    "intermediate_size": (1, 16384),     # 2048
    "num_attention_heads": (1, 128),     # 8
    "num_key_value_heads": (1, 128),     # 8
    "head_dim": (1, 512),                # 64 (null: hidden_size // num_attention_heads)
    "max_position_embeddings": (1, 1 << 16),  # 8000
    "sliding_window": (1, 1 << 14),      # 250
}
_MIMI_UNIT_FLOATS = ("trim_right_ratio", "norm_eps", "layer_scale_initial_scale", "initializer_range")  # in (0, 1]
_MIMI_BOOLS = ("use_causal_conv", "use_conv_shortcut", "attention_bias", "use_cache", "use_streaming",
               "tie_word_embeddings")
_MIMI_CHOICES: dict[str, tuple[str, ...]] = {
    "model_type": ("mimi",),
    "hidden_act": ("gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish", "relu"),  # gelu
    "pad_mode": ("constant", "reflect", "replicate", "circular"),                       # constant
}
_MIMI_DEFAULTS = {"sampling_rate": 24000, "codebook_size": 2048, "num_quantizers": 32}  # MimiConfig's own


def check_encoder_config(enc: Mapping[str, Any]) -> dict[str, Any]:
    """The `encoder_config` block, its MimiConfig fields type- and range-checked (ValueError naming the field)."""
    from ..config import check_float, check_int, check_plain_rope, check_rope_theta

    out = dict(enc)
    w = "encoder_config"
    for key, (lo, hi) in _MIMI_INTS.items():
        if key in out and not (key == "head_dim" and out[key] is None):
            check_int(out[key], f"{w}.{key}", lo, hi)
    for key in _MIMI_UNIT_FLOATS:
        if key in out:
            check_float(out[key], f"{w}.{key}", 0.0, 1.0)
    if "attention_dropout" in out:
        p = out["attention_dropout"]
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p < 1.0:
            raise ValueError(f"{w}.attention_dropout must be a number in [0, 1), got {p!r:.60}")
    for key in ("frame_rate", "_frame_rate"):
        if out.get(key) is not None:
            check_float(out[key], f"{w}.{key}", 0.0, 192000.0)
    for key in _MIMI_BOOLS:
        if key in out and not isinstance(out[key], bool):
            raise ValueError(f"{w}.{key} must be true or false, got {out[key]!r:.60}")
    for key, choices in _MIMI_CHOICES.items():
        if key in out and out[key] not in choices:
            raise ValueError(f"{w}.{key} must be one of {list(choices)}, got {out[key]!r:.60}")
    ratios = out.get("upsampling_ratios")
    if ratios is not None:
        if not isinstance(ratios, list | tuple) or not 1 <= len(ratios) <= 8:
            raise ValueError(f"{w}.upsampling_ratios must be a list of 1 to 8 integers, got {ratios!r:.60}")
        for i, r in enumerate(ratios):
            check_int(r, f"{w}.upsampling_ratios[{i}]", 1, 64)
    if "rope_theta" in out:
        check_rope_theta(out["rope_theta"], f"{w}.rope_theta")
    for key in ("rope_parameters", "rope_scaling"):
        check_plain_rope(out.get(key), f"{w}.{key}")
    for key in ("encoder_config", "decoder_config"):  # MimiConfig derives these; the loader drops the decoder itself
        if key in out:
            raise ValueError(f"{w}.{key} is not a MimiConfig field this loader accepts")
    return out


@dataclass(frozen=True)
class CodecConfig:
    """Shape of the 12Hz codec.

    Decoder geometry: codes [B, num_quantizers, T] -> RVQ (codebook vectors of codebook_dim // 2, projected to
    codebook_dim) -> pre-conv to latent_dim -> sliding-window transformer (hidden_size) -> upsampling_ratios
    transposed convs + ConvNeXt -> conv to decoder_dim -> one decoder block per upsample_rate (channels halve each
    time) -> conv to 1 channel. Samples per frame = prod(upsampling_ratios) * prod(upsample_rates).
    `encoder` is the Mimi config dict of the `encoder_config` block (read-only by convention).
    """

    codebook_size: int = 2048
    codebook_dim: int = 512
    num_quantizers: int = 16
    hidden_size: int = 512
    latent_dim: int = 1024
    num_hidden_layers: int = 8
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 64
    intermediate_size: int = 1024
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int = 72
    layer_scale_initial_scale: float = 0.01
    attention_bias: bool = False
    max_position_embeddings: int = 8000
    upsample_rates: tuple[int, ...] = (8, 5, 4, 3)
    upsampling_ratios: tuple[int, ...] = (2, 2)
    decoder_dim: int = 1536
    sample_rate: int = 24000
    decode_upsample_rate: int = 1920
    encode_downsample_rate: int = 1920
    encoder_valid_num_quantizers: int = 16
    encoder: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        from ..config import check_float, check_int, check_rope_theta

        for key in ("upsample_rates", "upsampling_ratios"):
            value = getattr(self, key)
            if not isinstance(value, list | tuple) or not 1 <= len(value) <= 8:
                raise ValueError(f"{_label(key)} must be a list of 1 to 8 integers, got {value!r:.60}")
            object.__setattr__(self, key, tuple(check_int(v, f"{_label(key)}[{i}]", 1, 64)
                                                for i, v in enumerate(value)))
        for key, hi in _INT_LIMITS.items():
            check_int(getattr(self, key), _label(key), 1, hi)
        for key in ("rms_norm_eps", "layer_scale_initial_scale"):
            check_float(getattr(self, key), _label(key), 0.0, 1.0)
        object.__setattr__(self, "rope_theta", check_rope_theta(self.rope_theta, _label("rope_theta")))
        if not isinstance(self.attention_bias, bool):
            raise ValueError(f"decoder_config.attention_bias must be true or false, got {self.attention_bias!r}")
        if self.hidden_act not in SUPPORTED_ACTS:
            raise ValueError(f"hidden_act must be one of {SUPPORTED_ACTS}, got {self.hidden_act!r}")
        if self.codebook_dim % 2:
            raise ValueError(f"codebook_dim must be even (codebook vectors have codebook_dim // 2), "
                             f"got {self.codebook_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads, got "
                             f"{self.num_attention_heads} and {self.num_key_value_heads}")
        if self.num_quantizers < 2:
            raise ValueError(f"num_quantizers must be >= 2 (1 semantic + acoustic), got {self.num_quantizers}")
        if self.decoder_dim % (2 ** len(self.upsample_rates)):
            raise ValueError(f"decoder_dim must be divisible by 2**len(upsample_rates), got {self.decoder_dim}")
        if self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")
        if self.samples_per_frame != self.decode_upsample_rate:
            raise ValueError(
                f"decode_upsample_rate ({self.decode_upsample_rate}) must equal prod(upsampling_ratios) * "
                f"prod(upsample_rates) ({self.samples_per_frame})"
            )
        if not isinstance(self.encoder, Mapping):
            raise ValueError(f"encoder_config must be a JSON object, got {self.encoder!r:.60}")
        enc = check_encoder_config(self.encoder)
        object.__setattr__(self, "encoder", enc)
        # the encoder's codes are the decoder's (and the talker's): as many codebooks, of the same size
        if self.encoder_valid_num_quantizers != self.num_quantizers:
            raise ValueError(f"encoder_valid_num_quantizers ({self.encoder_valid_num_quantizers}) must equal "
                             f"decoder_config.num_quantizers ({self.num_quantizers})")
        mimi_quantizers = enc.get("num_quantizers", _MIMI_DEFAULTS["num_quantizers"])
        if self.encoder_valid_num_quantizers > mimi_quantizers:
            raise ValueError(f"encoder_valid_num_quantizers ({self.encoder_valid_num_quantizers}) exceeds "
                             f"encoder_config.num_quantizers ({mimi_quantizers})")
        mimi_codebook = enc.get("codebook_size", _MIMI_DEFAULTS["codebook_size"])
        if mimi_codebook != self.codebook_size:
            raise ValueError(f"encoder_config.codebook_size ({mimi_codebook}) must equal "
                             f"decoder_config.codebook_size ({self.codebook_size})")
        mimi_rate = enc.get("sampling_rate", _MIMI_DEFAULTS["sampling_rate"])
        if mimi_rate != self.sample_rate:
            raise ValueError(f"encoder_config.sampling_rate ({mimi_rate}) must equal output_sample_rate "
                             f"({self.sample_rate})")

    @property
    def samples_per_frame(self) -> int:
        """Output samples produced per code frame (1920 for the 12Hz codec)."""
        return math.prod(self.upsampling_ratios) * math.prod(self.upsample_rates)

    @property
    def frame_rate(self) -> float:
        """Code frames per second (12.5)."""
        return self.sample_rate / self.samples_per_frame

    @property
    def output_dim(self) -> int:
        """Channels entering the last conv (decoder_dim halved once per decoder block)."""
        return self.decoder_dim // 2 ** len(self.upsample_rates)

    # ---- JSON -----------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> CodecConfig:
        """Build from the parsed official config.json (a Qwen3TTSTokenizerV2Config dict)."""
        if not isinstance(obj, Mapping):   # before any .get: a list or a number is a ValueError, not AttributeError
            raise ValueError(f"must hold a JSON object, got {type(obj).__name__}")
        model_type = obj.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"config model_type must be {MODEL_TYPE!r}, got {model_type!r}")
        dec = obj.get("decoder_config")
        if not isinstance(dec, Mapping):
            raise ValueError(f"decoder_config must be a JSON object, got {dec!r:.60}")
        dec = dict(dec)
        from ..config import check_plain_rope

        for key in ("rope_scaling", "rope_parameters"):  # the decoder's transformer: plain RoPE only
            check_plain_rope(dec.get(key), f"decoder_config.{key}")
        kwargs: dict[str, Any] = {}
        for key, attr in _DECODER_KEYS.items():
            if key in dec:
                kwargs[attr] = dec[key]
            elif key in _DECODER_DEFAULTS:
                kwargs[attr] = _DECODER_DEFAULTS[key]
        if "codebook_dim" not in dec:
            raise ValueError("decoder_config.codebook_dim is missing from config.json")
        if "head_dim" not in dec:
            from ..config import check_int

            kwargs["head_dim"] = (check_int(kwargs["hidden_size"], "decoder_config.hidden_size")
                                  // check_int(kwargs["num_attention_heads"], "decoder_config.num_attention_heads"))
        sr = obj.get("output_sample_rate", 24000)
        if obj.get("input_sample_rate", sr) != sr:
            raise ValueError("input_sample_rate and output_sample_rate must be equal for the 12Hz codec")
        encoder = obj.get("encoder_config") or {}
        if not isinstance(encoder, Mapping):
            raise ValueError(f"encoder_config must be a JSON object, got {encoder!r:.60}")
        return cls(
            sample_rate=sr,
            decode_upsample_rate=obj.get("decode_upsample_rate", 1920),
            encode_downsample_rate=obj.get("encode_downsample_rate", 1920),
            encoder_valid_num_quantizers=obj.get("encoder_valid_num_quantizers", 16),
            encoder=dict(encoder),
            **kwargs,
        )

    @classmethod
    def from_json(cls, path: str | Path) -> CodecConfig:
        """Read `speech_tokenizer/config.json` (or a folder that contains it)."""
        from ..checkpoint.weights import read_json

        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        try:
            return cls.from_dict(read_json(p))
        except (ValueError, TypeError) as e:
            msg = str(e)
            raise ValueError(msg if msg.startswith(str(p)) else f"{p}: {msg}") from None

    def to_json_dict(self, dtype_name: str = "float32") -> dict[str, Any]:
        """The official config.json content (loadable by the reference `Qwen3TTSTokenizerV2Config`)."""
        dec: dict[str, Any] = {}
        for key, attr in _DECODER_KEYS.items():
            value = getattr(self, attr)
            dec[key] = list(value) if isinstance(value, tuple) else value
        dec["attention_dropout"] = 0.0
        return {
            "architectures": ["Qwen3TTSTokenizerV2Model"],
            "model_type": MODEL_TYPE,
            "encoder_valid_num_quantizers": self.encoder_valid_num_quantizers,
            "input_sample_rate": self.sample_rate,
            "output_sample_rate": self.sample_rate,
            "decode_upsample_rate": self.decode_upsample_rate,
            "encode_downsample_rate": self.encode_downsample_rate,
            "torch_dtype": dtype_name,
            "encoder_config": dict(self.encoder),
            "decoder_config": dec,
        }


def _mimi(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model_type": "mimi", "sampling_rate": 24000, "frame_rate": 12.5, "audio_channels": 1,
        "hidden_size": 512, "num_filters": 64, "num_residual_layers": 1, "upsampling_ratios": [8, 6, 5, 4],
        "kernel_size": 7, "last_kernel_size": 3, "residual_kernel_size": 3, "dilation_growth_rate": 2,
        "use_causal_conv": True, "pad_mode": "constant", "compress": 2, "trim_right_ratio": 1.0,
        "codebook_size": 2048, "codebook_dim": 256, "num_quantizers": 32, "use_conv_shortcut": False,
        "vector_quantization_hidden_dimension": 256, "num_semantic_quantizers": 1, "upsample_groups": 512,
        "num_hidden_layers": 8, "intermediate_size": 2048, "num_attention_heads": 8, "num_key_value_heads": 8,
        "head_dim": 64, "hidden_act": "gelu", "max_position_embeddings": 8000, "rope_theta": 10000.0,
        "sliding_window": 250, "attention_dropout": 0.0, "norm_eps": 1e-5, "layer_scale_initial_scale": 0.01,
        "attention_bias": False, "use_cache": False,
    }
    base.update(overrides)
    return base


def full_config() -> CodecConfig:
    """Published 12Hz hub geometry (decoder values from the facts doc; Mimi encoder = kyutai/mimi shape)."""
    return CodecConfig(encoder=_mimi())


def tiny_config() -> CodecConfig:
    """Small widths and few layers with the real geometry: 16 codebooks of 2048, 1920 samples/frame, 24 kHz,
    sliding window 72, GQA with head_dim != hidden/heads, an encoder with more quantizers than the 16 kept."""
    return CodecConfig(
        codebook_dim=64, hidden_size=32, latent_dim=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=64, decoder_dim=64,
        encoder=_mimi(hidden_size=32, num_filters=4, codebook_dim=16, vector_quantization_hidden_dimension=16,
                      num_quantizers=20, upsample_groups=32, num_hidden_layers=1, intermediate_size=64,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=16),
    )


PRESETS = {"tiny": tiny_config, "full": full_config}


def preset(size: str) -> CodecConfig:
    """`tiny` or `full`."""
    if size not in PRESETS:
        raise ValueError(f"size must be one of {sorted(PRESETS)}, got {size!r}")
    return PRESETS[size]()


__all__ = ["CodecConfig", "MODEL_TYPE", "full_config", "tiny_config", "preset"]
