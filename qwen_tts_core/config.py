"""Frozen configuration dataclasses read from (and written to) the official `config.json`.

No Hugging Face `PretrainedConfig` here: `TTSConfig.from_json(path)` reads the plain JSON of an official checkpoint,
`to_json_dict()` writes one that both this engine and the official package load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import shown
from .types import SAMPLING_FIELDS, SamplingParams

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

# Bounds far beyond any Qwen3-TTS model (the 1.7B: 28 layers, hidden 2048, 32768 positions), so a damaged or hostile
# config.json fails here instead of building a million layers or a 32 GB RoPE table.
MAX_LAYERS = 256
MAX_WIDTH = 1 << 16          # hidden / intermediate / text hidden sizes
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_VOCAB = 1 << 22          # text vocab 151936, codec vocab 3072
MAX_POSITIONS = 1 << 20      # max_position_embeddings (official: 32768 talker, 65536 code predictor)
MAX_CODE_GROUPS = 64         # codebooks per frame (official: 16)
# The talker's rotary table is built at load for every position: [max_position_embeddings, 2, head_dim] fp32 (plus a
# few temporaries of its size). Official: 32768 * 128 = 2**22 (a 32 MiB table); at this bound 128 MiB. The code
# predictor's table has num_code_groups + 1 rows, whatever its max_position_embeddings says.
MAX_ROPE_TABLE = 1 << 24     # talker max_position_embeddings * head_dim
MIN_ROPE_THETA = 1.0         # a smaller RoPE base makes the table non-finite (official: 1e6 talker, 1e4 codec)
_MISSING = object()


def check_int(value: Any, name: str, lo: int = 1, hi: int | None = None) -> int:
    """`value` if it is an int (not a bool) in [lo, hi]; else a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {shown(value)}")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {shown(value)}" if hi is not None
                         else f"{name} must be >= {lo}, got {shown(value)}")
    return value


