"""Every TRL / transformers internal `VisualOPSDTrainer` and `opsd_trl.generation` rely on, named once with the reason.

Pinned to trl==1.16.0 and transformers 5.17: `tests/test_trl_hooks.py` checks that each hook below still exists
with the listed parameters and fails naming the hook when an upgrade changes one. Where TRL or transformers offer
no public way to do what is needed, the workaround lives here, one helper each.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Hook:
    owner: str  # "module:Qualified.name" ("module:" for a module-level function)
    name: str  # a method / function of `owner`; for an attribute (params None), a fragment of `owner`'s source
    params: tuple[str, ...] | None  # the method's parameters (inspect.signature)
    reason: str


HOOKS = [
    # --- private methods overridden --------------------------------------------------------------------------
    Hook("trl:DistillationTrainer", "_generate_single_turn",
         ("self", "prompt_ids", "images", "multimodal_fields", "has_tool_images"),
         "our sampler (opsd_trl.generation: image-skip rounds, vLLM weight sync in any dtype) replaces TRL's"),
    Hook("trl:DistillationTrainer", "_generate", ("self", "prompts"),
         "returns (prompt_ids, completion_ids, tool_mask, images, tool_images); we log the EOS rate and close "
         "truncated completions after TRL's length statistics"),
    Hook("trl:DistillationTrainer", "_generate_and_score_completions", ("self", "inputs"),
         "the generation batch: we mask empty completions, recount num_items_in_batch and add the teacher context"),
    Hook("trl:DistillationTrainer", "_compute_loss", ("self", "unwrapped_student", "inputs", "num_items_in_batch"),
         "our loss, run by TRL's compute_loss inside the wrapped forward (_forward_redirection); returns TRL's "
         "(loss, entropy_sum, n_valid)"),
    Hook("trl:DistillationTrainer", "_set_signature_columns_if_needed", ("self",),
         "keeps the columns the teacher needs (id, vt_images, vt_text) through remove_unused_columns"),
    Hook("transformers:Trainer", "_save_checkpoint", ("self", "model", "trial"),
         "atomic checkpoints and the teacher shadow file (opsd_trl.checkpoints)"),
    Hook("transformers:Trainer", "_save", ("self", "output_dir", "state_dict"),
         "every saved model folder also records its teacher-context words (teacher_context.save_context_words)"),
    Hook("transformers:Trainer", "_load_from_checkpoint", ("self", "resume_from_checkpoint", "model"),
         "full weights through the model's key mapping, loaded completely (the parent only warns on a mismatch)"),
    Hook("transformers:Trainer", "_load_best_model", ("self",), "the same complete, key-mapped load as resume"),
    Hook("trl:DistillationTrainer", "_get_train_sampler", ("self", "dataset"),
         "TRL's RepeatSampler, wrapped so that each epoch's order is a function of (seed, epoch) (EpochSeeded)"),
    Hook("trl:DistillationTrainer", "_get_eval_sampler", ("self", "eval_dataset"),
         "the same wrapper: every evaluation draws one order, whatever came before (a resume included)"),
    Hook("transformers:Trainer", "save_model", ("self", "output_dir", "_internal_call"),
         "the final save is marked incomplete until done (its Hub push moved after that); _internal_call tells a "
         "checkpoint's save from it"),
    Hook("transformers.trainer:Trainer.save_model", "if self.args.push_to_hub and not _internal_call", None,
         "the parent pushes at the end of save_model (see VisualOPSDTrainer.save_model)"),
    # --- private methods called ------------------------------------------------------------------------------
    Hook("trl:DistillationTrainer", "_get_last_hidden_state",
         ("self", "unwrapped_model", "input_ids", "attention_mask", "logits_to_keep", "pixel_values",
          "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes", "token_type_ids",
          "mm_token_type_ids", "image_position_ids"),
         "the student's completion hidden states, multimodal fields handled as TRL does"),
    Hook("transformers:Trainer", "_get_output_dir", ("self", "trial"), "where _save_checkpoint writes"),
    Hook("trl.models.utils:", "unwrap_model_for_generation",
         ("model", "accelerator", "gather_deepspeed3_params", "generation_kwargs", "gradient_checkpointing_kwargs"),
         "HF generate on a ZeRO-3 / wrapped policy"),
    # --- attributes read or written --------------------------------------------------------------------------
    Hook("trl:DistillationTrainer.__init__", "self._metrics", None,
         "per-mode lists of values TRL averages into each log"),
    Hook("trl:DistillationTrainer.__init__", "self.use_vllm", None,
         "TRL builds its own vLLM engine when args.use_vllm (see parent_init_without_vllm)"),
    Hook("trl:DistillationTrainer.__init__", "self.eos_token_ids", None, "what ends a completion"),
    Hook("trl:DistillationTrainer.__init__", "self.chat_template_kwargs", None, "rendering of the teacher prompt"),
    Hook("trl:DistillationTrainer.__init__", "self._tokenizer", None,
         "the processing class's tokenizer: pad id of the teacher sequences and of emptied completions"),
    Hook("transformers:Trainer.__init__", "self._signature_columns", None,
         "set by our _set_signature_columns_if_needed (None until then), read by remove_unused_columns"),
    Hook("trl.generation.vllm_generation:VLLMGeneration", "self._llm_weights_sleeping", None,
         "our sync_weights wakes the colocated engine's weights and must clear TRL's flag, as TRL's does"),
    Hook("transformers.integrations.deepspeed:", "_hf_deepspeed_config_weak_ref", None,
         "saved and restored around unset_hf_deepspeed_config while an in-code model is built whole "
         "(models/loading.py); transformers has no public getter for it"),
    Hook("trl:DistillationTrainer.compute_loss", '["entropy"]', None,
         "TRL logs a student entropy from _compute_loss's entropy_sum (see drop_parent_entropy)"),
    Hook("transformers.trainer:Trainer._save_checkpoint", "rotate_checkpoints(", None,
         "rotation inside the save (see rotation_deferred)"),
    Hook("trl.trainer.utils:RepeatSampler.__init__", "self.generator = torch.Generator()", None,
         "the sampler's own generator, reseeded per epoch (see EpochSeeded)"),
    Hook("trl.generation.vllm_generation:VLLMGeneration._init_vllm", "self.llm = LLM(", None,
         "TRL builds vllm.LLM from a fixed argument list (see vllm_llm_with)"),
    Hook("trl.generation.vllm_generation:VLLMGeneration", "sync_weights", ("self",),
         "overridden: our weight push (any dtype, LoRA merged per layer, encoder cache reset)"),
]


# --- workarounds, one helper each ------------------------------------------------------------------------------


@contextlib.contextmanager
def parent_init_without_vllm(args):
    """`DistillationTrainer.__init__` builds a vLLM engine whenever `args.use_vllm`; ours is built by
    `opsd_trl.generation` instead (image-skip rounds, weight sync in any dtype, encoder-cache reset). TRL has no
    switch for that, so `use_vllm` is hidden during the parent's __init__; yields the user's value."""
    use_vllm, args.use_vllm = args.use_vllm, False
    try:
        yield use_vllm
    finally:
        args.use_vllm = use_vllm


def no_entropy(loss: torch.Tensor, n_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_compute_loss`'s return in TRL's `(loss, entropy_sum, n_valid)` form. The student entropy TRL would log
    from `entropy_sum` costs a vocabulary projection; ours comes from the diagnostics (`entropy/student`,
    `entropy/teacher`) on logging steps, so a zero stands in and `drop_parent_entropy` removes TRL's metric."""
    return loss, torch.zeros((), device=loss.device), n_tokens


