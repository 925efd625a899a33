"""Encoders turn VT images into the rows that replace image placeholder tokens.

The cache builder only needs the :class:`VTEncoder` protocol, so the format is testable with the cheap
:class:`SyntheticEncoder`; :class:`VisionEncoder` is the real one for the Qwen2-VL / Qwen2.5-VL / Qwen3-VL families.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from .format import sha256_json, tensor_bytes, to_jsonable

# Fields of an encoder fingerprint; all of them go into the manifest and check_compatible compares them.
FINGERPRINT_FIELDS = (
    "model_family",
    "hidden_size",
    "spatial_merge_size",
    "deepstack_levels",
    "vision_weights_sha256",
    "processor_sha256",
)
VISION_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "bagel")


@dataclass
class EncodedImage:
    """One VT image after vision tower + projector."""

    embeds: torch.Tensor  # (n_tokens, hidden)
    grid_thw: tuple[int, int, int] | None  # pre-merge patch grid; None for families without M-RoPE
    deepstack: torch.Tensor | None = None  # (n_levels, n_tokens, hidden), Qwen3-VL only


class VTEncoder(Protocol):
    def fingerprint(self) -> dict:
        """``FINGERPRINT_FIELDS`` plus ``processor_config`` (a JSON dict)."""

    def encode(self, images: list) -> list[EncodedImage]:
        """Encode PIL images (one batch) in order."""


def weights_sha256(module: torch.nn.Module) -> str:
    """Hash of names, shapes and values. Values are hashed as fp32 so that a bf16 checkpoint hashes the same
    whether it is loaded in bf16 or fp32 (the upcast is exact)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}\n".encode())
        h.update(tensor_bytes(t.detach().to("cpu", torch.float32)))
    return h.hexdigest()


def processor_config(image_processor) -> dict:
    # Private / class-name keys do not change pixels; leaving them out keeps the hash stable across wrappers.
    cfg = image_processor.to_dict()
    return to_jsonable({k: v for k, v in cfg.items() if not k.startswith("_") and k != "processor_class"})


def vision_inner(model):
    """The ``*Model`` holding ``.visual`` (accepts the ``ForConditionalGeneration`` wrapper or the model)."""
    inner = model.model if hasattr(model, "model") and hasattr(model.model, "visual") else model
    if not hasattr(inner, "visual"):
        raise TypeError(f"{type(model).__name__} has no vision tower (.visual)")
    return inner


def model_family(model) -> str:
    config = model.config
    return config.model_type if config.model_type in VISION_FAMILIES else "text"


def text_hidden_size(model) -> int:
    config = model.config
    return getattr(config, "text_config", config).hidden_size


class VisionEncoder:
    """Image processor -> the policy adapter's `encode_images` (vision tower + projector): Qwen2/2.5/3-VL, BAGEL."""

    def __init__(self, model, processor):
        from ..models.adapters import get_adapter

        self.model = model
        self.adapter = get_adapter(model)
        self.inner = vision_inner(model)
        self.config = model.config
        self.image_processor = getattr(processor, "image_processor", processor)
        self._fingerprint = None

    def fingerprint(self) -> dict:
        if self._fingerprint is None:  # hashing a real tower takes seconds; do it once
            vision = self.config.vision_config
            pcfg = processor_config(self.image_processor)
            self._fingerprint = {
                "model_family": self.config.model_type,
                "hidden_size": text_hidden_size(self.inner),
                "spatial_merge_size": getattr(vision, "spatial_merge_size", 1),
                "deepstack_levels": len(getattr(vision, "deepstack_visual_indexes", None) or []),
                "vision_weights_sha256": weights_sha256(self.inner.visual),
                "processor_sha256": sha256_json(pcfg),
                "processor_config": pcfg,
            }
        return self._fingerprint

    @torch.no_grad()
    def encode(self, images: list) -> list[EncodedImage]:
        if not images:
            return []
        device = next(self.inner.visual.parameters()).device
        batch = self.image_processor(images=images, return_tensors="pt")
        # The trainer's own encoder (online VT mode) computes the features: the cache stores exactly those.
        slots = self.adapter.encode_images(self.model, batch["pixel_values"].to(device), batch["image_grid_thw"].to(device))
        return [EncodedImage(s.embeds, tuple(int(x) for x in s.grid_thw), s.deepstack) for s in slots]


class SyntheticEncoder:
    """Deterministic stand-in with the Qwen-VL token geometry (patch, 2x2 merge): features are random rows
    seeded by the pixels. For format tests and benchmarks only."""

    def __init__(self, hidden_size: int = 32, patch_size: int = 14, deepstack_levels: int = 0, seed: int = 0):
        self.hidden_size, self.patch_size, self.levels, self.seed = hidden_size, patch_size, deepstack_levels, seed

    def fingerprint(self) -> dict:
        pcfg = {"patch_size": self.patch_size, "merge_size": 2}
        return {
            "model_family": "synthetic",
            "hidden_size": self.hidden_size,
            "spatial_merge_size": 2,
            "deepstack_levels": self.levels,
            "vision_weights_sha256": sha256_json({"seed": self.seed}),
            "processor_sha256": sha256_json(pcfg),
            "processor_config": pcfg,
        }

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


def load_encoder(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 bagel_weights: str | None = None, image_processor_kwargs: dict | None = None) -> VisionEncoder:
    """Load a Qwen-VL checkpoint folder (or a tiny model saved with ``save_tiny``, a BAGEL folder in transformers'
    or in BAGEL's own release layout) for cache building. ``bagel_weights`` / ``image_processor_kwargs``: as the
    training fields of the same names (the cache is checked against the policy's processor settings)."""
    from opsd_trl.models.bagel.convert import is_bagel_checkpoint
    from opsd_trl.models.loading import apply_image_processor_kwargs, load_pretrained, read_folder_config

    if is_bagel_checkpoint(path):
        model, processor = load_pretrained(str(path), dtype=dtype, bagel_weights=bagel_weights)
        apply_image_processor_kwargs(processor, image_processor_kwargs)
        return VisionEncoder(model.eval().to(device), processor)
    config = read_folder_config(str(path))
    if config is not None and config.get("model_type") not in VISION_FAMILIES:  # refused before any weights load
        raise ValueError(
            f"{path}: model_type {config.get('model_type')!r} has no VT encoder; supported: {', '.join(VISION_FAMILIES)}"
        )
    path = Path(path)
    proc_file = path / "processor_config.json"
    proc_class = json.loads(proc_file.read_text()).get("processor_class") if proc_file.exists() else None
    if proc_class and proc_class.startswith("Tiny"):
        from opsd_trl.models.tiny import load_tiny

        model, processor = load_tiny(path, dtype=dtype)
    elif proc_class == "BagelProcessor":
        from opsd_trl.models.bagel.tiny import load_bagel

        model, processor = load_bagel(path, dtype=dtype)
    else:
        from transformers import AutoImageProcessor, AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).eval()
        processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    if model_family(model) not in VISION_FAMILIES:
        raise ValueError(
            f"{path}: model_type {model.config.model_type!r} has no VT encoder; "
            f"supported: {', '.join(VISION_FAMILIES)}"
        )
    apply_image_processor_kwargs(processor, image_processor_kwargs)
    return VisionEncoder(model.to(device), processor)
