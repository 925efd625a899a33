"""A BAGEL release folder's config fields that change the computation: `rope_scaling` in `llm_config.json` (upstream
applies it; this port refuses it by name) and the ViT patch size of `vit_config.json` (the processor follows it)."""

from __future__ import annotations

import json

import pytest
import torch

from opsd_trl.models.loading import apply_image_processor_kwargs, load_pretrained
from opsd_trl.testing.tiny_bagel import build_tiny_bagel, save_bagel_release
from tests.trainer_utils import square


def _release(tmp_path, **overrides):
    model, processor = build_tiny_bagel(seed=0, **overrides)
    return model, save_bagel_release(tmp_path / "release", {"model": model}, processor)


@pytest.mark.parametrize("scaling", [{"type": "linear", "factor": 4.0}, {"rope_type": "dynamic", "factor": 2.0}])
def test_rope_scaling_is_refused_by_name(tmp_path, scaling):
    _, folder = _release(tmp_path)
    path = tmp_path / "release" / "llm_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "rope_scaling": scaling}))
    with pytest.raises(ValueError, match=r"llm_config.json sets rope_scaling=.*upstream BAGEL scales its RoPE"):
        load_pretrained(folder)


def test_default_rope_scaling_loads(tmp_path):
    _, folder = _release(tmp_path)
    path = tmp_path / "release" / "llm_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "rope_scaling": {"rope_type": "default"}}))
    load_pretrained(folder)


def test_patch_size_comes_from_vit_config(tmp_path):
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=128,
                  patch_size=16)
    original, folder = _release(tmp_path, vision_config=vision)
    model, processor = load_pretrained(folder)
    assert processor.image_processor.patch_size == 16
    apply_image_processor_kwargs(processor, {"max_image_size": 64, "min_image_size": 32, "max_pixels": 64 * 64})
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[[square((200, 30, 90), size=64)]], return_tensors="pt")
    assert inputs["pixel_values"].shape[-1] == 16 * 16 * 3
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, original(**inputs).logits, rtol=0, atol=1e-5)
