"""Encoders turn VT images into the rows that replace image placeholder tokens.

The cache builder only needs the :class:`VTEncoder` protocol, so the format is testable with a cheap stand-in
(``opsd_trl.testing.synthetic_encoder``); :class:`VisionEncoder` is the real one for every family whose adapter
takes images (``opsd_trl.models.adapters``). An encoder's fingerprint (:func:`encoder_fingerprint`) goes into the cache
manifest; what a model config contributes to it is its adapter's ``vt_cache_key``.
"""

from __future__ import annotations

import hashlib
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


@dataclass
class EncodedImage:
    """One VT image after vision tower + projector."""

    embeds: torch.Tensor  # (n_tokens, hidden)
    grid_thw: tuple[int, int, int] | None  # pre-merge patch grid; None for families without M-RoPE
    deepstack: torch.Tensor | None = None  # (n_levels, n_tokens, hidden), Qwen3-VL only


class VTEncoder(Protocol):
    def fingerprint(self) -> dict:
        """``FINGERPRINT_FIELDS`` plus ``processor_config`` (a JSON dict): see :func:`encoder_fingerprint`."""

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


def encoder_fingerprint(*, model_family: str, hidden_size: int, spatial_merge_size: int | None = None,
                        deepstack_levels: int = 0, vision_weights_sha256: str | None = None,
                        processor_config: dict | None = None) -> dict:
    """What a VT cache records of the encoder that built it (``FINGERPRINT_FIELDS`` + ``processor_config``);
    ``check_compatible`` compares a policy's against it. Defaults: no vision tower (text-only embeddings)."""
    return {
        "model_family": model_family,
        "hidden_size": hidden_size,
        "spatial_merge_size": spatial_merge_size,
        "deepstack_levels": deepstack_levels,
        "vision_weights_sha256": vision_weights_sha256,
        "processor_sha256": None if processor_config is None else sha256_json(processor_config),
        "processor_config": processor_config,
    }


def config_fingerprint(model_config) -> dict:
    """The fingerprint fields a model config alone determines (the weights and processor hashes need the model):
    its family adapter's ``vt_cache_key``."""
    from ..models.adapters import adapter_class

    return adapter_class(model_config).vt_cache_key(model_config)


def processor_config(image_processor) -> dict:
    # Private / class-name keys do not change pixels; leaving them out keeps the hash stable across wrappers.
    cfg = image_processor.to_dict()
    return to_jsonable({k: v for k, v in cfg.items() if not k.startswith("_") and k != "processor_class"})


class VisionEncoder:
    """Image processor -> the policy adapter's `encode_images` (vision tower + projector), for any image family."""

    def __init__(self, model, processor):
        from ..models.adapters import get_adapter

        self.model = model
        self.adapter = get_adapter(model)
        self.tower = self.adapter.vision_tower(model)
        if self.tower is None:
            raise TypeError(f"{type(model).__name__} has no vision tower ({self.adapter.family} family)")
        self.config = model.config
        self.image_processor = getattr(processor, "image_processor", processor)
        self._fingerprint = None

    def fingerprint(self) -> dict:
        if self._fingerprint is None:  # hashing a real tower takes seconds; do it once
            self._fingerprint = encoder_fingerprint(
                **config_fingerprint(self.config),
                vision_weights_sha256=weights_sha256(self.tower),
                processor_config=processor_config(self.image_processor),
            )
        return self._fingerprint

    @torch.no_grad()
    def encode(self, images: list) -> list[EncodedImage]:
        if not images:
            return []
        device = next(self.tower.parameters()).device
        batch = self.image_processor(images=images, return_tensors="pt")
        # The trainer's own encoder (online VT mode) computes the features: the cache stores exactly those.
        slots = self.adapter.encode_images(self.model, batch["pixel_values"].to(device), batch["image_grid_thw"].to(device))
        return [EncodedImage(s.embeds, tuple(int(x) for x in s.grid_thw), s.deepstack) for s in slots]


def load_encoder(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 bagel_weights: str | None = None, image_processor_kwargs: dict | None = None) -> VisionEncoder:
    """Load a vision-language model folder (any family ``opsd_trl.models.loading.load_pretrained`` reads: Qwen-VL,
    a tiny model saved in code, BAGEL in transformers' or in its own release layout) or hub id for cache building.
    ``bagel_weights`` / ``image_processor_kwargs``: as the training fields of the same names (the cache is checked
    against the policy's processor settings)."""
    from opsd_trl.models.adapters import get_adapter, vision_model_types
    from opsd_trl.models.loading import apply_image_processor_kwargs, load_pretrained, local_model_type

    model_type = local_model_type(str(path))
    if model_type is not None and model_type not in vision_model_types():  # refused before any weights load
        raise ValueError(
            f"{path}: model_type {model_type!r} has no VT encoder; supported: {', '.join(vision_model_types())}"
        )
    model, processor = load_pretrained(str(path), dtype=dtype, bagel_weights=bagel_weights, processing="image")
    if not get_adapter(model).uses_images:
        raise ValueError(
            f"{path}: model_type {model.config.model_type!r} has no VT encoder; "
            f"supported: {', '.join(vision_model_types())}"
        )
    apply_image_processor_kwargs(processor, image_processor_kwargs)
    return VisionEncoder(model.eval().to(device), processor)
