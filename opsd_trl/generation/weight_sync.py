"""The policy's weights for vLLM, one parameter at a time (LoRA merged per layer, ZeRO-3 gathered per parameter)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import torch
from transformers.utils import logging

from ..zero3 import gathered

logger = logging.get_logger(__name__)

# --- weights, one parameter at a time --------------------------------------------------------------------------


def _vllm_name(name: str) -> str:
    # PEFT wrapping and activation checkpointing add prefixes that vLLM's checkpoint loaders do not know.
    name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    return name.replace("modules_to_save.default.", "").replace("_checkpoint_wrapped_module.", "")


def _checkpoint_namer(model):
    """`name -> the name vLLM loads it under, or None (not pushed)`: the family adapter's `vllm_weight_name` of the
    unwrapped HF name (BAGEL: upstream BAGEL's names, its qk-norm weights left out)."""
    from ..models.adapters import adapter_class

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    family_name = adapter_class(base.config).vllm_weight_name
    return lambda name: family_name(_vllm_name(name))


def iter_policy_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(checkpoint name, full tensor)` for every weight of the policy, one at a time (BAGEL: under upstream
    BAGEL's names, qk-norm left out, `_checkpoint_namer`).

    Under ZeRO-3 each parameter (or one LoRA layer's base + A + B) is gathered only while it is yielded: every rank
    must iterate. A PEFT LoRA model yields merged weights, computed per layer without touching the module.
    """
    modules = dict(model.named_modules())
    lora = _lora_layers(model, modules)
    vllm_name = _checkpoint_namer(model)
    for name, param in model.named_parameters():
        if "lora_" in name or "original_module" in name or "lora_magnitude_vector" in name:
            continue  # adapters are folded into the base weight below; original_module is shadowed by modules_to_save
        if vllm_name(name) is None:
            continue
        owner = name.rsplit(".", 2)[0] if name.endswith(".base_layer.weight") else None
        if owner in lora:
            layer = modules[owner]
            adapters = [a for a in layer.active_adapters if a in layer.lora_A and not layer.merged]
            extra = [p for a in adapters for p in (layer.lora_A[a].weight, layer.lora_B[a].weight)]
            with gathered([param, *extra]):
                weight = param.data
                for a in adapters:
                    weight = weight + layer.get_delta_weight(a).to(weight.dtype)
                yield vllm_name(name), weight
        else:
            with gathered([param]):
                # vLLM buffers a fused layer's inputs (q, k, v) until complete: copy what ZeRO-3 will free.
                yield vllm_name(name), param.data.clone() if hasattr(param, "ds_id") else param.data


def _lora_layers(model, modules) -> set[str]:
    if importlib.util.find_spec("peft") is None:
        return set()
    from peft.tuners.lora import LoraLayer

    names = set()
    for mname, module in modules.items():
        if isinstance(module, LoraLayer):
            if any(module.use_dora.get(a, False) for a in module.active_adapters):
                raise NotImplementedError("Weight sync of DoRA adapters is not supported; use plain LoRA.")
            names.add(mname)
    return names


def push_weights_to_vllm(llm, named_weights) -> None:
    """Load weights into a colocated `vllm.LLM` in place, then drop every cache computed with the old weights.

    `reload_weights(..., is_checkpoint_format=True)` runs vLLM's checkpoint loader, which works in any vLLM dtype;
    `model.load_weights` (TRL's path) fails when vLLM runs in float32 on CPU. Resetting the encoder cache is the fix
    for VLMs: without it a repeated image reuses (or misses) vision embeddings computed before the update.
    """
    runner = llm.llm_engine.model_executor.driver_worker.model_runner
    runner.reload_weights(weights_iterator=named_weights, is_checkpoint_format=True)
    _repack_cpu_embeddings(runner.get_model())
    llm.reset_prefix_cache()
    llm.llm_engine.reset_encoder_cache()


def _repack_cpu_embeddings(model) -> None:
    """vLLM on CPU keeps a packed GEMM copy of embedding matrices for the logits; a reload does not refresh it for
    tied embeddings (the lm_head would keep the old weights), so re-pack from the reloaded weight."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    for module in model.modules():
        if isinstance(module, VocabParallelEmbedding) and hasattr(module, "cpu_linear"):
            module.quant_method.process_weights_after_loading(module)
