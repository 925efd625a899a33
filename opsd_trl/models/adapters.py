"""Model-family adapters: how the teacher pass embeds a spliced sequence and computes its positions.

The teacher sequence is `[teacher prompt ; completion]` where some prompt positions are *slots* that take
precomputed embeddings instead of token embeddings: image placeholder tokens for Qwen-VL families (problem image
and visual thoughts), soft-prefix placeholders for text-only LMs. Each adapter turns
`(input_ids, attention_mask, slot_mask, slot_embeds)` into the backbone's last hidden states, calling the model's
own submodules so that ZeRO-3 gathers each weight on use (never the raw embedding matrix).

`ModelAdapter` is the contract, and an adapter owns everything the package knows of its family: loading the model
and its processor, the vision tower, pixel geometry, whether problem-image features can be shared, the VT-cache key,
the freeze and LoRA-exclude patterns, the vision delimiters. `ADAPTERS` (by `model_type`) is the one registry:
`get_adapter` picks from it for a model, `adapter_class` for a config. A model port registers its own with
`register_adapter` when its package is imported; every subpackage of `opsd_trl.models` is imported by `load_ports`
(BAGEL: `opsd_trl.models.bagel`), so neither this module nor the loader imports a port by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


@dataclass
class SlotFeatures:
    """Precomputed embeddings for the slots of one image (or one soft-prefix VT).

    Shapes: `embeds` `(n_tokens, H)`; `grid_thw` `(3,)` pre-merge patch grid (Qwen-VL only);
    `deepstack` `(n_levels, n_tokens, H)` (Qwen3-VL only).
    """

    embeds: torch.Tensor
    grid_thw: torch.Tensor | None = None
    deepstack: torch.Tensor | None = None


class ModelAdapter(Protocol):
    """One model family as the trainer, eval, the loader and the VT cache see it (docs/models.md)."""

    family: str  # "text" | "qwen_vl" | "bagel" | ...: names the family in messages
    uses_images: bool  # VTs are images (spliced as vision features); False: soft-prefix embeddings or `vt_text`
    shares_problem_features: bool  # the student forward splices features at the image placeholders as the teacher
    # does, so a frozen tower's problem-image features can be encoded once for both (`opsd_trl.vision_features`)
    lora_exclude_modules: str | None  # regex of the vision tower's modules, kept out of LoRA while it is frozen
    vision_delimiters: tuple[str, ...]  # tokens around image blocks: never sampled (with the image token)
    samples_on_vllm: bool  # vLLM serves the family as the loss sees it; False: `use_vllm` is refused at start-up
    config: object

    @staticmethod
    def vllm_weight_name(name: str) -> str | None:
        """The name vLLM loads this family's (HF-named) weight under, or None for a weight vLLM's model lacks."""
        ...  # the transformers config of the (unwrapped) model

    @classmethod
    def load(cls, path: str, model_kwargs: dict, hub_kwargs: dict, processing: str) -> tuple[nn.Module, object]:
        """`(model, processing_class)` of a saved folder or hub id of this family (`models.loading.load_pretrained`)."""

    @classmethod
    def vt_cache_key(cls, config) -> dict:
        """The VT-cache fingerprint fields a config alone determines (`opsd_trl.vt_cache.config_fingerprint`)."""

    def vision_tower(self, model: nn.Module) -> nn.Module | None:
        """The vision tower + projector module (what the VT cache hashes and a frozen tower leaves out); None
        without one."""

    def freeze_vision(self, model: nn.Module) -> None:
        """No gradient for the vision tower + projector (a no-op without one)."""

    def pixel_dim(self) -> int:
        """Width of one row of `pixel_values` (the noise-VT control draws pixels of this width)."""

    def hidden_size(self) -> int:
        """Width `H` of the language model's hidden states (and of every slot row)."""

    def encode_images(self, model: nn.Module, pixel_values: torch.Tensor,
                      image_grid_thw: torch.Tensor) -> list[SlotFeatures]:
        """Vision tower + projector, no grad: the processor's `pixel_values` `(sum patches, D)` and `image_grid_thw`
        `(n_images, 3)` -> one `SlotFeatures` per image. The VT cache stores exactly these, so cached and online
        features are the same computation. Raises for a family without a vision tower."""

    def teacher_hidden_states(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                              slot_mask: torch.Tensor, slots: list[SlotFeatures]) -> torch.Tensor:
        """The spliced teacher forward: `(B, L)` ids / attention mask / bool slot mask and the slots in row-major
        slot order -> last hidden states `(B, L, H)`, positions as the model's own forward would give them."""


