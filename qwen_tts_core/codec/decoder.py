"""The 12Hz codec decoder: codes [B, 16, T] -> waveform [B, T*1920] at 24 kHz, offline or in streaming chunks.

Parameter names equal the official `decoder.*` names of speech_tokenizer/model.safetensors (without the prefix).
Offline decode runs the streaming path with a fresh state, so both give the same samples (see state.py for why
there is no look-ahead latency).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .config import CodecConfig
from .context import ContextCache
from .layers import CausalConv, CausalTransConv, ConvNeXtBlock, DecoderBlock, SnakeBeta
from .quantizer import SplitResidualQuantizer
from .state import CodecStreamState, RowLengths
from .transformer import SlidingWindowTransformer

logger = logging.getLogger(__name__)

DEFAULT_OFFLINE_CHUNK = 64
"""Frames per internal step of offline `decode` (bounds the attention mask; any value gives the same output)."""


_MINMAX_INTS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_codes(codes: torch.Tensor, num_quantizers: int, codebook_size: int, check_range: bool = True) -> None:
    """Raise ValueError naming `codes` unless codes is an integer tensor [B, num_quantizers, T] in [0, size)."""
    if not isinstance(codes, torch.Tensor):
        raise ValueError(f"codes must be a torch.LongTensor [B, {num_quantizers}, T], got {type(codes).__name__}")
    if codes.dim() != 3 or codes.shape[1] != num_quantizers:
        raise ValueError(f"codes must have shape [B, {num_quantizers}, T] ({num_quantizers} codebooks), "
                         f"got {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.layout != torch.strided:
        raise ValueError(f"codes must be a dense tensor, got layout {codes.layout}")
    if check_range and codes.numel():
        if codes.device.type == "meta":
            raise ValueError("codes are a tensor on the meta device (they hold no values)")
        # uint16/32/64 have no min/max on CPU: compared as int64, where a uint64 past 2**63 turns negative (refused)
        wide = codes if codes.dtype in _MINMAX_INTS else codes.to(torch.int64)
        lo, hi = int(wide.min()), int(wide.max())
        if lo < 0 or hi >= codebook_size:
            raise ValueError(f"codes must lie in [0, {codebook_size - 1}], got values in [{lo}, {hi}]")


def _on(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """x as a Long tensor on `device` (untouched when it is one: no call a graph capture would take for a copy)."""
    return x if x.device == device and x.dtype == torch.long else x.to(device=device, dtype=torch.long)


class CodecDecoder(nn.Module):
    """RVQ decode -> pre_conv -> pre_transformer -> upsample (transposed conv + ConvNeXt) -> decoder convs -> clamp."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.quantizer = SplitResidualQuantizer(cfg.num_quantizers, cfg.codebook_dim, cfg.codebook_size)
        self.pre_conv = CausalConv(cfg.codebook_dim, cfg.latent_dim, kernel_size=3)
        self.pre_transformer = SlidingWindowTransformer(cfg)
        self.upsample = nn.ModuleList([
            nn.ModuleList([CausalTransConv(cfg.latent_dim, cfg.latent_dim, r, r), ConvNeXtBlock(cfg.latent_dim)])
            for r in cfg.upsampling_ratios
        ])
        blocks: list[nn.Module] = [CausalConv(cfg.latent_dim, cfg.decoder_dim, kernel_size=7)]
        for i, rate in enumerate(cfg.upsample_rates):
            blocks.append(DecoderBlock(cfg.decoder_dim // 2 ** i, cfg.decoder_dim // 2 ** (i + 1), rate))
        blocks += [SnakeBeta(cfg.output_dim), CausalConv(cfg.output_dim, 1, kernel_size=7)]
        self.decoder = nn.ModuleList(blocks)
        for name, module in self.named_modules():
            if isinstance(module, (CausalConv, CausalTransConv)):
                module.state_key = name
        self.context_cache = ContextCache()

    # ---- state ----------------------------------------------------------------------------------------------
    def new_state(self, batch_size: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> CodecStreamState:
        """A fresh streaming state for `batch_size` rows, on the decoder's device/dtype unless given."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        ref = self.pre_conv.conv.weight
        device = ref.device if device is None else torch.device(device)
        dtype = ref.dtype if dtype is None else dtype
        cfg = self.cfg
        state = CodecStreamState(positions=torch.zeros(batch_size, dtype=torch.long, device=device))
        for module in self.modules():
            if isinstance(module, CausalConv) and module.context:
                c, n = module.history_shape()
                state.conv_history[module.state_key] = torch.zeros(batch_size, c, n, device=device, dtype=dtype)
            elif isinstance(module, CausalTransConv) and module.overlap:
                c, n = module.history_shape()
                state.trans_tail[module.state_key] = torch.zeros(batch_size, c, n, device=device, dtype=dtype)
        cache = cfg.sliding_window - 1
        for _ in range(cfg.num_hidden_layers):
            shape = (batch_size, cfg.num_key_value_heads, cache, cfg.head_dim)
            state.keys.append(torch.zeros(shape, device=device, dtype=dtype))
            state.values.append(torch.zeros(shape, device=device, dtype=dtype))
        return state

    def context_state(self, codes: torch.Tensor, key: tuple | None = None) -> CodecStreamState:
        """The 1-row state after decoding `codes` (Long [R, num_quantizers], e.g. a voice-clone reference) from a
        fresh start: computed once per distinct codes and weights, then shared (see context.py). Copy it into a
        state (`scatter_`); never write to it. key: `context.codes_key(codes)`, taken where the codes are on the
        host (None: read here)."""
        if codes.dim() != 2 or codes.shape[1] != self.cfg.num_quantizers or codes.shape[0] < 1:
            raise ValueError(f"codes must be a LongTensor [frames >= 1, {self.cfg.num_quantizers}], "
                             f"got {tuple(codes.shape)}")
        return self.context_cache.state(self, codes, key)

    # ---- decode ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode_chunk(self, codes: torch.Tensor, state: CodecStreamState, check: bool = True) -> torch.Tensor:
        """Decode the next t frames of every row and advance the state.

        Args:
            codes: Long [B, num_quantizers, t], values in [0, codebook_size).
            state: from `new_state(B)`; updated in place.
            check: validate the code range (one host sync); shapes are always checked.

        Returns:
            float [B, t * samples_per_frame] in [-1, 1]: exactly the samples of these t frames.
        """
        cfg = self.cfg
        check_codes(codes, cfg.num_quantizers, cfg.codebook_size, check_range=check)
        if codes.shape[0] != state.batch_size:
            raise ValueError(f"codes has batch {codes.shape[0]} but the state has {state.batch_size} rows")
        b, _, t = codes.shape
        if t == 0:
            return torch.zeros(b, 0, device=codes.device, dtype=self.pre_conv.conv.weight.dtype)
        return self.forward_unclamped(codes, state).clamp(min=-1.0, max=1.0)

    @torch.no_grad()
    def decode_rows(self, codes: torch.Tensor, state: CodecStreamState, lengths: torch.Tensor) -> torch.Tensor:
        """Decode a right-padded chunk: row b's real frames are codes[b, :, :lengths[b]]; each row's state advances
        by exactly lengths[b] frames (0 leaves the row as it was), so rows with different amounts of pending frames
        share one call. No host sync (code values are not range-checked).

        Args:
            codes: Long [B, num_quantizers, T] (T >= 1); padding frames may hold any valid code.
            state: B rows, updated in place.
            lengths: Long [B] in [0, T] on the state's device.

        Returns:
            float [B, T * samples_per_frame]; row b's samples beyond lengths[b] * samples_per_frame are padding.
        """
        check_codes(codes, self.cfg.num_quantizers, self.cfg.codebook_size, check_range=False)
        if codes.shape[0] != state.batch_size or lengths.shape != (state.batch_size,):
            raise ValueError(f"codes {tuple(codes.shape)}, lengths {tuple(lengths.shape)} and the state's "
                             f"{state.batch_size} rows must agree")
        if codes.shape[-1] == 0:
            raise ValueError("codes must hold at least one frame")
        return self.forward_unclamped(codes, state, lengths).clamp(min=-1.0, max=1.0)

    def forward_unclamped(self, codes: torch.Tensor, state: CodecStreamState,
                          lengths: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder math without checks or the final clamp: Long [B, Q, t] (t >= 1) -> float [B, t*spf].
        lengths: Long [B] real frames per row of a right-padded chunk (see `decode_rows`); None: all t are real."""
        t = codes.shape[-1]
        codes = _on(codes, state.device)
        if lengths is not None:
            lengths = _on(lengths, state.device)
            state.valid = RowLengths(lengths, t)
        try:
            wav = self._forward(codes, state)
        finally:
            state.valid = None
        state.positions = state.positions + (t if lengths is None else lengths)
        return wav

    def _forward(self, codes: torch.Tensor, state: CodecStreamState) -> torch.Tensor:
        h = self.quantizer.decode(codes)                                   # [B, codebook_dim, t]
        h = self.pre_conv(h, state)                                        # [B, latent, t]
        h = self.pre_transformer(h.transpose(1, 2), state).transpose(1, 2)
        for trans, convnext in self.upsample:
            h = convnext(trans(h, state), state)                           # [B, latent, t*4]
        wav = self.decoder[0](h, state)
        for block in self.decoder[1:-2]:
            wav = block(wav, state)
        wav = self.decoder[-1](self.decoder[-2](wav), state)               # [B, 1, t*spf]
        return wav.squeeze(1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, chunk_frames: int = DEFAULT_OFFLINE_CHUNK,
               check: bool = True) -> torch.Tensor:
        """Offline decode: codes Long [B, num_quantizers, T] -> float [B, T * samples_per_frame].

        Runs `decode_chunk` with a fresh state over `chunk_frames`-frame pieces (the result does not depend on it).
        """
        check_codes(codes, self.cfg.num_quantizers, self.cfg.codebook_size, check_range=check)
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        state = self.new_state(codes.shape[0])
        pieces = [self.decode_chunk(codes[..., s: s + chunk_frames], state, check=False)
                  for s in range(0, codes.shape[-1], chunk_frames)]
        if not pieces:
            return torch.zeros(codes.shape[0], 0, device=state.device, dtype=self.pre_conv.conv.weight.dtype)
        return torch.cat(pieces, dim=-1)

    @torch.no_grad()
    def decode_like_reference(self, codes: torch.Tensor, chunk_size: int = 300,
                              left_context: int = 25) -> torch.Tensor:
        """The official `chunked_decode`: codes [B, Q, T] are cut into `chunk_size`-frame pieces, each decoded from
        a fresh state with `left_context` frames before it whose samples are dropped. Equals `decode` for
        T <= chunk_size; beyond that it reproduces the reference's seams (for parity checks of whole pipelines).
        """
        check_codes(codes, self.cfg.num_quantizers, self.cfg.codebook_size)
        spf = self.cfg.samples_per_frame
        pieces, start = [], 0
        while start < codes.shape[-1]:
            end = min(start + chunk_size, codes.shape[-1])
            ctx = left_context if start - left_context > 0 else start
            wav = self.decode(codes[..., start - ctx: end], check=False)
            pieces.append(wav[..., ctx * spf:])
            start = end
        if not pieces:
            return self.decode(codes, check=False)
        return torch.cat(pieces, dim=-1)