def drop_parent_entropy(metrics: dict) -> None:
    """Remove the `entropy` value TRL's `compute_loss` appended from `no_entropy`'s zero."""
    metrics.pop("entropy", None)


def step_will_log(args, state) -> bool:
    """Whether the optimizer step in progress (`state.global_step + 1`) ends with a log.

    transformers decides that in `DefaultFlowCallback` only after the step, too late for metrics computed during
    it; this is the same rule known at the step's start: `logging_first_step`, every `state.logging_steps` steps
    under `logging_strategy="steps"`, and the first step of each epoch under `"epoch"` (its log comes at the epoch's
    end and averages the epoch's values). The first step is always included, so that a run shorter than one
    logging interval still reports values in its final log.
    """
    step = state.global_step + 1
    if state.global_step == 0 or (args.logging_first_step and step == 1):
        return True
    if args.logging_strategy == "steps":
        return step % max(int(state.logging_steps), 1) == 0
    if args.logging_strategy == "epoch":
        return state.epoch is not None and float(state.epoch).is_integer()
    return False


@contextlib.contextmanager
def rotation_deferred(args):
    """`Trainer._save_checkpoint` deletes old checkpoints (`save_total_limit`) at its end, before the teacher
    shadow is written and every rank is done; a crash then could leave no complete checkpoint. The limit is
    lifted for the parent's save; yields it, for the caller to rotate once the checkpoint is complete."""
    limit, args.save_total_limit = args.save_total_limit, None
    try:
        yield limit
    finally:
        args.save_total_limit = limit


