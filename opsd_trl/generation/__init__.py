"""On-policy generation for Visual-OPSD: one small interface over HF `generate` and vLLM (TRL's helper).

- `HFGenerator`: `model.generate` on the (possibly accelerate / DeepSpeed wrapped) policy. Always available.
- `VLLMGenerator`: TRL 1.16's `VLLMGeneration` (colocate or server) with our own weight sync, which works in any
  vLLM dtype, never gathers the whole model on one rank, merges LoRA per layer, and also resets vLLM's encoder cache
  (TRL only resets the prefix cache, so a repeated image could reuse vision embeddings of the old weights).
- Image-skip rounds (both backends), as the reference sampler: a round that ends on EOS and whose text contains the
  marker is followed by one more round, whose context closes the turn with one `<|im_end|>` and opens the next as the
  chat format opens an assistant turn; the completion is the rounds' texts concatenated without those separators,
  all under one new-token budget. See docs/generation.md.

vllm is imported only when `VLLMGenerator` is built. Modules: `rounds` (settings, the interface, image-skip rounds,
truncated completions), `hf` (HF generate), `vllm_engine` (vLLM), `weight_sync` (the policy's weights for vLLM);
`build_generator` (here) picks the backend from a TRL config.
"""

from __future__ import annotations

from .hf import HFGenerator
from .rounds import (
    GenerationResult,
    Generator,
    SamplingSettings,
    close_truncated,
    closing_token_id,
    placeholder_token_ids,
    run_rounds,
    turn_opening,
)
from .vllm_engine import VLLM_INSTALL_HINT, VLLMGenerator, require_vllm
from .weight_sync import iter_policy_weights, push_weights_to_vllm

__all__ = [
    "GenerationResult",
    "Generator",
    "HFGenerator",
    "SamplingSettings",
    "VLLMGenerator",
    "VLLM_INSTALL_HINT",
    "build_generator",
    "close_truncated",
    "closing_token_id",
    "iter_policy_weights",
    "placeholder_token_ids",
    "push_weights_to_vllm",
    "require_vllm",
    "run_rounds",
    "turn_opening",
]


def build_generator(
    args, model, processing_class, accelerator=None, suppress_token_ids=(), **overrides
) -> Generator:
    """Pick the backend from the TRL config fields users know (`use_vllm`, `vllm_mode`, `vllm_*`, sampling).

    Image-skip fields are read when the config has them (`image_skip_marker`, `image_skip_token`,
    `max_image_skips`), as are `ds3_gather_for_generation` (HF) and `vllm_llm_kwargs` (vLLM); `overrides` go to the
    backend's constructor. Fails at startup with an install hint when vLLM is selected but missing.
    """
    defaults = SamplingSettings()
    settings = SamplingSettings(
        max_new_tokens=args.max_completion_length or defaults.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k or 0,
        min_p=args.min_p or 0.0,
        repetition_penalty=args.repetition_penalty,
        image_skip_marker=getattr(args, "image_skip_marker", defaults.image_skip_marker),
        image_skip_token=getattr(args, "image_skip_token", defaults.image_skip_token),
        max_image_skips=getattr(args, "max_image_skips", defaults.max_image_skips),
        suppress_token_ids=tuple(suppress_token_ids),
    )
    gen_kwargs = args.generation_kwargs if isinstance(args.generation_kwargs, dict) else None
    if not args.use_vllm:
        overrides.setdefault("gather_deepspeed3_params", getattr(args, "ds3_gather_for_generation", True))
        return HFGenerator(model, processing_class, settings, accelerator, generation_kwargs=gen_kwargs, **overrides)
    require_vllm()
    overrides.setdefault("llm_kwargs", getattr(args, "vllm_llm_kwargs", None))
    return VLLMGenerator(
        model,
        processing_class,
        accelerator,
        settings,
        mode=args.vllm_mode,
        generation_kwargs=gen_kwargs,
        structured_outputs_regex=args.vllm_structured_outputs_regex,
        server_base_url=args.vllm_server_base_url,
        server_host=args.vllm_server_host,
        server_port=args.vllm_server_port,
        server_timeout=args.vllm_server_timeout,
        group_port=args.vllm_group_port,
        tensor_parallel_size=args.vllm_tensor_parallel_size,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        max_model_length=args.vllm_max_model_length,
        max_num_seqs=args.per_device_train_batch_size
        * args.vllm_tensor_parallel_size
        * args.gradient_accumulation_steps,
        enable_sleep_mode=args.vllm_enable_sleep_mode,
        model_impl=args.vllm_model_impl,
        trust_remote_code=args.trust_remote_code,
        **overrides,
    )
