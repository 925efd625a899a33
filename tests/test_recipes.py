"""Every recipe and accelerate config parses; GPU recipes pass start-up validation on a simulated 8-GPU launch
with their real model sizes; the paper recipe carries the paper's hyper-parameters."""

from __future__ import annotations

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from recipe_utils import EIGHT_GPUS, GPU_RECIPES, MODEL_CONFIGS, RECIPES, REPO, parse_recipe, write_manifest

from opsd_trl.startup_checks import validate
from opsd_trl.vt_cache import config_fingerprint

CONFIGS = sorted((REPO / "accelerate_configs").glob("*.yaml"))
GPU_PROCESSES = {"zero3": 8, "zero3_offload": 8, "zero2": 8, "multi_gpu": 8, "single_gpu": 1}


def test_all_files_present():
    assert {c.stem for c in CONFIGS} >= {*GPU_PROCESSES, "cpu_zero3", "cpu_zero2", "cpu_ddp"}
    assert {r.stem for r in RECIPES} >= {"cpu_quickstart", "qwen2_5_vl_7b_thinkmorph", "qwen3_vl_8b_thinkmorph",
                                         "qwen2_5_vl_7b_lora", "text_lm"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_accelerate_config_parses(path):
    config = load_config_from_file(str(path))
    if path.stem in GPU_PROCESSES:
        assert config.num_processes == GPU_PROCESSES[path.stem]
        assert not config.use_cpu and config.mixed_precision == "bf16"
    else:
        assert config.use_cpu and config.num_processes == 2
    if config.distributed_type == "DEEPSPEED":
        stage = yaml.safe_load(path.read_text())["deepspeed_config"]["zero_stage"]
        assert stage == (2 if "zero2" in path.stem else 3)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_and_documents_itself(path):
    header = path.read_text().split("\n\n")[0]
    for word in ("Hardware:", "Cost:", "accelerate launch"):
        assert word in header, f"{path.name}: header lacks {word!r}"
    script_args, training_args, model_args = parse_recipe(path)
    assert model_args.model_name_or_path and training_args.output_dir


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.stem)
def test_gpu_recipe_validates_on_eight_gpus(path, tmp_path):
    script_args, training_args, model_args = parse_recipe(path)
    config = MODEL_CONFIGS[model_args.model_name_or_path]()
    if training_args.vt_source == "cache":  # a cache built for this model (the weights hash is the trainer's check)
        training_args.vt_cache_dir = write_manifest(tmp_path / "cache", **config_fingerprint(config))
    validate(script_args, training_args, model_args, launch=EIGHT_GPUS, model_config=config)


def test_paper_recipe_hyperparameters():
    s, t, m = parse_recipe(REPO / "recipes/qwen2_5_vl_7b_thinkmorph.yaml")
    expected = dict(learning_rate=1e-5, lr_scheduler_type="cosine_with_min_lr", warmup_steps=200, adam_beta1=0.9,
                    adam_beta2=0.95, adam_epsilon=1e-15, weight_decay=0.0, max_grad_norm=1.0,
                    gradient_accumulation_steps=2, per_device_train_batch_size=1, bf16=True, beta=0.5,
                    teacher_top_k=256, jsd_clip=0.05, teacher_mode="ema", ema_decay=0.995, temperature=1.0,
                    max_completion_length=1024, max_vt_images=8, use_vllm=True, vllm_mode="colocate", top_p=1.0,
                    top_k=0, max_image_skips=1)
    assert {k: getattr(t, k) for k in expected} == expected
    assert t.lr_scheduler_kwargs == {"min_lr_rate": 0.01} and t.learning_rate * 0.01 == pytest.approx(1e-7)
    assert s.dataset_preset == "thinkmorph" and s.dataset_name is None  # the reference's rows (opsd_trl.data)
    assert not m.use_peft


