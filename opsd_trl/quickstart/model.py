"""The quickstart's policy: the `tiny:quickstart` model (`opsd_trl.quickstart.policy`), the words
of its contexts, and its checkpoints: weights-only `.safetensors` files (the architecture and tokenizer are built in
code), the shipped warm-start among them, read for `opsd-trl eval` beside the model folders every other checkpoint
is."""

from __future__ import annotations

import os

from safetensors.torch import load_file, save_file

from ..eval import load_checkpoint as load_model_folder
from ..models.loading import SHIPPED_WARMSTART_FILE, shipped_warmstart
from .policy import QUICKSTART_VOCAB_SIZE, QUICKSTART_WORDS, build_quickstart_model, build_word_tokenizer

__all__ = [
    "QUICKSTART_VOCAB_SIZE",
    "QUICKSTART_WORDS",
    "SHIPPED_WARMSTART_FILE",
    "TEACHER_INTRO",
    "TEACHER_TRANSITION",
    "build_quickstart_model",
    "build_word_tokenizer",
    "load_checkpoint",
    "load_weights",
    "save_weights",
    "shipped_warmstart",
]

# The chat template joins text parts without a separator: the leading space keeps "answer" and "hint" two words.
TEACHER_INTRO, TEACHER_TRANSITION = " hint", "answer"


def save_weights(model, path) -> None:
    """Weights only: the architecture and tokenizer are rebuilt in code, so a checkpoint is one small file."""
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def load_weights(path, seed: int = 0):
    model, processor = build_quickstart_model(seed)
    model.load_state_dict(load_file(str(path)))
    return model.eval(), processor


def load_checkpoint(path: str):
    """`(model, processor)` from a quickstart weights file, else from a model folder (`opsd_trl.eval`)."""
    path = str(path)
    if path.endswith(".safetensors") and os.path.isfile(path):
        try:
            return load_weights(path)
        except RuntimeError as e:
            raise ValueError(
                f"{path} is not a quickstart weights file (its tensors do not fit the quickstart model: "
                f"{str(e).splitlines()[0]}); give the model folder instead."
            ) from e
    return load_model_folder(path)
