"""Train from a recipe: ``accelerate launch -m opsd_trl.train --config recipes/X.yaml [--field value ...]``.

The same entry as ``opsd-trl train``. Arguments are parsed by TRL's ``TrlParser`` over three dataclasses:
``ScriptArguments`` (below: data and model loading), ``VisualOPSDConfig`` (training) and TRL's ``ModelConfig``
(dtype, attention, LoRA). A YAML key sets a default, the command line overrides it, an unknown key is an error.
Start-up checks (``opsd_trl.startup_checks``) run before any weights load.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

from trl import ModelConfig, TrlParser

from .config import VisualOPSDConfig
from .data import DATASET_FORMATS

NONE_WORDS = ("", "none", "None", "null")


@dataclass
class ScriptArguments:
    """Data and model loading (the training fields live in `VisualOPSDConfig`, the model fields in `ModelConfig`)."""

    task: str | None = field(
        default=None, metadata={"help": "Procedural task (maze | jigsaw | arithmetic) generated on the fly instead of a dataset."}
    )
    task_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Task parameters for `opsd_trl.tasks.make_dataset` (JSON on the CLI)."}
    )
    task_n_train: int = field(default=1000, metadata={"help": "Generated training samples (with `task`)."})
    dataset_name: list[str] | None = field(
        default=None,
        metadata={"help": "Dataset(s): hub names, save_to_disk folders or data files; several are concatenated."},
    )
    dataset_format: str = field(
        default="standard",
        metadata={"help": "standard | thinkmorph | sdft (TRL SDFTTrainer's prompt + privileged_context; a standard "
                  "dataset with those columns and no image columns is read as sdft)."},
    )
    dataset_preset: str | None = field(
        default=None,
        metadata={"help": "A named data selection (opsd_trl.data.DATASET_PRESETS): thinkmorph = the reference's first "
                  "6990 / 6000 / 6000 / 6000 rows of the four ThinkMorph sets, with its row rules. dataset_name "
                  "then optionally gives local copies of the sets, in order; dataset_format is not read."},
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(
        default="test", metadata={"help": "Held-out split to evaluate on (sweeps; eval_strategy during training)."}
    )
    eval_n: int = field(default=200, metadata={"help": "Generated test samples for evaluation (with `task`)."})
    eval_max_new_tokens: int = field(default=64, metadata={"help": "Greedy tokens per sample at evaluation."})
    eval_batch_size: int = field(default=32, metadata={"help": "Samples per generation batch at evaluation."})
    init_weights: str | None = field(
        default=None,
        metadata={"help": "A .safetensors state dict (module names) loaded over the model, strictly; 'warmstart' = "
                  "the quickstart's shipped warm-start checkpoint (for tiny:quickstart); none = nothing."},
    )
    bagel_weights: str | None = field(
        default=None,
        metadata={"help": "BAGEL / ThinkMorph release folder holding both ema.safetensors and model.safetensors: "
                  "which to load (ema | model). Required there; ignored for other folders."},
    )
    image_processor_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Settings of the processor's image processor (JSON on the CLI), e.g. BAGEL's "
                  "{max_image_size, min_image_size, max_pixels}; a VT cache must be built with the same."},
    )
    freeze_vision_tower: bool = field(
        default=True,
        metadata={"help": "Keep the vision tower frozen (and out of LoRA); required by a VT cache."},
    )
    recipe: str | None = field(default=None, metadata={"help": "Recipe name for the model card (default: --config)."})

    def __post_init__(self):
        if isinstance(self.task_kwargs, str):
            try:
                self.task_kwargs = json.loads(self.task_kwargs)
            except json.JSONDecodeError as e:
                raise ValueError(f"task_kwargs must be a JSON object, e.g. '{{\"size\": 4}}'; got {self.task_kwargs!r} "
                                 f"({e}).") from None
        from .models.loading import parse_image_processor_kwargs

        self.image_processor_kwargs = parse_image_processor_kwargs(self.image_processor_kwargs)
        if self.bagel_weights in NONE_WORDS:
            self.bagel_weights = None
        if self.task_kwargs is not None and not isinstance(self.task_kwargs, dict):
            raise ValueError(f"task_kwargs must be a JSON object (field: value), got {self.task_kwargs!r}.")
        # The command line cannot spell None: these words unset a recipe's value.
        if self.init_weights in NONE_WORDS:
            self.init_weights = None
        if self.task in NONE_WORDS:
            self.task = None
        if self.dataset_preset in NONE_WORDS:
            self.dataset_preset = None
        if self.dataset_format not in DATASET_FORMATS:
            raise ValueError(f"dataset_format must be one of {DATASET_FORMATS}, got {self.dataset_format!r}.")
        if (self.task is None) == (not self.dataset_name and self.dataset_preset is None):
            raise ValueError("set exactly one of `task` (a procedural task) and `dataset_name`.")


def make_parser() -> TrlParser:
    return TrlParser((ScriptArguments, VisualOPSDConfig, ModelConfig), prog="opsd-trl train")


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, VisualOPSDConfig, ModelConfig]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv[:-1]:
        check_recipe(argv[argv.index("--config") + 1])
    script_args, training_args, model_args = make_parser().parse_args_and_config(argv)
    # A recipe may name a local folder under the home directory (`~/.cache/opsd_trl/...`); hub ids never start with ~.
    if model_args.model_name_or_path and model_args.model_name_or_path.startswith("~"):
        model_args.model_name_or_path = os.path.expanduser(model_args.model_name_or_path)
    training_args.resume_from_checkpoint = resume_spec(training_args.resume_from_checkpoint)
    if script_args.recipe is None and "--config" in argv:
        script_args.recipe = argv[argv.index("--config") + 1]
    return script_args, training_args, model_args


def check_recipe(path: str) -> None:
    """Refuse a recipe path that is not a file, and a key written twice at any level (YAML keeps the last one
    silently), naming the key and its lines; TrlParser then reads the recipe (and refuses unknown keys)."""
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"recipe {path} not found (--config); give a YAML recipe file, e.g. "
                                "recipes/cpu_quickstart.yaml.")

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            lines = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, str | int | float | bool) and key in lines:
                    raise ValueError(f"recipe {path}: key {key!r} is written twice (lines {lines[key]} and {line}); "
                                     "YAML would keep only the last value. Keep one.")
                lines[key] = line
            return super().construct_mapping(node, deep)

    with open(path) as f:
        yaml.load(f, Loader=UniqueKeys)  # noqa: S506 (a SafeLoader subclass)


RESUME_LAST = ("true", "last")
RESUME_NONE = ("", "false", "none", "null")


def resume_spec(value):
    """`resume_from_checkpoint` as the trainer takes it. The command line gives a string: `true` / `last` = the last
    complete checkpoint in output_dir (as YAML `true`), `false` / `none` = start fresh; anything else is a folder."""
    if isinstance(value, str):
        if value.strip().lower() in RESUME_LAST:
            return True
        if value.strip().lower() in RESUME_NONE:
            return None
    return None if value is False else value


# ----------------------------------------------------------------------------------------------- models
def load_model(script_args: ScriptArguments, model_args: ModelConfig, trust_remote_code: bool = False):
    """`(model, processing_class)` for a `tiny:` spec, a saved model folder of any supported family
    (`opsd_trl.models.loading`) or a hub id. `trust_remote_code` is `VisualOPSDConfig.trust_remote_code`
    (TRL's `ModelConfig` has no such field)."""
    from .models.adapters import get_adapter
    from .models.loading import apply_image_processor_kwargs, init_weights_path, load_pretrained

    path = model_args.model_name_or_path
    model, processing_class = load_pretrained(
        path, dtype=model_args.dtype, attn_implementation=model_args.attn_implementation,
        revision=model_args.model_revision, trust_remote_code=trust_remote_code,
        bagel_weights=script_args.bagel_weights,
    )
    apply_image_processor_kwargs(processing_class, script_args.image_processor_kwargs)
    if script_args.init_weights:
        _load_init_weights(model, init_weights_path(script_args.init_weights), path)
    if script_args.freeze_vision_tower:
        get_adapter(model).freeze_vision(model)
    return model.train(), processing_class


def _load_init_weights(model, file: str, model_name: str) -> None:
    from safetensors.torch import load_file

    from .checkpoints import check_safetensors

    check_safetensors(file)
    try:
        model.load_state_dict(load_file(file))
    except RuntimeError as e:
        raise ValueError(
            f"init_weights {file} does not fit model_name_or_path={model_name!r} ({str(e).splitlines()[0]} ...); "
            "pass the state dict of this model, or --init_weights none (the recipe's warm-start is for its own "
            "model)."
        ) from e


def peft_config(script_args: ScriptArguments, model_args: ModelConfig, model):
    """TRL's LoRA config from `ModelConfig`; a frozen vision tower stays out of it (the adapter's pattern)."""
    from trl import get_peft_config

    from .models.adapters import get_adapter

    config = get_peft_config(model_args)
    exclude = get_adapter(model).lora_exclude_modules
    if config is not None and script_args.freeze_vision_tower and exclude is not None:
        config.exclude_modules = exclude
    return config


# ----------------------------------------------------------------------------------------------- data
def load_train_dataset(script_args: ScriptArguments, training_args: VisualOPSDConfig):
    return _load_split(script_args, script_args.dataset_train_split, script_args.task_n_train, training_args.seed)


def load_eval_dataset(script_args: ScriptArguments, seed: int = 0):
    """The recipe's held-out rows (`dataset_test_split`), after `check_held_out`."""
    check_held_out(script_args)
    return _load_split(script_args, script_args.dataset_test_split, script_args.eval_n, seed)


def check_held_out(script_args: ScriptArguments) -> None:
    """An evaluation of a recipe never scores its training samples: its test split is not its train split, each
    dataset has both splits (`opsd_trl.data.load_any` refuses one it lacks) and they share no sample id."""
    from .data import ensure_ids, load_any, refuse_shared_ids

    train_split, test_split = script_args.dataset_train_split, script_args.dataset_test_split
    if train_split == test_split:
        raise ValueError(f"dataset_test_split and dataset_train_split are both {test_split!r}: the evaluation would "
                         "score the training samples; set dataset_test_split to a held-out split (e.g. test).")
    if script_args.task is not None:  # generated splits are disjoint by construction (`opsd_trl.tasks.split_of`)
        return
    from datasets import concatenate_datasets

    def ids(split):
        parts = [ensure_ids(load_any(name, split), split).select_columns(["id"]) for name in script_args.dataset_name]
        return concatenate_datasets(parts)

    names = ", ".join(script_args.dataset_name)
    refuse_shared_ids(ids(train_split), ids(test_split), f"{names} split {train_split!r}",
                      f"{names} split {test_split!r}")


def _load_split(script_args: ScriptArguments, split: str, n: int, seed: int):
    from datasets import concatenate_datasets

    from .data import load_any, load_preset, standardize
    from .tasks import make_dataset

    if script_args.task is not None:
        # Held-out splits are deduplicated (as in the quickstart): every evaluated maze is a distinct layout.
        kwargs = {"dedupe": split != "train", **(script_args.task_kwargs or {})}
        return make_dataset(script_args.task, split, n, seed=seed, **kwargs)
    if script_args.dataset_preset is not None:
        return load_preset(script_args.dataset_preset, split, script_args.dataset_name)
    parts = [standardize(load_any(name, split), script_args.dataset_format, split)
             for name in script_args.dataset_name]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    script_args, training_args, model_args = parse_args(argv)
    from .startup_checks import StartupError, validate

    try:
        validate(script_args, training_args, model_args)  # before any weights load
    except StartupError as e:
        print(f"opsd-trl train: {e}", file=sys.stderr)
        return 2

    import torch

    from .model_card import final_metrics
    from .trainer import VisualOPSDTrainer

    dataset = load_train_dataset(script_args, training_args)
    model, processing_class = load_model(script_args, model_args, training_args.trust_remote_code)
    # Evaluation during training (eval_strategy) scores the held-out split, with the sweep's checks.
    eval_dataset = load_eval_dataset(script_args, training_args.seed) if training_args.eval_strategy != "no" else None
    trainer = VisualOPSDTrainer(
        model=model, args=training_args, train_dataset=dataset, eval_dataset=eval_dataset,
        processing_class=processing_class, peft_config=peft_config(script_args, model_args, model),
    )
    trainer.model_card_info = {"recipe": script_args.recipe,
                               "dataset": script_args.task or script_args.dataset_name or script_args.dataset_preset}
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        with open(os.path.join(training_args.output_dir, "train_results.json"), "w") as f:
            json.dump(final_metrics(trainer.state.log_history), f, indent=1)
    trainer.create_model_card(model_name=os.path.basename(os.path.normpath(training_args.output_dir)))
    if training_args.push_to_hub:
        trainer.push_to_hub()
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # gloo on CPU hangs at exit otherwise
    return 0


if __name__ == "__main__":
    sys.exit(main())
