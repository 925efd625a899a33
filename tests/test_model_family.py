"""A fourth model family added the way docs/models.md ("Adding a family") says, without editing the package.

The family: a Qwen2.5-VL-shaped model under its own `model_type` (`opsd_fake_vl`), which transformers and the
package know nothing of until the test registers it. The three places of the walkthrough: (1) the model and its
processor (here a config / model subclass and the tiny torchvision-free processor), (2) the adapter, registered
with `register_adapter` (and the config with transformers' Auto classes), (3) this test. The package's loader,
VT-cache key, freeze / LoRA patterns and problem-feature sharing then follow from the adapter, and a training step
runs through `VisualOPSDTrainer`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trainer_utils import make_trainer, vl_dataset
from transformers import AutoConfig, AutoModelForImageTextToText, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from opsd_trl.models import adapters
from opsd_trl.models.adapters import QwenVLAdapter, get_adapter, register_adapter
from opsd_trl.models.loading import load_pretrained
from opsd_trl.testing.tiny_models import (
    CHAT_TEMPLATE,
    TinyQwen2_5_VLProcessor,
    build_tiny_tokenizer,
    build_tiny_vl,
    save_tiny,
    tiny_image_processor,
    tiny_text_config,
    tiny_vision_config,
)
from opsd_trl.vision_features import reusable
from opsd_trl.vt_cache import config_fingerprint

MODEL_TYPE = "opsd_fake_vl"
REPO = Path(__file__).resolve().parents[1]


# 1. The model and its processor.
class FakeVLConfig(Qwen2_5_VLConfig):
    model_type = MODEL_TYPE


class FakeVLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    config_class = FakeVLConfig


def build_fake_vl(seed: int = 0):
    tok = build_tiny_tokenizer()
    model = build_tiny_vl(FakeVLConfig, FakeVLForConditionalGeneration, tok, seed,
                          text_config=tiny_text_config(tok, [4, 6, 6]),
                          vision_config=tiny_vision_config(14, window_size=56, fullatt_block_indexes=[1]))
    processor = TinyQwen2_5_VLProcessor(tiny_image_processor(14, [0.5] * 3, [0.5] * 3), tok,
                                        chat_template=CHAT_TEMPLATE)
    return model, processor


# 2. The adapter: a Qwen-VL backbone, so the Qwen-VL teacher pass; its own name in messages.
class FakeVLAdapter(QwenVLAdapter):
    family = "fake_vl"


@pytest.fixture
def fake_family(monkeypatch):
    try:
        AutoConfig.register(MODEL_TYPE, FakeVLConfig)
        AutoModelForImageTextToText.register(FakeVLConfig, FakeVLForConditionalGeneration)
    except ValueError:
        pass  # registered by an earlier test of this session
    monkeypatch.setitem(adapters.ADAPTERS, MODEL_TYPE, FakeVLAdapter)  # register_adapter, undone after the test
    register_adapter(MODEL_TYPE, FakeVLAdapter)


def test_a_fourth_family_loads_and_trains_a_step(fake_family, tmp_path):
    folder = save_tiny(*build_fake_vl(seed=0), tmp_path / "fake")
    model, processor = load_pretrained(folder, dtype="float32")  # the loader asks the registered adapter
    assert type(model) is FakeVLForConditionalGeneration and type(processor) is TinyQwen2_5_VLProcessor
    adapter = get_adapter(model)
    assert isinstance(adapter, FakeVLAdapter)
    # The VT-cache key records the family's own model type (an unknown one used to be recorded as "text").
    assert config_fingerprint(model.config) == {"model_family": MODEL_TYPE, "hidden_size": 128,
                                                "spatial_merge_size": 2, "deepstack_levels": 0}
    assert not reusable(adapter, model, enabled=True)  # trainable tower: each forward encodes its own images
    adapter.freeze_vision(model)
    assert reusable(adapter, model, enabled=True)
    assert all(not p.requires_grad for p in model.model.visual.parameters())
    assert any(p.requires_grad for p in model.model.language_model.parameters())

    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(model, processor, vl_dataset(2), tmp_path, max_steps=1)
    trainer.train()
    assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and not [k for k in changed if ".visual." in k]  # the frozen tower stayed as it was


def test_the_adapter_gives_the_freeze_and_lora_patterns(fake_family, tmp_path):
    """`opsd-trl train`'s freeze and LoRA settings come from the family's adapter: a frozen tower stays out of LoRA
    (its MLP names match the language model's), and a text LM has no tower to leave out."""
    from opsd_trl.testing.tiny_models import build_tiny_text_lm
    from opsd_trl.train import parse_args, peft_config

    s, _, m = parse_args(["--config", str(REPO / "recipes/cpu_quickstart.yaml"), "--use_peft", "true", "--lora_target_modules",
                          "q_proj", "gate_proj", "--freeze_vision_tower", "true", "--output_dir", str(tmp_path)])
    model, _ = build_fake_vl()
    assert peft_config(s, m, model).exclude_modules == FakeVLAdapter.lora_exclude_modules == r".*\.visual\..*"
    assert peft_config(s, m, build_tiny_text_lm()[0]).exclude_modules is None
