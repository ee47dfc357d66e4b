"""Random-weight speech tokenizers in the official on-disk format (for tests and benchmarks; no downloads).

`write_random_speech_tokenizer(out_dir)` writes `config.json`, `model.safetensors` (`encoder.*` Mimi names as
transformers 4.57 / the official checkpoint spell them, `decoder.*`) and `preprocessor_config.json`.

Initialisation keeps activations at their scale (the HF defaults would make the decoder ignore the codes and the
clamp saturate): fan-in scaled weights, codebooks with real spread (`cluster_usage` in [0.5, 2]), non-trivial
SnakeBeta/LayerScale/ConvNeXt gamma, and the last decoder conv rescaled so the waveform has RMS ~0.2 and zero mean.
Encoder codebook vectors all have nearly the same norm, so each code is picked by the direction of the latent:
different audio gives different codes whatever the latent scale. No transformers import here (tiny builds fast).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .config import CodecConfig, preset
from .decoder import CodecDecoder
from .layers import CausalTransConv

logger = logging.getLogger(__name__)

TARGET_RMS = 0.2
PREPROCESSOR_CONFIG: dict[str, Any] = {
    "feature_extractor_type": "EncodecFeatureExtractor",
    "feature_size": 1,
    "sampling_rate": 24000,
    "padding_side": "right",
    "padding_value": 0.0,
    "return_attention_mask": True,
    "chunk_length_s": None,
    "overlap": None,
}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _normal(shape: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * std


def _uniform(shape: tuple[int, ...], lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=gen)


def _fan_in(shape: tuple[int, ...], stride: int | None = None) -> int:
    if stride is not None:  # ConvTranspose1d weight [in, out, k]: each output sample sums in * k/stride taps
        return shape[0] * max(1, shape[2] // stride)
    return math.prod(shape[1:])


# ---- decoder --------------------------------------------------------------------------------------------------
@torch.no_grad()
def init_decoder_(decoder: CodecDecoder, seed: int = 0) -> None:
    """Fill every decoder parameter with well-scaled random values, then calibrate the output level."""
    gen = torch.Generator().manual_seed(seed)
    cfg = decoder.cfg
    strides = {f"{n}.conv.weight": m.stride for n, m in decoder.named_modules() if isinstance(m, CausalTransConv)}
    for name, p in decoder.named_parameters():
        shape = tuple(p.shape)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "cluster_usage":
            value = _uniform(shape, 0.5, 2.0, gen)
        elif leaf == "embedding_sum":
            continue  # set below, once cluster_usage is known
        elif leaf in ("alpha", "beta"):
            value = _normal(shape, 0.3, gen)
        elif leaf in ("scale", "gamma"):
            value = _uniform(shape, 0.1, 0.5, gen)
        elif "norm" in name and leaf == "weight":
            value = 1.0 + _normal(shape, 0.1, gen)
        elif leaf == "bias":
            value = _normal(shape, 0.02, gen)
        else:
            std = 1.0 / math.sqrt(_fan_in(shape, strides.get(name)))
            if name.endswith("conv2.conv.weight"):
                std *= 0.3  # residual-unit output branch
            value = _normal(shape, std, gen)
        p.copy_(value.to(p.dtype))
    for split, n in (("rvq_first", 1), ("rvq_rest", cfg.num_quantizers - 1)):
        for holder in getattr(decoder.quantizer, split).vq.layers:
            cb = holder._codebook
            vec = _normal(tuple(cb.embedding_sum.shape), 1.0 / math.sqrt(n), gen)
            cb.embedding_sum.copy_((vec * cb.cluster_usage.float()[:, None]).to(cb.embedding_sum.dtype))
    calibrate_output_(decoder, seed)


@torch.no_grad()
def calibrate_output_(decoder: CodecDecoder, seed: int = 0, frames: int = 12) -> None:
    """Rescale the last conv so that random codes give a zero-mean waveform of RMS `TARGET_RMS` before the clamp."""
    cfg = decoder.cfg
    gen = torch.Generator().manual_seed(seed + 1)
    last = decoder.decoder[-1].conv
    last.bias.zero_()
    codes = torch.randint(0, cfg.codebook_size, (2, cfg.num_quantizers, frames), generator=gen)
    codes = codes.to(last.weight.device)
    wav = decoder.forward_unclamped(codes, decoder.new_state(2)).float()
    mean, std = wav.mean().item(), wav.std().item()
    if not math.isfinite(std) or std <= 0:
        raise RuntimeError(f"decoder calibration failed: output std {std}")
    gain = TARGET_RMS / std
    last.weight.mul_(gain)
    last.bias.fill_(-mean * gain)
    logger.debug("decoder output calibrated: raw mean %.4g std %.4g gain %.4g", mean, std, gain)


# ---- encoder (Mimi) -------------------------------------------------------------------------------------------
def mimi_encoder_shapes(mimi: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Names (official, without the `encoder.` prefix) and shapes of the Mimi encoder-side tensors."""
    g = mimi.get
    nf, hidden = int(g("num_filters", 64)), int(g("hidden_size", 512))
    ratios = list(g("upsampling_ratios", [8, 6, 5, 4]))
    out: dict[str, tuple[int, ...]] = {}

    def conv(idx: int, c_out: int, c_in: int, k: int, bias: bool = True, prefix: str = "encoder.layers") -> None:
        out[f"{prefix}.{idx}.conv.weight"] = (c_out, c_in, k)
        if bias:
            out[f"{prefix}.{idx}.conv.bias"] = (c_out,)

    conv(0, nf, int(g("audio_channels", 1)), int(g("kernel_size", 7)))
    idx, mult = 1, 1
    res_k, compress = int(g("residual_kernel_size", 3)), int(g("compress", 2))
    if g("use_conv_shortcut", False):
        raise ValueError("use_conv_shortcut=True is not supported by the random builder")
    for ratio in reversed(ratios):
        dim = nf * mult
        for _ in range(int(g("num_residual_layers", 1))):
            out[f"encoder.layers.{idx}.block.1.conv.weight"] = (dim // compress, dim, res_k)
            out[f"encoder.layers.{idx}.block.1.conv.bias"] = (dim // compress,)
            out[f"encoder.layers.{idx}.block.3.conv.weight"] = (dim, dim // compress, 1)
            out[f"encoder.layers.{idx}.block.3.conv.bias"] = (dim,)
            idx += 1
        idx += 1  # ELU
        conv(idx, dim * 2, dim, 2 * ratio)
        idx += 1
        mult *= 2
    idx += 1  # ELU
    conv(idx, hidden, nf * mult, int(g("last_kernel_size", 3)))
    heads, kv = int(g("num_attention_heads", 8)), int(g("num_key_value_heads", 8))
    hd = int(g("head_dim") or hidden // heads)
    inter = int(g("intermediate_size", 2048))
    for i in range(int(g("num_hidden_layers", 8))):
        p = f"encoder_transformer.layers.{i}"
        out[f"{p}.self_attn.q_proj.weight"] = (heads * hd, hidden)
        out[f"{p}.self_attn.k_proj.weight"] = (kv * hd, hidden)
        out[f"{p}.self_attn.v_proj.weight"] = (kv * hd, hidden)
        out[f"{p}.self_attn.o_proj.weight"] = (hidden, heads * hd)
        out[f"{p}.mlp.fc1.weight"] = (inter, hidden)
        out[f"{p}.mlp.fc2.weight"] = (hidden, inter)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{p}.{norm}.weight"] = (hidden,)
            out[f"{p}.{norm}.bias"] = (hidden,)
        out[f"{p}.self_attn_layer_scale.scale"] = (hidden,)
        out[f"{p}.mlp_layer_scale.scale"] = (hidden,)
    sr, frame_rate = int(g("sampling_rate", 24000)), float(g("frame_rate", 12.5))
    stride = int(math.ceil(sr / math.prod(ratios)) / frame_rate)
    out["downsample.conv.weight"] = (hidden, hidden, 2 * stride)
    cb_dim, vq_dim = int(g("codebook_dim", 256)), int(g("vector_quantization_hidden_dimension", 256))
    n_sem, n_q, size = int(g("num_semantic_quantizers", 1)), int(g("num_quantizers", 32)), int(g("codebook_size", 2048))
    for split, n in (("semantic", n_sem), ("acoustic", n_q - n_sem)):
        p = f"quantizer.{split}_residual_vector_quantizer"
        for i in range(n):
            out[f"{p}.layers.{i}.codebook.initialized"] = (1,)
            out[f"{p}.layers.{i}.codebook.cluster_usage"] = (size,)
            out[f"{p}.layers.{i}.codebook.embed_sum"] = (size, cb_dim)
        if vq_dim != hidden:
            out[f"{p}.input_proj.weight"] = (vq_dim, hidden, 1)
            out[f"{p}.output_proj.weight"] = (hidden, vq_dim, 1)
    return out


def random_encoder_tensors(mimi: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Well-scaled random Mimi encoder tensors under their official names (without the `encoder.` prefix)."""
    gen = torch.Generator().manual_seed(seed + 7)
    out: dict[str, torch.Tensor] = {}
    shapes = mimi_encoder_shapes(mimi)
    usage: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "initialized":
            out[name] = torch.ones(shape)
        elif leaf == "cluster_usage":
            out[name] = usage[name] = _uniform(shape, 0.5, 2.0, gen)
        elif leaf == "embed_sum":
            continue
        elif leaf == "scale":
            out[name] = _uniform(shape, 0.1, 0.3, gen)
        elif "layernorm" in name:
            out[name] = (1.0 + _normal(shape, 0.1, gen)) if leaf == "weight" else _normal(shape, 0.05, gen)
        elif leaf == "bias":
            out[name] = _normal(shape, 0.02, gen)
        else:
            gain = 1.5 if "encoder.layers" in name else 1.0  # ELU shrinks the signal a little
            out[name] = _normal(shape, gain / math.sqrt(math.prod(shape[1:])), gen)
    for name, shape in shapes.items():
        if name.endswith("embed_sum"):
            direction = torch.randn(shape, generator=gen)
            direction = direction / direction.norm(dim=1, keepdim=True)
            radius = 1.0 + _normal((shape[0], 1), 0.01, gen)
            u = usage[name.replace("embed_sum", "cluster_usage")]
            out[name] = direction * radius * u[:, None]
    return {k: out[k] for k in shapes}


# ---- writer ---------------------------------------------------------------------------------------------------
def random_decoder(cfg: CodecConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> CodecDecoder:
    """A calibrated random decoder in memory (fp32 init and calibration, then cast)."""
    decoder = CodecDecoder(cfg).eval()
    init_decoder_(decoder, seed)
    return decoder.to(dtype)


def write_random_speech_tokenizer(out_dir: Path, size: str = "tiny", seed: int = 0,
                                  dtype: torch.dtype = torch.float32,
                                  cfg: CodecConfig | None = None) -> Path:
    """Write a random `speech_tokenizer/` folder (config.json, model.safetensors, preprocessor_config.json).

    Args:
        out_dir: folder to create / overwrite.
        size: "tiny" or "full" preset (ignored when `cfg` is given).
        seed: same seed -> identical files.
        dtype: float32, bfloat16 or float16 for the stored tensors.
        cfg: explicit config instead of a preset.

    Returns:
        out_dir.
    """
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {list(_DTYPE_NAMES.values())}, got {dtype}")
    cfg = cfg if cfg is not None else preset(size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    decoder = random_decoder(cfg, seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, value in random_encoder_tensors(cfg.encoder, seed).items():
        tensors[f"encoder.{name}"] = value.to(dtype).contiguous()
    for name, value in decoder.state_dict().items():
        tensors[f"decoder.{name}"] = value.to(dtype).contiguous()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(cfg.to_json_dict(_DTYPE_NAMES[dtype]), indent=2))
    (out_dir / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    logger.info("wrote random speech tokenizer (%s) to %s", size, out_dir)
    return out_dir
