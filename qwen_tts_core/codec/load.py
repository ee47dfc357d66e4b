"""Load a `speech_tokenizer/` folder (official format, safetensors only) into a `Codec`."""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..checkpoint.weights import check_materialised, load_module, read_tensors
from ..model.layers import weight_key
from .config import CodecConfig
from .decoder import CodecDecoder, check_codes
from .encoder import MimiEncoder, check_encoder_state
from .state import CodecStreamState
from .transformer import rope_inv_freq

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"


def resolve_dir(dir_or_path: str | Path) -> Path:
    """The speech tokenizer folder for: that folder, a checkpoint folder holding `speech_tokenizer/`, or a file in
    the folder (e.g. its model.safetensors)."""
    p = Path(dir_or_path)
    if p.is_file():
        p = p.parent
    if (p / "speech_tokenizer" / "config.json").is_file():
        p = p / "speech_tokenizer"
    if not (p / "config.json").is_file() or not (p / WEIGHTS).is_file():
        raise ValueError(f"dir_or_path must be a speech tokenizer folder with config.json and {WEIGHTS} "
                         f"(or a checkpoint folder holding speech_tokenizer/), got {str(dir_or_path)!r}")
    return p


def _rebuild_buffers_(decoder: CodecDecoder, device: torch.device | str, dtype: torch.dtype) -> None:
    """The decoder's one buffer outside its state_dict, left on the meta device by a meta build: the sliding-window
    transformer's RoPE inverse frequencies, computed as `SlidingWindowTransformer.__init__` does (fp32 on the CPU),
    then moved and cast as `decoder.to(device, dtype)` moves a CPU-built decoder's."""
    with torch.device("cpu"):
        inv_freq = rope_inv_freq(decoder.cfg)
    decoder.pre_transformer.register_buffer("inv_freq", inv_freq.to(device=device, dtype=dtype), persistent=False)


