"""Configuration of the ECAPA-TDNN speaker encoder (the `speaker_encoder_config` block of config.json)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The keys the official `Qwen3TTSSpeakerEncoderConfig.__init__` accepts; it takes no **kwargs, so config.json must
# contain nothing else in this block.
JSON_KEYS: tuple[str, ...] = (
    "mel_dim",
    "enc_dim",
    "enc_channels",
    "enc_kernel_sizes",
    "enc_dilations",
    "enc_attention_channels",
    "enc_res2net_scale",
    "enc_se_channels",
    "sample_rate",
)

_LIST_KEYS = ("enc_channels", "enc_kernel_sizes", "enc_dilations")

# Upper bounds far beyond the published encoder (channels 512/1536, kernels <= 5, dilations <= 4): it is built for
# real before its weights are read, so a hostile config must fail here. The mel front end is fixed (128 bins, 24 kHz).
_LIMITS: dict[str, int] = {
    "mel_dim": 128, "enc_dim": 1 << 16, "enc_attention_channels": 4096, "enc_res2net_scale": 64,
    "enc_se_channels": 4096, "sample_rate": 24000, "enc_channels": 8192, "enc_kernel_sizes": 31,
    "enc_dilations": 64,
}
_FIXED = {"mel_dim": 128, "sample_rate": 24000}


@dataclass(frozen=True)
class SpeakerEncoderConfig:
    """Shape of the speaker encoder. Defaults equal the official config defaults.

    Layer i of `enc_channels`/`enc_kernel_sizes`/`enc_dilations` is: 0 = the input TDNN, 1..n-2 = SE-Res2Net blocks,
    n-1 = the multi-layer feature aggregation (MFA) conv whose input is the concatenation of the SE-Res2Net outputs.
    """

    mel_dim: int = 128
    enc_dim: int = 1024
    enc_channels: tuple[int, ...] = (512, 512, 512, 512, 1536)
    enc_kernel_sizes: tuple[int, ...] = (5, 3, 3, 3, 1)
    enc_dilations: tuple[int, ...] = (1, 2, 3, 4, 1)
    enc_attention_channels: int = 128
    enc_res2net_scale: int = 8
    enc_se_channels: int = 128
    sample_rate: int = 24000

    def __post_init__(self) -> None:
        for key in _LIST_KEYS:
            value = getattr(self, key)
            if not isinstance(value, tuple):
                object.__setattr__(self, key, tuple(int(v) for v in value))
        n = len(self.enc_channels)
        if n < 3:
            raise ValueError(
                f"enc_channels needs at least 3 entries (input TDNN, >=1 SE-Res2Net block, MFA), got {n}"
            )
        if len(self.enc_kernel_sizes) != n or len(self.enc_dilations) != n:
            raise ValueError(
                "enc_channels, enc_kernel_sizes and enc_dilations must have the same length, got "
                f"{n}, {len(self.enc_kernel_sizes)}, {len(self.enc_dilations)}"
            )
        for key in ("mel_dim", "enc_dim", "enc_attention_channels", "enc_res2net_scale",
                    "enc_se_channels", "sample_rate"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        for key in _LIST_KEYS:
            if any(v < 1 for v in getattr(self, key)):
                raise ValueError(f"{key} entries must be positive integers, got {getattr(self, key)!r}")
        if any(k % 2 == 0 for k in self.enc_kernel_sizes):
            raise ValueError(f"enc_kernel_sizes must be odd, got {self.enc_kernel_sizes!r}")
        body = self.enc_channels[:-1]
        if len(set(body)) != 1:
            raise ValueError(
                "enc_channels[:-1] must all be equal (the SE-Res2Net blocks are residual), "
                f"got {self.enc_channels!r}"
            )
        if sum(self.enc_channels[1:-1]) != self.enc_channels[-1]:
            raise ValueError(
                "enc_channels[-1] must equal the sum of the SE-Res2Net channels enc_channels[1:-1] "
                f"(the MFA input is their concatenation), got {self.enc_channels!r}"
            )
        if body[0] % self.enc_res2net_scale != 0:
            raise ValueError(
                f"enc_res2net_scale must divide enc_channels[0]={body[0]}, got {self.enc_res2net_scale}"
            )

    @property
    def body_channels(self) -> int:
        """Channels of the input TDNN and of every SE-Res2Net block."""
        return self.enc_channels[0]

    @property
    def min_frames(self) -> int:
        """Fewest mel frames the encoder accepts: reflect padding needs more frames than its pad width."""
        pads = [d * (k - 1) - (d * (k - 1)) // 2 for k, d in zip(self.enc_kernel_sizes, self.enc_dilations)]
        return max(pads) + 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpeakerEncoderConfig:
        """Build from the `speaker_encoder_config` dict of config.json (missing keys take the defaults).

        Raises:
            ValueError: on keys the official config would reject.
        """
        unknown = sorted(set(d) - set(JSON_KEYS))
        if unknown:
            raise ValueError(
                f"speaker_encoder_config has unsupported keys {unknown}; allowed keys: {list(JSON_KEYS)}"
            )
        from ..config import check_int

        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in _LIST_KEYS:
                if not isinstance(value, list | tuple) or not 3 <= len(value) <= 32:
                    raise ValueError(f"{key} must be a list of 3 to 32 integers, got {value!r:.60}")
                kwargs[key] = tuple(check_int(v, f"{key}[{i}]", 1, _LIMITS[key]) for i, v in enumerate(value))
            else:
                kwargs[key] = check_int(value, key, _FIXED.get(key, 1), _LIMITS[key])
        return cls(**kwargs)

    def to_json_dict(self) -> dict[str, Any]:
        """The `speaker_encoder_config` dict for config.json: exactly the keys the official config accepts."""
        out: dict[str, Any] = {}
        for key in JSON_KEYS:
            value = getattr(self, key)
            out[key] = list(value) if key in _LIST_KEYS else int(value)
        return out
