"""Loading a policy and its processor, through its family's adapter.

Every entry point that reads a model (`opsd-trl train` and `eval`, sweeps, the VT cache builder, the start-up
checks) goes through `load_pretrained` / `load_config`. A model is a `tiny:` name (an in-code model, below), a
folder written by `save_pretrained` of the model + its processor / tokenizer (`config.json`, `model.safetensors`,
tokenizer files, `processor_config.json` / `preprocessor_config.json`), or a hub id. The family is the adapter
registered for `config.json`'s `model_type` (`models.adapters.adapter_class`; text LMs without `vision_config`:
`TextLMAdapter`), and its `load` builds the model and processing class:

| adapter | model class | processing class |
|---|---|---|
| `TextLMAdapter`: text LM (no `vision_config`) | `AutoModelForCausalLM` | `AutoTokenizer` |
| `QwenVLAdapter`: Qwen2-VL / Qwen2.5-VL / Qwen3-VL | `AutoModelForImageTextToText` | the torchvision-free processors (`qwen_vl_processors`) when `processor_config.json` names one, else `AutoProcessor` (`processing="image"`: `AutoImageProcessor`, PIL backend) |
| `BagelAdapter` (`model_type: bagel`) | `BagelForConditionalGeneration` | `BagelProcessor` |
| BAGEL / ThinkMorph release folder (`llm_config.json` + `vit_config.json`) | the same, converted on load | the same, at the reference's image sizes |

A folder in a family's own release layout is read by the adapter that claims it (`release_folder_adapter`;
BAGEL's, with its weight set chosen by `bagel_weights`). Ports register themselves (`models.adapters.load_ports`):
this module names none.

In-code models: `tiny:text_lm`, `tiny:qwen2_5_vl`, `tiny:qwen3_vl` are built by `opsd_trl.models.tiny`,
`tiny:quickstart` by the quickstart's `opsd_trl.quickstart.policy` (the CPU recipes, the quickstart and the tests
name them); `init_weights: warmstart` is the
quickstart's shipped warm-start file.

`load_checkpoint_weights` loads a checkpoint's `model.safetensors` into an already built model (trainer resume).
transformers 5 saves some families under their original checkpoint names (Qwen2.5-VL: `model.layers.*`,
`visual.*`) while the modules are named `model.language_model.*`, `model.visual.*`; a plain `load_state_dict`
matches almost nothing. The keys are mapped with the model's own conversion mapping (what `from_pretrained`
applies), and any weight left unloaded is an error naming it.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager

import torch

from ..checkpoints import INCOMPLETE_MARKER, check_safetensors
from .adapters import ADAPTERS, adapter_class, load_ports

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


@contextmanager
def _whole_on_this_rank():
    """Build a model in code whole on this rank. Under ZeRO-3 transformers would partition it *while* building it
    (its weight init then indexes empty shards); DeepSpeed partitions the finished model when the trainer prepares
    it, as with `zero3_init_flag: false`."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = ref


# ----------------------------------------------------------------------------------------------- families
def release_folder_adapter(path: str):
    """The adapter class that reads `path` in its family's own release layout (no transformers `config.json`
    needed: BAGEL's `llm_config.json` + `vit_config.json`), or None for any other folder, a hub id or a `tiny:`
    name. Every registered adapter with an `is_release_folder` classmethod is asked."""
    path = os.fspath(path)
    if path.startswith(TINY_PREFIX):
        return None
    load_ports()
    for cls in dict.fromkeys(ADAPTERS.values()):
        reads = getattr(cls, "is_release_folder", None)
        if reads is not None and reads(path):
            return cls
    return None


def is_release_folder(path: str) -> bool:
    """A folder in a family's own release layout (read converted in memory, see `release_folder_adapter`)."""
    return release_folder_adapter(path) is not None


def local_model_type(path: str) -> str | None:
    """`model_type` of a local model folder ("bagel" for a BAGEL release folder), read without loading weights;
    None for a `tiny:` name or a hub id."""
    if tiny_name(path) is not None:
        return None
    release = release_folder_adapter(path)
    if release is not None:
        return release.release_model_type
    config = read_folder_config(path)
    return None if config is None else config.get("model_type")


# What save_pretrained of a processor / tokenizer writes (one of them at least).
PROCESSOR_FILES = ("tokenizer_config.json", "tokenizer.json", "processor_config.json", "preprocessor_config.json")


def check_saved_folder(path: str) -> None:
    """A local model folder whose save was cut short is an error naming it (not a hub look-up for the missing
    processor files); every `.safetensors` in it is checked against its header (cheap: headers only)."""
    if not os.path.isdir(path):
        return
    if os.path.exists(os.path.join(path, INCOMPLETE_MARKER)):
        raise ValueError(
            f"model folder {path} is an incomplete save (it still holds {INCOMPLETE_MARKER}): the run writing it "
            "stopped before it finished. Load one of its complete checkpoint-N folders, or resume the run "
            "(resume_from_checkpoint: true) so that it writes the final model again."
        )
    if os.path.isfile(os.path.join(path, CONFIG_FILE)) and not any(
            os.path.isfile(os.path.join(path, f)) for f in PROCESSOR_FILES):
        raise ValueError(
            f"model folder {path} has weights but no tokenizer / processor files ({', '.join(PROCESSOR_FILES)}): a "
            "save that stopped part-way, or a model saved without processor.save_pretrained(folder). Load a complete "
            "checkpoint-N folder of the run, or save the processor into the folder."
        )
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            check_safetensors(os.path.join(path, name))