def load_decoder(cfg: CodecConfig, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> CodecDecoder:
    """A CodecDecoder of `cfg` holding the `decoder.*` tensors (prefix stripped). It is built on the meta device and
    filled by `load_module`: any missing, unexpected, mis-shaped, non-float or non-finite tensor is a ValueError
    naming it before anything of the config's size is allocated."""
    with torch.device("meta"):
        decoder = CodecDecoder(cfg)
    load_module(decoder, tensors, "speech tokenizer", device, dtype, prefix="decoder.")
    _rebuild_buffers_(decoder, device, dtype)
    check_materialised(decoder, "speech tokenizer decoder")
    return decoder.eval()


class Codec:
    """The 12Hz codec: `decoder` (our streaming decoder) and a lazily built Mimi `encoder`.

    Attributes:
        cfg: CodecConfig.
        decoder: CodecDecoder on `device` in `dtype`.
        sample_rate: 24000.
        samples_per_frame: 1920.
    """

    def __init__(self, cfg: CodecConfig, decoder: CodecDecoder, weights_path: Path | None = None) -> None:
        self.cfg = cfg
        self.decoder = decoder
        self.sample_rate = cfg.sample_rate
        self.samples_per_frame = cfg.samples_per_frame
        self._weights_path = weights_path
        self._encoder: MimiEncoder | None = None
        self._decoders: dict[torch.dtype, tuple[tuple, CodecDecoder]] = {}  # dtype -> (source weights' key, copy)
        self._decoders_lock = threading.Lock()   # also guards the encoder's first build

    @property
    def device(self) -> torch.device:
        return self.decoder.pre_conv.conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.pre_conv.conv.weight.dtype

    def decoder_in(self, dtype: torch.dtype | None) -> CodecDecoder:
        """The decoder computing in `dtype` (None: the codec's own): a converted copy, shared by every caller (engines
        on one model hold one copy, not one each; its weights stay warm across engines). Made again when the codec's
        weights changed since (load_state_dict, in-place edits): callers from then on get the new weights; a caller
        holding the old copy keeps it."""
        if dtype is None or dtype == self.dtype:
            return self.decoder
        key = tuple(weight_key(p) for p in self.decoder.parameters())
        with self._decoders_lock:
            held = self._decoders.get(dtype)
            if held is None or held[0] != key:
                with torch.inference_mode(False):   # normal tensors, whoever asks: packed products can follow them
                    held = self._decoders[dtype] = (key, copy.deepcopy(self.decoder).to(dtype).eval())
            return held[1]

    @property
    def encoder(self) -> MimiEncoder:
        """The Mimi encoder (built and loaded on first use; imports transformers). Built with torch's global random
        generator forked: the modules' initial weights (overwritten by the checkpoint's) drew from it, so the first
        seeded voice-clone call after `torch.manual_seed` sampled other codes than the reference and than the same
        call repeated. Built once, whichever threads ask."""
        with self._decoders_lock:
            if self._encoder is None:
                if self._weights_path is None:
                    raise ValueError("this Codec was built without a checkpoint path, so it has no encoder weights")
                with torch.random.fork_rng(devices=[]):
                    enc = MimiEncoder(self.cfg.encoder, self.cfg.encoder_valid_num_quantizers,
                                      self.cfg.encode_downsample_rate)
                enc.load_official(read_tensors([self._weights_path], "encoder."))
                self._encoder = enc.to(device=self.device, dtype=self.dtype).eval()
        return self._encoder

    def encode(self, audios: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """float32 mono 24 kHz waveforms -> codes Long [ceil(len/1920), 16] each (CPU tensors)."""
        if isinstance(audios, np.ndarray) and audios.ndim == 1:
            raise ValueError("audios must be a list of 1-D waveforms, got a single array")
        return self.encoder.encode(list(audios))

    @torch.inference_mode()
    def decode(self, codes: Sequence[torch.Tensor] | torch.Tensor) -> list[np.ndarray]:
        """Offline decode of several utterances.

        Args:
            codes: list of Long [T_i, 16] (as `encode` returns), or one Long [B, 16, T] batch.

        Returns:
            float32 waveforms [T_i * 1920] in [-1, 1].
        """
        q = self.cfg.num_quantizers
        if isinstance(codes, torch.Tensor):
            check_codes(codes, q, self.cfg.codebook_size)
            wav = self.decoder.decode(codes.to(self.device), check=False)
            return [w.float().cpu().numpy() for w in wav]
        items = list(codes)
        if not items:
            return []
        lengths = []
        for i, c in enumerate(items):
            if not isinstance(c, torch.Tensor) or c.dim() != 2 or c.shape[1] != q:
                shape = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
                raise ValueError(f"codes[{i}] must be a LongTensor [T, {q}], got {shape}")
            lengths.append(c.shape[0])
        batch = torch.zeros(len(items), q, max(lengths), dtype=torch.long)
        for i, c in enumerate(items):
            batch[i, :, : c.shape[0]] = c.transpose(0, 1)
        check_codes(torch.cat([c.reshape(-1, q) for c in items]).T.unsqueeze(0), q, self.cfg.codebook_size)
        wav = self.decoder.decode(batch.to(self.device), check=False).float().cpu()
        spf = self.samples_per_frame
        return [wav[i, : n * spf].numpy() for i, n in enumerate(lengths)]

    def new_stream(self, batch_size: int = 1) -> CodecStreamState:
        """A fresh streaming state for `batch_size` rows."""
        return self.decoder.new_state(batch_size)

    @torch.no_grad()
    def decode_chunk(self, codes: torch.Tensor, state: CodecStreamState, check: bool = True) -> torch.Tensor:
        """codes Long [B, 16, t] -> float [B, t*1920] (the samples of exactly these frames); advances `state`."""
        return self.decoder.decode_chunk(codes, state, check=check)


@torch.inference_mode(False)   # normal tensors under inference mode too (version counters: see Qwen3TTSModel)
def load_codec(dir_or_path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, encoder: bool = True) -> Codec:
    """Load a speech tokenizer folder (see `resolve_dir`) for decoding (and lazily, encoding). The encoder is built
    at its first use; its config is checked here, and with `encoder` (a model that clones voices) its `encoder.*`
    tensors too (names, shapes, finite: this builds transformers' MimiModel on the meta device); without, at its
    first use."""
    folder = resolve_dir(dir_or_path)
    cfg = CodecConfig.from_json(folder / "config.json")
    weights = folder / WEIGHTS
    decoder = load_decoder(cfg, read_tensors([weights], "decoder."), device, dtype)
    if encoder:
        check_encoder_state(cfg.encoder, read_tensors([weights], "encoder."), str(folder / "config.json"))
    logger.info("loaded codec decoder from %s (%s, %s)", folder, device, dtype)
    return Codec(cfg, decoder, weights)
