"""A stand-in Serve app with the `synthesize_bulk` contract of the real ingress (used to test the handle path)."""

from __future__ import annotations

import numpy as np
from ray import serve


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class StubIngress:
    async def synthesize_bulk(self, payload: dict) -> dict:
        if payload.get("voice") not in ("vivian", "ryan"):
            raise ValueError(f"voice: unknown voice {payload.get('voice')!r}")
        n = len(payload["input"]) * 2400
        pcm = (0.2 * np.sin(np.arange(n) * 0.05)).astype(np.float32)
        return {"pcm": pcm, "sample_rate": 24000, "finish_reason": "eos", "num_frames": n // 1920}


def build_stub_app():
    return StubIngress.bind()