def load_pretrained(path: str, *, dtype=None, attn_implementation: str | None = None, revision: str | None = None,
                    trust_remote_code: bool = False, bagel_weights: str | None = None, processing: str = "full"):
    """`(model, processing_class)` from a `tiny:` name, a saved folder or a hub id, for every supported family
    (table above). `dtype`: a torch dtype, its name, or None / "auto" (the checkpoint's dtype). `bagel_weights`:
    "ema" | "model", which weight set of a BAGEL release folder holding both (ignored for other folders).
    `processing`: "full" (the processor or tokenizer) | "image" (a Qwen-VL hub folder's image processor only, as
    the VT cache builder needs; other families return their processor)."""
    from transformers import AutoConfig

    path = os.fspath(path)
    name = tiny_name(path)
    if name is not None:
        model, processing_class = build_tiny(name)
        model.config.name_or_path = path
        return model, processing_class
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    check_saved_folder(path)
    release = release_folder_adapter(path)  # also registers the ports (their configs with AutoConfig)
    if release is not None:  # built whole on this rank, as `tiny:` models
        with _whole_on_this_rank():
            model, processing_class = release.load_release_folder(path, None if dtype == "auto" else dtype,
                                                                   bagel_weights)
        model.config.name_or_path = path
        return model, processing_class
    hub_kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    model_kwargs = dict(dtype=dtype or "auto", **hub_kwargs)
    if attn_implementation is not None:
        model_kwargs["attn_implementation"] = attn_implementation
    read_folder_config(path)  # a missing local folder is an error, never a hub look-up
    config = AutoConfig.from_pretrained(path, **hub_kwargs)
    # Whole on this rank, as a release folder: transformers' ZeRO-3 loading (zero.Init while `from_pretrained`
    # fills the weights) left a Qwen2.5-VL folder's embedding empty at the first generation ("Padding_idx must be
    # within num_embeddings"); DeepSpeed partitions the loaded model when the trainer prepares it.
    with _whole_on_this_rank():
        return adapter_class(config).load(path, model_kwargs, hub_kwargs, processing)


def load_config(path: str, *, revision: str | None = None, trust_remote_code: bool = False,
                bagel_weights: str | None = None):
    """The transformers config of what `load_pretrained` would load, without its weights (a `tiny:` model is
    built: it is cheap; a BAGEL release folder is read from its configs and safetensors headers)."""
    from transformers import AutoConfig

    name = tiny_name(path)
    if name is not None:
        return build_tiny(name)[0].config
    release = release_folder_adapter(path)  # also registers the ports (their configs with AutoConfig)
    if release is not None:
        return release.release_folder_config(path, bagel_weights)
    return AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)


# ----------------------------------------------------------------------------------------------- in-code models
TINY_PREFIX = "tiny:"
SHIPPED_WARMSTART = "warmstart"  # `init_weights` word for the quickstart's shipped warm-start weights


# The quickstart's warm-start weights, package data beside the quickstart that trains them (docs/quickstart.md).
SHIPPED_WARMSTART_FILE = "quickstart_warmstart.safetensors"


def shipped_warmstart(suffix: str = ""):
    """The shipped warm-start weights file (`suffix=".json"`: its settings key), as an importlib resource."""
    from importlib import resources

    return resources.files("opsd_trl") / "quickstart" / (SHIPPED_WARMSTART_FILE + suffix)


def _build_quickstart():
    from ..quickstart.policy import build_quickstart_model  # the quickstart owns its policy

    return build_quickstart_model()


def _tiny_builders() -> dict:
    from . import tiny

    return {
        "quickstart": _build_quickstart,
        "text_lm": tiny.build_tiny_text_lm,
        "qwen2_5_vl": tiny.build_tiny_qwen2_5_vl,
        "qwen3_vl": tiny.build_tiny_qwen3_vl,
    }


def tiny_name(model_name_or_path: str) -> str | None:
    """'tiny:quickstart' -> 'quickstart'; None for a real checkpoint."""
    if not model_name_or_path.startswith(TINY_PREFIX):
        return None
    name = model_name_or_path[len(TINY_PREFIX) :]
    if name not in _tiny_builders():
        raise ValueError(f"unknown tiny model {model_name_or_path!r}; known: "
                         f"{[TINY_PREFIX + n for n in _tiny_builders()]}")
    return name


def build_tiny(name: str):
    """`(model, processing_class)` of a `tiny:` model, built whole on this rank."""
    with _whole_on_this_rank():
        return _tiny_builders()[name]()