def check_float(value: Any, name: str, lo: float = 0.0, hi: float = float("inf")) -> float:
    """float(`value`) if it is a finite number with lo < value <= hi; else a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {shown(value)}")
    if not lo < value <= hi:
        raise ValueError(f"{name} must be in ({lo}, {hi}], got {shown(value)}")
    return float(value)


def check_rope_theta(value: Any, name: str) -> float:
    """float(`value`) if it is a finite RoPE base >= MIN_ROPE_THETA; else a ValueError naming `name` (a tiny base
    such as 1e-50 passes "positive and finite" but gives inverse frequencies of inf and a table of NaN)."""
    theta = check_float(value, name, 0.0)
    if theta < MIN_ROPE_THETA:
        raise ValueError(f"{name} must be >= {MIN_ROPE_THETA:g} (the RoPE base), got {shown(value)}")
    return theta


def check_plain_rope(value: Any, name: str) -> dict[str, Any]:
    """`value` (a config's rope_scaling / rope_parameters) as a dict, if it is null or asks for the plain RoPE this
    engine implements (rope_type 'default'); else a ValueError naming `name`. A scaled RoPE (linear, dynamic, yarn,
    ...) changes every position's rotation: the official package applies it, so ignoring it changed the audio."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object or null, got {shown(value)}")
    for key in ("rope_type", "type"):  # "type": the older transformers spelling
        if value.get(key, "default") != "default":
            raise ValueError(f"{name}.{key} must be 'default' (the only RoPE this engine implements), "
                             f"got {shown(value[key])}")
    if "rope_theta" in value:
        check_rope_theta(value["rope_theta"], f"{name}.rope_theta")
    return value


def check_implemented(d: dict[str, Any], where: str) -> None:
    """Refuse the fields of a transformer block's config that the official package honours and this engine does
    not implement (it would otherwise ignore them and make other audio): an activation other than SiLU, a scaled
    RoPE, sliding-window attention. The published checkpoints use none of them."""
    act = d.get("hidden_act")
    if act is not None and act not in ("silu", "swish"):   # transformers' "swish" is SiLU
        raise ValueError(f"{where}.hidden_act must be 'silu' (the only activation this engine implements), "
                         f"got {shown(act)}")
    for key in ("rope_scaling", "rope_parameters"):
        check_plain_rope(d.get(key), f"{where}.{key}")
    window = d.get("use_sliding_window")
    if window not in (None, False):
        raise ValueError(f"{where}.use_sliding_window must be false (this engine attends to every earlier position), "
                         f"got {shown(window)}")
    layers = d.get("layer_types")
    if layers is not None and (not isinstance(layers, list) or any(x != "full_attention" for x in layers)):
        raise ValueError(f"{where}.layer_types must list only 'full_attention' (this engine attends to every earlier "
                         f"position), got {shown(layers)}")


def _get(d: dict[str, Any], key: str, where: str, default: Any = _MISSING) -> Any:
    if d.get(key) is None:
        if default is _MISSING:
            raise ValueError(f"{where}.{key} is missing")
        return default
    return d[key]


def _section(d: dict[str, Any], key: str, where: str, required: bool = True) -> dict[str, Any]:
    v = d.get(key)
    if v is None and not required:
        return {}
    if not isinstance(v, dict):
        raise ValueError(f"{where}{key} must be a JSON object, got {shown(v)}")
    return v


ROPE_THETA_DEFAULT = 10000.0   # the official config classes' default when config.json has none (published: 1e6)


def _rope_theta(d: dict[str, Any], where: str) -> float:
    """A block's RoPE base: `rope_theta`, else the one in `rope_parameters` (where transformers 5 writes it), else the
    official default. Two different values are refused: which one the official package would read depends on the
    transformers version that loads it."""
    top, nested = d.get("rope_theta"), (d.get("rope_parameters") or {}).get("rope_theta")
    top = None if top is None else check_rope_theta(top, f"{where}.rope_theta")
    nested = None if nested is None else check_rope_theta(nested, f"{where}.rope_parameters.rope_theta")
    if top is not None and nested is not None and top != nested:
        raise ValueError(f"{where}.rope_theta ({top:g}) and {where}.rope_parameters.rope_theta ({nested:g}) differ; "
                         "keep one")
    return top if top is not None else nested if nested is not None else ROPE_THETA_DEFAULT


def _stack_kwargs(d: dict[str, Any], where: str) -> dict[str, Any]:
    """The DecoderStackConfig fields of a talker / code predictor block, type- and range-checked."""
    check_implemented(d, where)
    kw: dict[str, Any] = {
        "hidden_size": check_int(_get(d, "hidden_size", where), f"{where}.hidden_size", 1, MAX_WIDTH),
        "intermediate_size": check_int(_get(d, "intermediate_size", where), f"{where}.intermediate_size", 1,
                                       MAX_WIDTH),
        "num_hidden_layers": check_int(_get(d, "num_hidden_layers", where), f"{where}.num_hidden_layers", 1,
                                       MAX_LAYERS),
        "num_attention_heads": check_int(_get(d, "num_attention_heads", where), f"{where}.num_attention_heads", 1,
                                         MAX_HEADS),
        "num_key_value_heads": check_int(_get(d, "num_key_value_heads", where), f"{where}.num_key_value_heads", 1,
                                         MAX_HEADS),
        "head_dim": check_int(_get(d, "head_dim", where), f"{where}.head_dim", 2, MAX_HEAD_DIM),
        "rms_norm_eps": check_float(_get(d, "rms_norm_eps", where, 1e-6), f"{where}.rms_norm_eps", 0.0, 1.0),
        "rope_theta": _rope_theta(d, where),
        "max_position_embeddings": check_int(_get(d, "max_position_embeddings", where, 32768),
                                             f"{where}.max_position_embeddings", 1, MAX_POSITIONS),
    }
    bias = _get(d, "attention_bias", where, False)
    if not isinstance(bias, bool):
        raise ValueError(f"{where}.attention_bias must be true or false, got {shown(bias)}")
    kw["attention_bias"] = bias
    if kw["head_dim"] % 2:
        raise ValueError(f"{where}.head_dim must be even (rotary embedding), got {kw['head_dim']}")
    if kw["num_attention_heads"] % kw["num_key_value_heads"]:
        raise ValueError(f"{where}.num_attention_heads ({kw['num_attention_heads']}) must be a multiple of "
                         f"num_key_value_heads ({kw['num_key_value_heads']})")
    return kw


def _id_map(d: dict[str, Any], key: str, where: str, vocab: int) -> dict[str, int]:
    m = d.get(key) or {}
    if not isinstance(m, dict):
        raise ValueError(f"{where}.{key} must be a JSON object (name -> codec id), got {shown(m)}")
    return by_lower({k: check_int(v, f"{where}.{key}[{k!r}]", 0, vocab - 1) for k, v in m.items()},
                    f"{where}.{key}")


def by_lower(m: dict[Any, Any], name: str) -> dict[str, Any]:
    """A name -> value map keyed in lower case, as names are looked up (a request's `Ryan` is `ryan`). Names that
    differ only in case: the one written in lower case wins, as the official package (which looks up `x.lower()`)
    reads it; with none so written and different values, which one is meant is unknown: a ValueError naming `name`."""
    out: dict[str, Any] = {}
    for k, v in m.items():
        low = str(k).lower()
        if low in m:
            out[low] = m[low]
        elif out.setdefault(low, v) != v:
            raise ValueError(f"{name} names {low!r} in several cases with different values ({shown(out[low])}, "
                             f"{shown(v)}) and none in lower case; keep one")
    return out


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

    @property
    def languages(self) -> list[str]:
        """The languages a request may name: "auto" and the codec's languages; a dialect is not one (it comes with
        its speaker), as in the reference."""
        return sorted(["auto"] + [k for k in self.talker.codec_language_id if "dialect" not in k])

    @classmethod
    def from_json(cls, path: str | Path) -> TTSConfig:
        """Read and check config.json (and, when `speech_tokenizer/config.json` is beside it, that the codec matches
        the talker). Raises ValueError naming the file and the field."""
        from .checkpoint.weights import read_json

        path = Path(path)
        cfg = cls.from_dict(read_json(path), source=str(path))
        codec_json = path.parent / "speech_tokenizer" / "config.json"
        if codec_json.is_file():
            from .codec.config import CodecConfig

            check_codec_matches(cfg, CodecConfig.from_json(codec_json), f"{path} and {codec_json}")
        return cfg

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> TTSConfig:
        """Build from parsed config.json; every field is type- and range-checked (ValueError "<source>: <field> ...")."""
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: must hold a JSON object, got {type(raw).__name__}")
        try:
            return cls._from_dict(raw)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def _from_dict(cls, raw: dict[str, Any]) -> TTSConfig:
        if raw.get("model_type") not in (None, "qwen3_tts"):
            raise ValueError(f"model_type must be 'qwen3_tts', got {shown(raw.get('model_type'))}")
        if "talker_config" not in raw:
            raise ValueError("no talker_config: not a Qwen3-TTS checkpoint")
        t = _section(raw, "talker_config", "")
        cp = _section(t, "code_predictor_config", "talker_config.")
        w, wcp = "talker_config", "talker_config.code_predictor_config"
        cp_cfg = CodePredictorConfig(
            **_stack_kwargs(cp, wcp),
            vocab_size=check_int(_get(cp, "vocab_size", wcp, 2048), f"{wcp}.vocab_size", 1, MAX_VOCAB),
            num_code_groups=check_int(_get(cp, "num_code_groups", wcp, 16), f"{wcp}.num_code_groups", 2,
                                      MAX_CODE_GROUPS),
        )
        vocab = check_int(_get(t, "vocab_size", w, 3072), f"{w}.vocab_size", 1025, MAX_VOCAB)
        codebook = vocab - 1024
        specials = {k: check_int(_get(t, k, w, d), f"{w}.{k}", codebook, vocab - 1)  # never an audio code
                    for k, d in CODEC_SPECIAL_IDS.items()}
        languages = _id_map(t, "codec_language_id", w, vocab)
        dialects = t.get("spk_is_dialect") or {}
        if not isinstance(dialects, dict):
            raise ValueError(f"{w}.spk_is_dialect must be a JSON object, got {shown(dialects)}")
        for k, v in dialects.items():
            if v not in (False, None) and (not isinstance(v, str) or v.lower() not in languages):
                raise ValueError(f"{w}.spk_is_dialect[{k!r}] must be false or a codec_language_id name, "
                                 f"got {shown(v)}")
        mrope = check_plain_rope(t.get("rope_scaling"), f"{w}.rope_scaling").get("mrope_section", (24, 20, 20))
        if not isinstance(mrope, list | tuple) or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_HEAD_DIM for v in mrope):
            raise ValueError(f"{w}.rope_scaling.mrope_section must be a list of non-negative integers, "
                             f"got {shown(mrope)}")
        text_vocab = check_int(_get(t, "text_vocab_size", w, 151936), f"{w}.text_vocab_size", 1, MAX_VOCAB)
        stack = _stack_kwargs(t, w)
        rows, width = stack["max_position_embeddings"], stack["head_dim"]
        if rows * width > MAX_ROPE_TABLE:
            raise ValueError(f"{w}.max_position_embeddings * {w}.head_dim ({rows} * {width} = {rows * width}) must be "
                             f"<= {MAX_ROPE_TABLE}: the talker's rotary table has a row of head_dim for every position")
        talker = TalkerConfig(
            **stack,
            vocab_size=vocab,
            text_hidden_size=check_int(_get(t, "text_hidden_size", w, 2048), f"{w}.text_hidden_size", 1, MAX_WIDTH),
            text_vocab_size=text_vocab,
            num_code_groups=check_int(_get(t, "num_code_groups", w, 16), f"{w}.num_code_groups", 2, MAX_CODE_GROUPS),
            **specials,
            spk_id=_id_map(t, "spk_id", w, vocab),
            # a dialect is checked lower-case against codec_language_id (whose names are lower-cased): kept so
            spk_is_dialect=by_lower({k: v.lower() if isinstance(v, str) else v for k, v in dialects.items()},
                                    f"{w}.spk_is_dialect"),
            codec_language_id=languages,
            mrope_section=tuple(mrope),
            code_predictor=cp_cfg,
        )
        if cp_cfg.num_code_groups != talker.num_code_groups:
            raise ValueError(f"{wcp}.num_code_groups ({cp_cfg.num_code_groups}) must equal {w}.num_code_groups "
                             f"({talker.num_code_groups})")
        if cp_cfg.vocab_size != talker.codebook_size:
            raise ValueError(f"{wcp}.vocab_size ({cp_cfg.vocab_size}) must equal the talker's codebook size "
                             f"{w}.vocab_size - 1024 ({talker.codebook_size})")
        model_type = raw.get("tts_model_type", "custom_voice")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"tts_model_type must be one of {MODEL_TYPES}, got {shown(model_type)}")
        speaker_encoder = _section(raw, "speaker_encoder_config", "", required=False)
        if model_type == "base":
            from .speaker.config import SpeakerEncoderConfig

            try:
                enc = SpeakerEncoderConfig.from_dict(speaker_encoder)
            except (ValueError, TypeError) as e:
                raise ValueError(f"speaker_encoder_config: {e}") from None
            if enc.enc_dim != talker.hidden_size:
                raise ValueError(f"speaker_encoder_config.enc_dim ({enc.enc_dim}) must equal "
                                 f"{w}.hidden_size ({talker.hidden_size}): the x-vector is a codec-track embedding")
        for key in ("tts_model_size", "tokenizer_type"):
            if not isinstance(raw.get(key, ""), str | int | float):
                raise ValueError(f"{key} must be a string, got {shown(raw.get(key))}")
        return cls(
            talker=talker,
            speaker_encoder=dict(speaker_encoder),
            tts_model_type=model_type,
            tts_model_size=str(raw.get("tts_model_size", "")),
            tokenizer_type=str(raw.get("tokenizer_type", "qwen3_tts_tokenizer_12hz")),
            **{k: check_int(raw[k], k, 0, text_vocab - 1) for k in TEXT_SPECIAL_IDS if raw.get(k) is not None},
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


def check_codec_matches(cfg: TTSConfig, codec: Any, where: str) -> None:
    """The talker and the speech tokenizer (a CodecConfig) must agree: one code per codebook per frame
    (num_code_groups == num_quantizers) and the same codebook size (talker vocab_size - 1024, code predictor
    vocab_size, codec codebook_size)."""
    t = cfg.talker
    if t.num_code_groups != codec.num_quantizers:
        raise ValueError(f"{where}: talker_config.num_code_groups ({t.num_code_groups}) must equal the speech "
                         f"tokenizer's decoder_config.num_quantizers ({codec.num_quantizers})")
    if t.codebook_size != codec.codebook_size:
        raise ValueError(f"{where}: the talker's codebook size (talker_config.vocab_size - 1024 = {t.codebook_size}) "
                         f"must equal the speech tokenizer's decoder_config.codebook_size ({codec.codebook_size})")


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


def sampling_defaults_from_generation_config(raw: Any, source: str = "generation_config.json") -> dict[str, Any]:
    """The sampling keys of generation_config.json that SamplingParams understands, checked as SamplingParams checks
    a request (a bad value is the checkpoint's fault: ValueError "<source>: <field>: ..."). null: the key is left out
    (the hard default applies)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: must hold a JSON object, got {type(raw).__name__}")
    out = {k: raw[k] for k in SAMPLING_FIELDS if raw.get(k) is not None}
    try:
        SamplingParams(**out)
    except ValueError as e:  # RequestError names the field
        raise ValueError(f"{source}: {e}") from None
    return out


def generation_defaults(path: str | Path) -> dict[str, Any]:
    """`sampling_defaults_from_generation_config` of the file at `path`; {} when there is none. A file that is not
    a JSON object, or holds a bad value, is a ValueError naming it."""
    from .checkpoint.weights import read_json

    path = Path(path)
    if not path.is_file():
        return {}
    return sampling_defaults_from_generation_config(read_json(path), source=str(path))


def default_generation_config() -> dict[str, Any]:
    return dict(do_sample=True, top_k=50, top_p=1.0, temperature=0.9, repetition_penalty=1.05,
                subtalker_dosample=True, subtalker_top_k=50, subtalker_top_p=1.0, subtalker_temperature=0.9,
                max_new_tokens=8192)


__all__ = ["TTSConfig", "TalkerConfig", "CodePredictorConfig", "make_config"]
