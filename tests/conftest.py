"""Shared fixtures: tiny models built in code (fresh per test, ~30 ms) and saved once per session for scripts
launched in other processes; a small deterministic test image."""

from __future__ import annotations

import os

# Before torch is imported by any test module: 1 thread per process (tests and launched workers share 2 cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from opsd_trl.testing.tiny_models import (  # noqa: E402
    build_tiny_qwen2_5_vl,
    build_tiny_qwen3_vl,
    build_tiny_text_lm,
    save_tiny,
)

TINY_BUILDERS = {
    "text_lm": build_tiny_text_lm,
    "qwen2_5_vl": build_tiny_qwen2_5_vl,
    "qwen3_vl": build_tiny_qwen3_vl,
}


@pytest.fixture
def tiny_text_lm():
    """``(Qwen2ForCausalLM, Qwen2Tokenizer)``, seed 0, built fresh so a test may train it."""
    return build_tiny_text_lm(seed=0)


@pytest.fixture
def tiny_qwen2_5_vl():
    """``(Qwen2_5_VLForConditionalGeneration, TinyQwen2_5_VLProcessor)``, seed 0, built fresh."""
    return build_tiny_qwen2_5_vl(seed=0)


@pytest.fixture
def tiny_qwen3_vl():
    """``(Qwen3VLForConditionalGeneration, TinyQwen3VLProcessor)``, seed 0, built fresh."""
    return build_tiny_qwen3_vl(seed=0)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, str]:
    """The three tiny models (seed 0) saved once per session: ``{"text_lm" | "qwen2_5_vl" | "qwen3_vl": folder}``,
    each loadable with ``opsd_trl.models.loading.load_pretrained`` (e.g. by a script under ``accelerate launch``)."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {name: save_tiny(*build(seed=0), root / name) for name, build in TINY_BUILDERS.items()}


@pytest.fixture(scope="session")
def family_model_dirs(tiny_model_dirs, tmp_path_factory) -> dict[str, str]:
    """`tiny_model_dirs` plus the tiny BAGEL (`"bagel"`): every supported family saved with save_pretrained of the
    model and its processor / tokenizer, loadable with `opsd_trl.models.loading.load_pretrained`."""
    from opsd_trl.testing.tiny_bagel import build_tiny_bagel

    bagel = save_tiny(*build_tiny_bagel(seed=0), tmp_path_factory.mktemp("tiny_bagel") / "bagel")
    return {**tiny_model_dirs, "bagel": bagel}


@pytest.fixture(scope="session")
def bagel_release_dir(tmp_path_factory) -> str:
    """A tiny BAGEL in BAGEL's own release layout (`llm_config.json`, `vit_config.json`, tokenizer,
    `ema.safetensors` = the seed-1 model, `model.safetensors` = the seed-0 model, `ae.safetensors`)."""
    from opsd_trl.testing.tiny_bagel import build_tiny_bagel, save_bagel_release

    model, processor = build_tiny_bagel(seed=0)
    ema, _ = build_tiny_bagel(seed=1)
    return save_bagel_release(tmp_path_factory.mktemp("bagel_release") / "ThinkMorph-tiny",
                              {"ema": ema, "model": model}, processor)


def _noise_image(seed: int = 0, size: tuple[int, int] = (56, 56)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def make_tiny_image():
    """``make_tiny_image(seed=0, size=(width, height))`` -> a deterministic RGB noise image."""
    return _noise_image


@pytest.fixture
def tiny_image() -> Image.Image:
    """A 56x56 noise image: 4x4 patches of 14 px -> 4 image tokens for the tiny Qwen2.5-VL (2x2 merge)."""
    return _noise_image(0)
