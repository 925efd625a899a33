"""Qwen2.5-VL / Qwen3-VL processors without the video slot, for folders whose `processor_config.json` names them.

transformers' `Qwen2_5_VLProcessor` / `Qwen3VLProcessor` want a video processor, and every video processor imports
torchvision, which does not import beside torch 2.13 here. These subclasses drop the video slot, so the processor
is the slow PIL image processor + the tokenizer and keeps the parent's image-token expansion and
`mm_token_type_ids`. The in-code tiny models (`opsd_trl.testing`) and everything trained from them (e.g. an
`output_dir` of `opsd-trl train --config recipes/cpu_quickstart.yaml`) save these class names. `AutoProcessor` does
not know them and would silently return only the tokenizer: `opsd_trl.models.loading.load_pretrained` looks the
saved name up in `PROCESSOR_CLASSES` (`QwenVLAdapter.load`).
"""

from __future__ import annotations

import json
import os

from transformers import Qwen2_5_VLProcessor, Qwen3VLProcessor


class TinyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without the video slot (its video processor needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class TinyQwen3VLProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` without the video slot (its video processor needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


# The `processor_class` a saved folder names -> the class that loads it.
PROCESSOR_CLASSES = {cls.__name__: cls for cls in (TinyQwen2_5_VLProcessor, TinyQwen3VLProcessor)}


def saved_processor_class(path: str) -> str | None:
    """The `processor_class` named by a local folder's `processor_config.json`; None without one (or for a hub id)."""
    file = os.path.join(path, "processor_config.json")
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        return json.load(f).get("processor_class")
