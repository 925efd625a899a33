"""A stand-in VT encoder with the Qwen-VL token geometry, for VT-cache format tests and benchmarks."""

from __future__ import annotations

import zlib

import torch

from ..vt_cache.encoders import EncodedImage, encoder_fingerprint
from ..vt_cache.format import sha256_json


class SyntheticEncoder:
    """Deterministic stand-in with the Qwen-VL token geometry (patch, 2x2 merge): features are random rows
    seeded by the pixels. Satisfies `opsd_trl.vt_cache.VTEncoder`."""

    def __init__(self, hidden_size: int = 32, patch_size: int = 14, deepstack_levels: int = 0, seed: int = 0):
        self.hidden_size, self.patch_size, self.levels, self.seed = hidden_size, patch_size, deepstack_levels, seed

    def fingerprint(self) -> dict:
        return encoder_fingerprint(
            model_family="synthetic", hidden_size=self.hidden_size, spatial_merge_size=2,
            deepstack_levels=self.levels, vision_weights_sha256=sha256_json({"seed": self.seed}),
            processor_config={"patch_size": self.patch_size, "merge_size": 2},
        )

    def encode(self, images: list) -> list[EncodedImage]:
        out = []
        for im in images:
            unit = 2 * self.patch_size
            gh, gw = (max(1, round(s / unit)) * 2 for s in (im.height, im.width))
            n = gh * gw // 4
            g = torch.Generator().manual_seed(zlib.crc32(im.tobytes(), self.seed))
            embeds = torch.randn(n, self.hidden_size, generator=g)
            deep = torch.randn(self.levels, n, self.hidden_size, generator=g) if self.levels else None
            out.append(EncodedImage(embeds, (1, gh, gw), deep))
        return out