def init_weights_path(spec: str | None) -> str | None:
    """An `init_weights` value as a file path: `warmstart` is the quickstart's shipped warm-start."""
    return str(shipped_warmstart()) if spec == SHIPPED_WARMSTART else spec


def parse_image_processor_kwargs(value) -> dict | None:
    """`image_processor_kwargs` as given (a dict, JSON text on the command line, or None / "none") -> a dict or None;
    anything else is an error naming the field."""
    if isinstance(value, str):
        if value.strip() in ("", "none", "None", "null"):
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"image_processor_kwargs must be a JSON object of image-processor settings, e.g. "
                             f"'{{\"max_pixels\": 1003520}}'; got {value!r} ({e}).") from None
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"image_processor_kwargs must be a JSON object (setting: value), got {value!r}.")
    return value or None


def _probe(image_processor) -> None:
    """Run the image processor once on a small image (what every training image goes through)."""
    from PIL import Image

    image_processor(images=[Image.new("RGB", (64, 48), (120, 60, 30))], return_tensors="pt")


def apply_image_processor_kwargs(processing_class, kwargs: dict | None) -> None:
    """Set attributes of the processor's image processor (e.g. a recipe's BAGEL sizes `max_image_size`,
    `min_image_size`, `max_pixels`); every key must be an attribute it already has, and the processor must still
    process an image with each value (checked here, before any training step, naming the field)."""
    kwargs = parse_image_processor_kwargs(kwargs)
    if not kwargs:
        return
    image_processor = getattr(processing_class, "image_processor", None)
    unknown = sorted(k for k in kwargs if image_processor is None or not hasattr(image_processor, k))
    if unknown:
        raise ValueError(f"image_processor_kwargs {unknown} are not settings of this model's image processor "
                         f"({type(image_processor).__name__}); remove them or use the processor's own names.")
    defaults = {key: getattr(image_processor, key) for key in kwargs}
    for key in [*kwargs, None]:  # each setting alone (to name it), then all together
        for k, v in (kwargs.items() if key is None else [(key, kwargs[key])]):
            setattr(image_processor, k, v)
        try:
            _probe(image_processor)
        except Exception as e:
            for k, v in defaults.items():
                setattr(image_processor, k, v)
            bad = {key: kwargs[key]} if key is not None else kwargs
            raise ValueError(
                f"image_processor_kwargs {bad} break {type(image_processor).__name__} ({type(e).__name__}: {e}); "
                f"give values of the kind it has by default: {{{', '.join(f'{k!r}: {defaults[k]!r}' for k in bad)}}}."
            ) from None
        if key is not None:
            setattr(image_processor, key, defaults[key])


# ----------------------------------------------------------------------------------------------- checkpoint weights
def has_full_weights(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in (SAFE_WEIGHTS, SAFE_WEIGHTS_INDEX))


def _read_state_dict(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = os.path.join(folder, SAFE_WEIGHTS)
    if os.path.isfile(single):
        check_safetensors(single)
        return load_file(single, device="cpu")
    with open(os.path.join(folder, SAFE_WEIGHTS_INDEX)) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for name in files:
        check_safetensors(os.path.join(folder, name))
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


# ----------------------------------------------------------------------------------------------- EMA teacher start
def ema_start_weights(spec: str, model) -> tuple[dict[str, torch.Tensor] | None, str]:
    """`(state_dict under the model's names, where it came from)` for `VisualOPSDConfig.ema_init_weights`, or
    `(None, why)` when "auto" finds none. `spec`: a `.safetensors` file (the model's or its checkpoint's names), a
    BAGEL / ThinkMorph release folder (its `ema*.safetensors`), or "auto": the policy's own folder
    (`config.name_or_path`) when it is a release folder with `ema*.safetensors` (the Visual-OPSD reference starts its
    EMA teacher from them) or a folder with an `ema.safetensors`; else None (the EMA teacher starts from the policy)."""
    from safetensors.torch import load_file

    folder = spec
    if spec == "auto":
        folder = getattr(model.config, "name_or_path", None) or getattr(model.config, "_name_or_path", "")
        if not os.path.isdir(folder):
            return None, f"the policy {folder!r} is not a local folder"
        has_ema = any(f.startswith("ema") and f.endswith(".safetensors") for f in os.listdir(folder))
        if not has_ema:
            return None, f"{folder} has no ema*.safetensors"
    if os.path.isfile(folder):
        return to_module_keys(model, load_file(folder, device="cpu")), folder
    release = release_folder_adapter(folder) if os.path.isdir(folder) else None
    if release is not None:
        state, files = release.release_folder_ema(folder)
        return state, f"{folder} ({', '.join(files)})"
    if os.path.isfile(os.path.join(folder, "ema.safetensors")):
        path = os.path.join(folder, "ema.safetensors")
        return to_module_keys(model, load_file(path, device="cpu")), path
    raise FileNotFoundError(f"ema_init_weights={spec!r}: not a .safetensors file, a BAGEL release folder or a folder "
                            "with ema.safetensors; give one of these, 'auto' or None (the EMA teacher then starts "
                            "from the policy).")
