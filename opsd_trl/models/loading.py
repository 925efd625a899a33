"""Loading a policy and its processor from a folder, and loading checkpoint weights into a built model.

One place for every entry point that reads a model folder (`opsd-trl train`, `opsd-trl eval`): a folder written by
`save_pretrained` of the model + its processor / tokenizer (`config.json`, `model.safetensors`, tokenizer files,
`processor_config.json` / `preprocessor_config.json`), or a hub id. The family is read from `config.json`:

| family | model class | processing class |
|---|---|---|
| text LM (no `vision_config`) | `AutoModelForCausalLM` | `AutoTokenizer` |
| Qwen2-VL / Qwen2.5-VL / Qwen3-VL | `AutoModelForImageTextToText` | the tiny processors when `processor_config.json` names one, else `AutoProcessor` |
| BAGEL (`model_type: bagel`) | `BagelForConditionalGeneration` | `BagelProcessor` |
| BAGEL / ThinkMorph release folder (`llm_config.json` + `vit_config.json`) | the same, converted on load | the same, at the reference's image sizes |

A release folder is read with `opsd_trl.models.bagel.convert` (its weight set chosen with `bagel_weights`).

`load_checkpoint_weights` loads a checkpoint's `model.safetensors` into an already built model (trainer resume).
transformers 5 saves some families under their original checkpoint names (Qwen2.5-VL: `model.layers.*`,
`visual.*`) while the modules are named `model.language_model.*`, `model.visual.*`; a plain `load_state_dict`
matches almost nothing. The keys are mapped with the model's own conversion mapping (what `from_pretrained`
applies), and any weight left unloaded is an error naming it.
"""

from __future__ import annotations

import json
import os

import torch

CONFIG_FILE = "config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"


def read_folder_config(path: str) -> dict | None:
    """`config.json` of a local model folder; None for a hub id. A local path (absolute, `./`, `../`, `~`) that does
    not exist is an error, never a hub look-up."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        if os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path):
            raise FileNotFoundError(f"model folder {path} not found (or not a folder); give the folder written by "
                                    "save_pretrained (e.g. an output_dir of opsd-trl train) or a hub id.")
        return None
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"model folder {path} has no {CONFIG_FILE}: it is not a saved model (save it with "
            "model.save_pretrained(folder) and processor.save_pretrained(folder))."
        )
    with open(file) as f:
        return json.load(f)


def _processor_class(path: str) -> str | None:
    file = os.path.join(path, "processor_config.json")
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        return json.load(f).get("processor_class")


def _load_bagel_release(path: str, dtype, weights: str | None):
    """A BAGEL / ThinkMorph release folder, built whole on this rank (as `tiny:` models: under ZeRO-3 DeepSpeed
    partitions the finished model when the trainer prepares it)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    from .bagel.convert import bagel_processor, load_bagel_checkpoint

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        model, _ = load_bagel_checkpoint(path, None if dtype == "auto" else dtype, weights=weights)
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = ref
    model.config.name_or_path = path
    return model, bagel_processor(path)


def load_pretrained(path: str, *, dtype=None, attn_implementation: str | None = None, revision: str | None = None,
                    trust_remote_code: bool = False, bagel_weights: str | None = None):
    """`(model, processing_class)` from a saved folder or a hub id, for every supported family (table above).
    `dtype`: a torch dtype, its name, or None / "auto" (the checkpoint's dtype). `bagel_weights`: "ema" | "model",
    which weight set of a BAGEL release folder holding both (ignored for other folders)."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    from . import bagel  # noqa: F401  (registers model_type "bagel" with AutoConfig / AutoModelForImageTextToText)
    from .bagel.convert import is_bagel_checkpoint
    from .tiny import _PROCESSORS

    path = os.fspath(path)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if is_bagel_checkpoint(path):
        return _load_bagel_release(path, dtype, bagel_weights)
    kwargs = dict(dtype=dtype or "auto", revision=revision, trust_remote_code=trust_remote_code)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    local = read_folder_config(path)
    config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    if config.model_type == "bagel":
        from .bagel import BagelForConditionalGeneration, BagelProcessor

        return BagelForConditionalGeneration.from_pretrained(path, **kwargs), BagelProcessor.from_pretrained(path)
    if getattr(config, "vision_config", None) is None:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        return model, AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    name = _processor_class(path) if local is not None else None
    if name in _PROCESSORS:  # AutoProcessor would silently return only the tokenizer for these
        return model, _PROCESSORS[name].from_pretrained(path)
    return model, AutoProcessor.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)


def apply_image_processor_kwargs(processing_class, kwargs: dict | None) -> None:
    """Set attributes of the processor's image processor (e.g. a recipe's BAGEL sizes `max_image_size`,
    `min_image_size`, `max_pixels`); every key must be an attribute it already has."""
    if not kwargs:
        return
    image_processor = getattr(processing_class, "image_processor", None)
    unknown = sorted(k for k in kwargs if image_processor is None or not hasattr(image_processor, k))
    if unknown:
        raise ValueError(f"image_processor_kwargs {unknown} are not settings of this model's image processor "
                         f"({type(image_processor).__name__}); remove them or use the processor's own names.")
    for key, value in kwargs.items():
        setattr(image_processor, key, value)


# ----------------------------------------------------------------------------------------------- checkpoint weights
def has_full_weights(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in (SAFE_WEIGHTS, SAFE_WEIGHTS_INDEX))


def _read_state_dict(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = os.path.join(folder, SAFE_WEIGHTS)
    if os.path.isfile(single):
        return load_file(single, device="cpu")
    with open(os.path.join(folder, SAFE_WEIGHTS_INDEX)) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for name in files:
        state.update(load_file(os.path.join(folder, name), device="cpu"))
    return state


def to_module_keys(model, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a saved state dict's keys to the model's module names, with the model's own conversion mapping
    (the renames `from_pretrained` applies; transformers reverts them on save)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    own = model.state_dict()
    out = {}
    for key, tensor in state_dict.items():
        new_key, converter = rename_source_key(key, renamings, converters, model.base_model_prefix, own)
        if converter is not None:  # a fused / split weight: needs from_pretrained's tensor operations
            raise ValueError(
                f"checkpoint weight {key!r} needs a tensor conversion ({converter}) to load into "
                f"{type(model).__name__}; resuming this model family from model.safetensors is not supported."
            )
        out[new_key] = tensor
    return out


def load_checkpoint_weights(model, folder: str) -> None:
    """Load `folder`'s `model.safetensors` (or its sharded index) into `model` in place, every weight or an error.

    Weights that share storage with a loaded one (tied embeddings) count as loaded."""
    state = to_module_keys(model, _read_state_dict(folder))
    own = model.state_dict()
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    loaded = {id(tensors[k]) for k in state if k in tensors}
    missing = [k for k in own if k not in state and id(tensors.get(k)) not in loaded]
    unexpected = sorted(k for k in state if k not in own)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {folder} does not load completely into {type(model).__name__}: {len(missing)} weights "
            f"missing {missing[:8]}, {len(unexpected)} unexpected {unexpected[:8]}; resume with the model "
            "(model_name_or_path, PEFT settings) the checkpoint was trained from."
        )
    mismatched = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:
        k = mismatched[0]
        raise ValueError(
            f"checkpoint {folder}: {len(mismatched)} weights have another shape than the model's, e.g. {k!r} "
            f"{tuple(state[k].shape)} vs {tuple(own[k].shape)}; resume with the model the checkpoint was trained from."
        )
    model.load_state_dict(state, strict=False)  # strict=False: tied weights appear under one name only
