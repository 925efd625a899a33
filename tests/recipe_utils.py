"""Shared by the recipe / CLI / sweep tests: parse a recipe as `opsd-trl train` would, real model configs built in
code (no hub access), a simulated GPU launch, and a fake VT-cache manifest."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import Qwen2_5_VLConfig, Qwen3Config, Qwen3VLConfig

from opsd_trl.startup_checks import Launch
from opsd_trl.train import parse_args

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
CPU_RECIPES = ("cpu_quickstart", "smollm2_arith_sdft_data")  # run on CPU in the tests, not validated for 8 GPUs
GPU_RECIPES = [r for r in RECIPES if r.stem not in CPU_RECIPES]
GIB = 2**30

# The published configs' sizes (dense parts only matter to the start-up estimate and the VT-cache fingerprint).
MODEL_CONFIGS = {
    "Qwen/Qwen2.5-VL-7B-Instruct": lambda: Qwen2_5_VLConfig(
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064),
        vision_config=dict(depth=32, hidden_size=1280, out_hidden_size=3584, spatial_merge_size=2),
    ),
    "Qwen/Qwen3-VL-8B-Instruct": lambda: Qwen3VLConfig(
        text_config=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=151936),
        vision_config=dict(depth=27, hidden_size=1152, out_hidden_size=4096, spatial_merge_size=2,
                           deepstack_visual_indexes=[8, 16, 24]),
    ),
    "models/ThinkMorph-7B": lambda: _bagel_7b(),
    "Qwen/Qwen3-1.7B": lambda: Qwen3Config(
        hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
        head_dim=128, vocab_size=151936, tie_word_embeddings=True,
    ),
}



def _bagel_7b():
    from opsd_trl.models.bagel import BagelConfig

    return BagelConfig()  # its defaults are BAGEL-7B-MoT / ThinkMorph-7B's understanding path


EIGHT_GPUS = Launch(world_size=8, gpus=8, device_memory=80 * GIB, zero_stage=3, vllm_installed=True)


def parse_recipe(path, *overrides: str):
    """`(script_args, training_args, model_args)`; bf16 recipes get `--use_cpu true` so they parse on this CPU."""
    args = ["--config", str(path), *overrides]
    if "bf16: true" in Path(path).read_text():
        args += ["--use_cpu", "true"]
    return parse_args(args)


def write_manifest(folder: Path, **fields) -> str:
    """A VT-cache folder holding a manifest with the given fingerprint fields and an empty index (what the start-up
    checks read)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(fields))
    (folder / "index.json").write_text(json.dumps({"samples": {}}))
    return str(folder)