def unwrap_base(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (LoRA layers stay injected in its modules)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class TextLMAdapter:
    """Causal LMs (Qwen2, Llama, SmolLM2, ...): VTs are soft-prefix embeddings at placeholder positions."""

    family = "text"
    uses_images = False
    shares_problem_features = False
    lora_exclude_modules = None
    vision_delimiters = ()
    samples_on_vllm = True

    @staticmethod
    def vllm_weight_name(name: str) -> str | None:
        return name  # vLLM's loader reads the HF checkpoint names

    def __init__(self, model: nn.Module):
        self.config = unwrap_base(model).config

    @classmethod
    def load(cls, path, model_kwargs, hub_kwargs, processing):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        return (AutoModelForCausalLM.from_pretrained(path, **model_kwargs),
                AutoTokenizer.from_pretrained(path, **hub_kwargs))

    @classmethod
    def vt_cache_key(cls, config) -> dict:
        return {"model_family": "text", "hidden_size": getattr(config, "text_config", config).hidden_size}

    def vision_tower(self, model):
        return None

    def freeze_vision(self, model) -> None:
        pass

    def pixel_dim(self) -> int:
        raise ValueError("a text-only LM has no pixels: the noise-VT control noises its VT embeddings "
                         "(noise_vt_space: embeddings).")

    def hidden_size(self) -> int:
        return self.config.get_text_config().hidden_size

    def teacher_hidden_states(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        slot_mask: torch.Tensor,
        slots: list[SlotFeatures],
    ) -> torch.Tensor:
        """`(B, L)` ids/masks + slots in row-major slot order -> last hidden states `(B, L, H)`."""
        base = unwrap_base(model)
        embeds = base.get_input_embeddings()(input_ids)
        embeds = scatter_slots(embeds, slot_mask, slots)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = base.base_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return out.last_hidden_state

    def encode_images(self, model, pixel_values, image_grid_thw):  # pragma: no cover - guarded by callers
        raise ValueError("a text-only LM has no vision tower: give VTs as `vt_text` or as cached embeddings.")


class ImageAdapter:
    """What the image families share: a transformers `*ForConditionalGeneration` whose inner model holds the vision
    tower + projector as `.visual`, loaded by `AutoModelForImageTextToText` (a family overrides what differs)."""

    uses_images = True
    shares_problem_features = False
    lora_exclude_modules = r".*\.visual\..*"  # the tower's MLP names match the language model's
    vision_delimiters = ("<|vision_start|>", "<|vision_end|>")
    samples_on_vllm = True

    @staticmethod
    def vllm_weight_name(name: str) -> str | None:
        return name  # vLLM's loader reads the HF checkpoint names

    @classmethod
    def load(cls, path, model_kwargs, hub_kwargs, processing):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        return (AutoModelForImageTextToText.from_pretrained(path, **model_kwargs),
                AutoProcessor.from_pretrained(path, **hub_kwargs))

    @classmethod
    def vt_cache_key(cls, config) -> dict:
        vision = config.vision_config
        return {
            "model_family": config.model_type,
            "hidden_size": getattr(config, "text_config", config).hidden_size,
            "spatial_merge_size": getattr(vision, "spatial_merge_size", 1),
            "deepstack_levels": len(getattr(vision, "deepstack_visual_indexes", None) or []),
        }

    def vision_tower(self, model: nn.Module) -> nn.Module:
        return unwrap_base(model).model.visual

    def freeze_vision(self, model: nn.Module) -> None:
        self.vision_tower(model).requires_grad_(False)


class QwenVLAdapter(ImageAdapter):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: image features spliced at `<|image_pad|>` positions, M-RoPE positions from
    the model's own `get_rope_index` over the spliced sequence, and (Qwen3-VL) deepstack features added at the
    visual positions of the first decoder layers."""

    family = "qwen_vl"
    shares_problem_features = True  # the student forward is the model's own splice + M-RoPE

    def __init__(self, model: nn.Module):
        base = unwrap_base(model)
        self.config = base.config
        self.image_token_id = base.config.image_token_id
        self.has_deepstack = bool(getattr(base.config.vision_config, "deepstack_visual_indexes", None))

    @classmethod
    def load(cls, path, model_kwargs, hub_kwargs, processing):
        from transformers import AutoImageProcessor, AutoModelForImageTextToText

        from .qwen_vl_processors import PROCESSOR_CLASSES, saved_processor_class

        name = saved_processor_class(path)
        if name not in PROCESSOR_CLASSES and processing != "image":
            return super().load(path, model_kwargs, hub_kwargs, processing)
        model = AutoModelForImageTextToText.from_pretrained(path, **model_kwargs)
        if name in PROCESSOR_CLASSES:  # AutoProcessor would silently return only the tokenizer for these
            return model, PROCESSOR_CLASSES[name].from_pretrained(path)
        return model, AutoImageProcessor.from_pretrained(path, backend="pil")  # no video processor: no torchvision

    def hidden_size(self) -> int:
        return self.config.get_text_config().hidden_size

    def pixel_dim(self) -> int:
        """Width of one row of `pixel_values`: a flattened (temporal x spatial) patch of every channel."""
        v = self.config.vision_config
        return v.in_channels * v.temporal_patch_size * v.patch_size**2

    @torch.no_grad()
    def encode_images(self, model: nn.Module, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
        """Vision tower + projector. `pixel_values` `(sum patches, D)`, `image_grid_thw` `(n_images, 3)` ->
        one `SlotFeatures` per image."""
        inner = unwrap_base(model).model
        out = inner.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        per_image = list(out.pooler_output)
        deep = getattr(out, "deepstack_features", None) if self.has_deepstack else None
        sizes = [e.shape[0] for e in per_image]
        deep_split = (
            list(zip(*[torch.split(level, sizes) for level in deep], strict=True)) if deep else [None] * len(sizes)
        )
        return [
            SlotFeatures(
                embeds=e, grid_thw=g, deepstack=torch.stack(d) if d is not None else None
            )
            for e, g, d in zip(per_image, image_grid_thw, deep_split, strict=True)
        ]

    def teacher_hidden_states(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        slot_mask: torch.Tensor,
        slots: list[SlotFeatures],
    ) -> torch.Tensor:
        inner = unwrap_base(model).model
        if not torch.equal(slot_mask, input_ids == self.image_token_id):
            raise ValueError("Qwen-VL teacher slots must sit exactly on the image placeholder tokens.")
        embeds = scatter_slots(inner.get_input_embeddings()(input_ids), slot_mask, slots)
        grid = torch.stack([s.grid_thw for s in slots]).to(input_ids.device) if slots else None
        if grid is not None:
            position_ids, _ = inner.get_rope_index(
                input_ids, mm_token_type_ids=slot_mask.int(), image_grid_thw=grid, attention_mask=attention_mask
            )
        else:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        extra = {}
        if self.has_deepstack and slots:
            if any(s.deepstack is None for s in slots):
                raise ValueError(
                    "Qwen3-VL needs deepstack features for every image; this VT cache or encoder did not store them."
                )
            deep = torch.cat([s.deepstack for s in slots], dim=1).to(embeds.device, embeds.dtype)
            extra = {"visual_pos_masks": slot_mask, "deepstack_visual_embeds": list(deep.unbind(0))}
        out = inner.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **extra,
        )
        return out.last_hidden_state


def scatter_slots(embeds: torch.Tensor, slot_mask: torch.Tensor, slots: list[SlotFeatures]) -> torch.Tensor:
    """Token embeddings `(B, L, H)` with the slot positions (`slot_mask` `(B, L)`, row-major) replaced by the
    slots' rows in order; the count of rows must equal the count of slot positions."""
    n_slots = int(slot_mask.sum())
    if not slots:
        if n_slots:
            raise ValueError(f"{n_slots} slot positions but no slot features were given.")
        return embeds
    values = torch.cat([s.embeds for s in slots]).to(embeds.device, embeds.dtype)
    if values.shape[0] != n_slots:
        raise ValueError(f"slot features have {values.shape[0]} rows for {n_slots} slot positions.")
    return embeds.masked_scatter(slot_mask.unsqueeze(-1), values)


# model_type -> adapter class, the one registry of model families; text-only causal LMs (no `vision_config`) fall
# back to `TextLMAdapter`.
ADAPTERS: dict[str, type[ModelAdapter]] = {
    "qwen2_vl": QwenVLAdapter,
    "qwen2_5_vl": QwenVLAdapter,
    "qwen3_vl": QwenVLAdapter,
}
_ports_loaded = False


def register_adapter(model_type: str, adapter: type[ModelAdapter]) -> None:
    """Make `get_adapter` / `adapter_class` pick `adapter` for `model_type` (a model port calls this when imported)."""
    ADAPTERS[model_type] = adapter


def load_ports() -> None:
    """Import every subpackage of `opsd_trl.models` once: each is a model port that registers its adapter (and its
    config with transformers' Auto classes) on import. A port outside the package registers itself when imported."""
    global _ports_loaded
    if _ports_loaded:
        return
    import importlib
    import pkgutil

    package = __name__.rpartition(".")[0]
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if info.ispkg:
            importlib.import_module(f"{package}.{info.name}")
    _ports_loaded = True


def adapter_for_type(model_type: str | None, has_vision: bool = False) -> type[ModelAdapter] | None:
    """The adapter class registered for `model_type`; `TextLMAdapter` for an unregistered text-only model; None for
    an unregistered model with a vision config."""
    load_ports()
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    return None if has_vision else TextLMAdapter


def adapter_class(config) -> type[ModelAdapter]:
    """The adapter class of a transformers config (the loader and the VT cache read it before any weights load)."""
    model_type = getattr(config, "model_type", "")
    cls = adapter_for_type(model_type, getattr(config, "vision_config", None) is not None)
    if cls is None:
        raise ValueError(
            f"model_type {model_type!r} is a vision-language model without a Visual-OPSD adapter; supported: "
            f"{', '.join(ADAPTERS)} and text-only causal LMs (see docs/models.md)."
        )
    return cls


def vision_model_types() -> list[str]:
    """The registered model types whose VTs are images (what a VT cache can be built with)."""
    load_ports()
    return [t for t, cls in ADAPTERS.items() if cls.uses_images]


def vision_delimiters() -> list[str]:
    """Every registered family's image-block delimiters (a tokenizer may hold another family's: none is sampled)."""
    load_ports()
    return list(dict.fromkeys(d for cls in ADAPTERS.values() for d in cls.vision_delimiters))


def get_adapter(model: nn.Module) -> ModelAdapter:
    """Pick the adapter for a (possibly PEFT-wrapped) transformers model."""
    return adapter_class(unwrap_base(model).config)(model)