@pytest.mark.parametrize("name", ["qwen2_5_vl_7b_thinkmorph", "qwen3_vl_8b_thinkmorph", "thinkmorph_7b"])
def test_paper_recipes_set_the_reference_behaviour_explicitly(name):
    """Every field where the project can differ from the reference (docs/fidelity.md) is written in the recipe, at
    the reference's value, so that a change of a library default cannot change the paper recipes."""
    from opsd_trl.config import TEACHER_INTRO, TEACHER_TRANSITION, VLM_THINK_SYSTEM_PROMPT

    written = yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text())
    reference = dict(
        jsd_clip_form="reference", loss_normalization="samples", close_truncated_completions=True,
        image_skip_marker="<image_start>", image_skip_token="<|im_end|>", max_image_skips=1, noise_vt=False,
        teacher_mode="ema", ema_decay=0.995, beta=0.5, teacher_top_k=256, jsd_clip=0.05, max_vt_images=8,
        temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, max_completion_length=1024,
        teacher_intro=TEACHER_INTRO, teacher_transition=TEACHER_TRANSITION,
        system_prompt=VLM_THINK_SYSTEM_PROMPT, teacher_text_layout="blocks", ema_init_weights="auto",
        on_missing_vt="no_vt_teacher",
    )  # fmt: skip
    assert {k: written.get(k) for k in reference} == reference
    s, t, _ = parse_recipe(REPO / "recipes" / f"{name}.yaml")
    assert {k: getattr(t, k) for k in reference} == reference
    # The reference trains the vision tower and connector; the VTs are then encoded by the teacher's weights.
    assert written["freeze_vision_tower"] is False and s.freeze_vision_tower is False and t.vt_source == "online"


@pytest.mark.parametrize("name", ["qwen2_5_vl_7b_thinkmorph", "thinkmorph_7b"])
def test_frozen_vit_variants_differ_only_in_the_tower_and_the_cache(name):
    paper = yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text())
    fast = yaml.safe_load((REPO / "recipes" / f"{name}_frozen_vit.yaml").read_text())
    changed = {k for k in paper.keys() | fast.keys() if paper.get(k) != fast.get(k)}
    assert changed == {"freeze_vision_tower", "vt_source", "vt_cache_dir", "output_dir"}
    assert fast["freeze_vision_tower"] is True and fast["vt_cache_dir"]


def test_lora_recipe():
    s, t, m = parse_recipe(REPO / "recipes/qwen2_5_vl_7b_lora.yaml")
    assert (m.use_peft, m.lora_r, m.lora_alpha, t.learning_rate, t.teacher_mode) == (True, 64, 128, 2e-4, "fixed")


def test_thinkmorph_recipe():
    """The paper's policy: a BAGEL release folder, model.safetensors (the reference's choice), the reference's ViT
    sizes, HF generation (vLLM's BAGEL uses other positions / attention), the paper's optimiser."""
    s, t, m = parse_recipe(REPO / "recipes/thinkmorph_7b.yaml")
    assert s.bagel_weights == "model" and not t.use_vllm and not m.use_peft
    assert s.image_processor_kwargs == {"max_image_size": 980, "min_image_size": 378, "max_pixels": 2_007_040}
    expected = dict(learning_rate=1e-5, lr_scheduler_type="cosine_with_min_lr", warmup_steps=200, adam_beta1=0.9,
                    adam_beta2=0.95, adam_epsilon=1e-15, weight_decay=0.0, max_grad_norm=1.0,
                    gradient_accumulation_steps=2, per_device_train_batch_size=1, bf16=True, max_steps=1000)
    assert {k: getattr(t, k) for k in expected} == expected
    assert t.lr_scheduler_kwargs == {"min_lr_rate": 0.01} and t.learning_rate * 0.01 == pytest.approx(1e-7)
    assert s.dataset_preset == "thinkmorph" and s.dataset_name is None  # the reference's rows (opsd_trl.data)
    from opsd_trl.models.bagel.processing_bagel import REFERENCE_IMAGE_TRANSFORM

    assert s.image_processor_kwargs == REFERENCE_IMAGE_TRANSFORM
