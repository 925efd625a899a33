"""Visual-OPSD adapter for BAGEL: the teacher pass over a spliced sequence with BAGEL's own image layout.

Slots are the `<|image_pad|>` rows of every image block (problem image and visual thoughts); their features are
the `visual` output (tower + connector + 2D sin-cos), from the VT cache or encoded now. Positions and the
block-bidirectional mask come from `layout.py` through the model's forward, with the slot mask as the image map,
so the teacher sees exactly what a plain forward of the full teacher sequence would see.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import ImageAdapter, SlotFeatures, scatter_slots, unwrap_base


class BagelAdapter(ImageAdapter):
    """`opsd_trl.models.adapters.ModelAdapter` for BAGEL; it also reads BAGEL's own release layout (`convert.py`)."""

    family = "bagel"  # the student forward keeps BAGEL's own path: problem-image features are not shared
    # vLLM 0.31 serves BAGEL as Qwen2 without qk-norm, with sequential positions and causal attention over image
    # tokens, and cannot read this package's folders: sampling there would be off-policy, so training refuses it.
    samples_on_vllm = False

    @staticmethod
    def vllm_weight_name(name: str) -> str | None:
        from transformers.utils import logging

        from .convert import to_vllm_bagel_name

        logging.get_logger(__name__).warning_once(
            "vLLM's BAGEL has no qk-norm: the policy's q_norm / k_norm weights are not pushed, and vLLM samples "
            "without them (docs/generation.md, 'BAGEL through vLLM').")
        return to_vllm_bagel_name(name)  # upstream BAGEL's names, which vLLM's BagelForConditionalGeneration loads

    @classmethod
    def load(cls, path, model_kwargs, hub_kwargs, processing):
        from .modeling_bagel import BagelForConditionalGeneration
        from .processing_bagel import BagelProcessor

        return BagelForConditionalGeneration.from_pretrained(path, **model_kwargs), BagelProcessor.from_pretrained(path)

    # A release folder (`llm_config.json` + `vit_config.json`, BAGEL's weight names): `models.loading` asks every
    # registered adapter whether it reads a folder that has no transformers `config.json`.
    release_model_type = "bagel"

    @classmethod
    def is_release_folder(cls, path) -> bool:
        from .convert import is_bagel_checkpoint

        return is_bagel_checkpoint(path)

    @classmethod
    def load_release_folder(cls, path, dtype, weights: str | None):
        """`(model, processor)` converted in memory; `weights`: "ema" | "model" (`bagel_weights`)."""
        from .convert import bagel_processor, load_bagel_checkpoint

        model, _ = load_bagel_checkpoint(path, dtype, weights=weights)
        return model, bagel_processor(path)

    @classmethod
    def release_folder_config(cls, path, weights: str | None):
        from .convert import bagel_config

        return bagel_config(path, weights=weights)

    @classmethod
    def release_folder_ema(cls, path) -> tuple[dict, list[str]]:
        """The folder's EMA weights under the model's names, and the files they came from."""
        from .convert import read_bagel_state_dict

        state, report = read_bagel_state_dict(path, "ema")
        return state, report["files"]

    def __init__(self, model: nn.Module):
        self.config = unwrap_base(model).config
        self.image_token_id = self.config.image_token_id

    def hidden_size(self) -> int:
        return self.config.text_config.hidden_size

    def pixel_dim(self) -> int:
        """Width of one row of `pixel_values`: a flattened p x p patch of every channel."""
        v = self.config.vision_config
        return v.num_channels * v.patch_size**2

    @torch.no_grad()
    def encode_images(self, model: nn.Module, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
        """`pixel_values` `(sum patches, p*p*3)`, `image_grid_thw` `(n, 3)` -> one `SlotFeatures` per image."""
        inner = unwrap_base(model).model
        feats = inner.get_image_features(pixel_values, image_grid_thw)
        return [SlotFeatures(embeds=f, grid_thw=g) for f, g in zip(feats, image_grid_thw, strict=True)]

    def teacher_hidden_states(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        slot_mask: torch.Tensor,
        slots: list[SlotFeatures],
    ) -> torch.Tensor:
        inner = unwrap_base(model).model
        # Slots must be image-pad tokens; a pad the student sampled in its completion is not a slot and stays text,
        # as in the student forward (mm_token_type_ids 0 there).
        if bool((slot_mask & (input_ids != self.image_token_id)).any()):
            raise ValueError("BAGEL teacher slots must sit on <|image_pad|> tokens of image blocks.")
        embeds = scatter_slots(inner.get_input_embeddings()(input_ids), slot_mask, slots)
        out = inner(input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention_mask, image_mask=slot_mask,
                    use_cache=False)
        return out.last_hidden_state