class EpochSeeded(torch.utils.data.Sampler):
    """TRL's `RepeatSampler` seeds its generator once and draws a new order at each `__iter__`, with no
    `set_epoch`: a run resumed in epoch e >= 1 restarts that generator and replays epoch 0's order. Here the
    generator is reseeded with `seed + epoch` before each pass (epoch 0: TRL's order), so an epoch's order is a
    function of (seed, epoch) that a resumed run reproduces (then skipping the epoch's trained batches), and that
    every process draws alike. The trainer sets the epoch itself (`VisualOPSDTrainer`, at each epoch's start):
    transformers' `set_epoch` does not reach a sampler under two accelerate wrappers (`SkipBatchSampler` over
    `BatchSamplerShard`: a multi-process run resumed inside an epoch)."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.sampler.shuffle:
            self.sampler.generator.manual_seed(self.sampler.seed + self.epoch)
        return iter(self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class EmptyCompletions:
    """Completions a generation backend returned empty. TRL's `_generate` needs a last token per completion, so an
    empty one travels as one pad token, flagged here from `_generate_single_turn` (where the backend's output is
    seen) to `_generate` and `_generate_and_score_completions` (where it is masked out and counted): TRL passes
    nothing else between those hooks."""

    def __init__(self):
        self.flags: list[bool] = []

    def fill(self, completion_ids: list[list[int]], pad_token_id: int) -> list[list[int]]:
        self.flags = [not ids for ids in completion_ids]
        return [ids or [pad_token_id] for ids in completion_ids]

    def of(self, n: int) -> list[bool]:
        """The flags of the last `fill` (all False when none was made for this batch)."""
        return self.flags or [False] * n

    def mask(self, completion_mask: torch.Tensor) -> int:
        """Zero the flagged rows of `completion_mask` in place; returns how many there were."""
        if any(self.flags):
            completion_mask[torch.tensor(self.flags, device=completion_mask.device)] = 0
        return sum(self.flags)

    def reset(self) -> None:
        self.flags = []


@contextlib.contextmanager
def vllm_llm_with(llm_kwargs: dict):
    """`VLLMGeneration._init_vllm` builds `vllm.LLM` from a fixed argument list, with no way to add engine options
    (e.g. `dtype` on CPU, `enable_prefix_caching`). While this block runs, the module's `LLM` is a factory that adds
    `llm_kwargs` (they override TRL's); the original is restored on exit."""
    from trl.generation import vllm_generation

    real_llm = vllm_generation.LLM

    def make_llm(**kwargs):
        return real_llm(**{**kwargs, **llm_kwargs})

    vllm_generation.LLM = make_llm
    try:
        yield
    finally:
        vllm_generation.LLM = real_llm
