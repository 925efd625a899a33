"""The quickstart's checkpoints: weights-only `.safetensors` files of its policy (the architecture and tokenizer are
built in code), read for `opsd-trl eval` beside the model folders every other checkpoint is."""

from __future__ import annotations

import os

from ..eval import load_checkpoint as load_model_folder
from ..testing.quickstart_model import load_weights


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
