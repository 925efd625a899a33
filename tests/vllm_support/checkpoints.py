"""Save tiny models where vLLM can load them (test-only)."""

import json
import os

from opsd_trl.testing.tiny_models import save_tiny


def save_for_vllm(model, processing_class, path) -> str:
    """`save_tiny`, then make the folder loadable by vLLM's stock Qwen2.5-VL processor.

    vLLM loads `Qwen2_5_VLProcessor` / `AutoProcessor`, which neither know the tiny torchvision-free processor class
    nor load without a video processor config. Points `model.name_or_path` at the folder (TRL's helper reads it).
    """
    path = save_tiny(model, processing_class, path)
    proc_file = os.path.join(path, "processor_config.json")
    if os.path.exists(proc_file):
        from transformers import Qwen2VLVideoProcessor  # needs torchvision: the shim in this folder

        with open(proc_file) as f:
            cfg = json.load(f)
        cfg["processor_class"] = type(processing_class).__mro__[1].__name__  # Tiny... -> its stock parent
        with open(proc_file, "w") as f:
            json.dump(cfg, f, indent=2)
        ip = processing_class.image_processor
        Qwen2VLVideoProcessor(patch_size=ip.patch_size, merge_size=ip.merge_size).save_pretrained(path)
    model.config._name_or_path = path
    model.name_or_path = path
    return path
