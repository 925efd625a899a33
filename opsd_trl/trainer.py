"""`VisualOPSDTrainer`: one policy as on-policy student and visual-thought-conditioned teacher.

The step (one micro-batch), top to bottom:
  1. generation (parent, once per generation batch): student prompt -> completion, with image-skip rounds;
  2. teacher context (once per generation batch): student context + intro + VTs + transition, tokenized with slots
     for the image / VT embeddings;
  3. teacher forward, no_grad, under the teacher weights (live | EMA shadow | fixed), *before* the student forward so
     that swapping weights never touches tensors the student's backward needs;
  4. student forward on [prompt ; completion] with grad;
  5. loss on the completion positions (aligned token for token), normalised over the whole gradient-accumulation
     window by its completion tokens (`loss_normalization="tokens"`) or its samples (`"samples"`, each sample's
     mean first); EMA update after each optimizer step (callback).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import rotate_checkpoints
from transformers.utils import logging
from trl import DistillationTrainer

from . import trl_hooks
from .checkpoints import load_shadow, mark_complete, mark_incomplete, resolve_resume, shadow_path
from .config import VisualOPSDConfig
from .data import check_prompt_lengths, decode_sample_images, defer_image_decoding
from .fused_loss import unfusable_reason
from .generation import build_generator, close_truncated, closing_token_id, placeholder_token_ids, require_vllm
from .models.adapters import get_adapter, unwrap_base
from .models.loading import has_full_weights, load_checkpoint_weights
from .objective import completion_loss
from .teacher_context import TeacherContext
from .teacher_weights import ShadowWeights
from .vision_features import cached_problem_slots, problem_image_slots, reusable, student_hidden_states
from .vt_cache import VTCache, check_compatible
from .zero3 import gathered

logger = logging.get_logger(__name__)


class _TeacherUpdate(TrainerCallback):
    """EMA update after each optimizer step (the parent calls `on_step_end` after step, schedule and zero_grad)."""

    def __init__(self, trainer: VisualOPSDTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.args.teacher_mode == "ema":
            self.trainer.teacher_shadow.update(self.trainer.args.ema_decay)


class VisualOPSDTrainer(DistillationTrainer):
    """Visual-OPSD on top of `trl.DistillationTrainer` (generation, vLLM, PEFT, ZeRO-3, logging are inherited).

    Used like any TRL trainer. The dataset follows the standard layout of `docs/architecture.md`: `id`, `prompt`
    (chat messages), `images` (problem images), `vt_images` (visual thoughts, teacher only) or `vt_text`, `answer`.
    No second model is loaded: the teacher is the policy itself (see `teacher_mode`).
    """

    _tag_names = ["trl", "visual-opsd"]
    _name = "Visual-OPSD"

    def __init__(
        self,
        model,
        args: VisualOPSDConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
        vt_cache=None,
    ):
        args = args or VisualOPSDConfig(output_dir="visual-opsd")
        if not isinstance(args, VisualOPSDConfig):
            raise TypeError(f"args must be a VisualOPSDConfig, got {type(args).__name__}.")
        # teacher_model=None: the parent's teacher preparation (a second engine, eval() every step) is bypassed;
        # this class owns the teacher forward. vLLM is set up by `opsd_trl.generation`, not by the parent.
        train_dataset, eval_dataset = defer_image_decoding(train_dataset), defer_image_decoding(eval_dataset)
        with trl_hooks.parent_init_without_vllm(args) as use_vllm:
            super().__init__(model=model, teacher_model=None, args=args, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                             optimizers=optimizers, peft_config=peft_config)
        self.use_vllm = use_vllm
        if use_vllm:
            require_vllm()  # fail at start-up, with the install command, not at the first step
        self._last_synced_step = -1
        self.adapter = get_adapter(self.model)
        vocab = unwrap_base(self.model).config.get_text_config().vocab_size
        if args.teacher_top_k is not None and args.teacher_top_k > vocab:
            raise ValueError(f"teacher_top_k={args.teacher_top_k} exceeds the vocabulary ({vocab}); lower it or "
                             "set it to None (full vocabulary).")
        self._peft = hasattr(self.model, "disable_adapter")
        # A `VTCache` (checked against the policy: family, hidden size, vision weights, processor) or any mapping
        # from sample id to a `VTEntry`.
        self.vt_cache = vt_cache
        if self.vt_cache is None and args.vt_source == "cache":
            self.vt_cache = VTCache(args.vt_cache_dir)
        if isinstance(self.vt_cache, VTCache):
            check_compatible(self.vt_cache, unwrap_base(self.model), self.processing_class,
                             allow_trainable_vision=args.allow_trainable_vision_with_cache)
        self.teacher_context = TeacherContext(
            self.processing_class, intro=args.teacher_intro, transition=args.teacher_transition,
            uses_images=self.adapter.uses_images, chat_template_kwargs=self.chat_template_kwargs,
            max_vt_images=args.max_vt_images, vt_cache=self.vt_cache, vt_cache_name=args.vt_cache_dir,
            on_missing_vt=args.on_missing_vt, noise_vt=args.noise_vt, noise_vt_space=args.noise_vt_space,
            noise_vt_count=args.noise_vt_count,
        )
        self._shadow: ShadowWeights | None = None
        self._resume_dir: str | None = None
        self._generator = None
        self._fuse_ok: bool | None = None
        self._empty = trl_hooks.EmptyCompletions()
        self.add_callback(_TeacherUpdate(self))

    # ----------------------------------------------------------------------------------------------- set-up
    @property
    def generator(self):
        """The student sampler, built on first use: after `accelerator.prepare` has wrapped the model."""
        if self._generator is None:
            self._generator = build_generator(
                self.args, self.model_wrapped, self.processing_class, self.accelerator,
                suppress_token_ids=placeholder_token_ids(unwrap_base(self.model).config),
            )
            self._generator.eos_token_ids = set(self.eos_token_ids)
        return self._generator

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["id", "prompt", "image", "images", "vt_images", "vt_text"]

    @property
    def _mode(self) -> str:
        return "train" if self.model.training else "eval"

    # ----------------------------------------------------------------------------------------------- 1. generation
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        if self.use_vllm and self.state.global_step != self._last_synced_step:
            self.generator.sync_weights()  # the policy, never the EMA / fixed teacher weights
            self._last_synced_step = self.state.global_step
        # The wrapped model of now: a generator built before `train()` (e.g. to set its sampling) holds the bare
        # module, through which TRL's ZeRO-3 unwrap cannot take the engine's hooks off for the gathered generation.
        self.generator.model = self.model_wrapped
        t0 = time.perf_counter()
        result = self.generator.generate(prompt_ids, images)
        self._metrics[self._mode]["time/generation"].append(time.perf_counter() - t0)
        self._metrics[self._mode]["image_skips"].append(sum(result.num_image_skips) / max(len(prompt_ids), 1))
        # An empty completion (a backend that returned nothing) becomes one pad token with no loss weight.
        return self._empty.fill(result.completion_ids, self._tokenizer.pad_token_id)

    def _generate(self, prompts: list):
        """The parent's generation (which logs lengths and `completions/clipped_ratio` of the sampled completions),
        then the EOS rate and, with `close_truncated_completions`, the reference's closing of the completions cut by
        the budget (`generation.close_truncated`)."""
        prompt_ids, completion_ids, tool_mask, images, tool_images = super()._generate(prompts)
        empty = self._empty.of(len(completion_ids))
        sampled_eos = [not e and ids[-1] in self.eos_token_ids for ids, e in zip(completion_ids, empty, strict=True)]
        eos = torch.tensor(sampled_eos, dtype=torch.float32, device=self.accelerator.device)
        self._metrics[self._mode]["completions/eos_rate"].append(self.accelerator.gather(eos).mean().item())
        if self.args.close_truncated_completions:
            close = closing_token_id(self._tokenizer, self.args.image_skip_token, self.eos_token_ids)
            ended = [e or s for e, s in zip(empty, sampled_eos, strict=True)]
            completion_ids = close_truncated(completion_ids, ended, close)
        return prompt_ids, completion_ids, tool_mask, images, tool_images

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        inputs = [decode_sample_images(x) for x in inputs]
        self.teacher_context.check_samples(inputs)
        self._empty.reset()
        output = super()._generate_and_score_completions(inputs)
        n_empty = self._empty.mask(output["completion_mask"])
        # Recounted on every rank (a collective): the masked-out empty completions carry no tokens. What the loss is
        # divided by over the accumulation window: its completion tokens, or its samples with at least one token.
        mask = output["completion_mask"]
        local = mask.sum() if self.args.loss_normalization == "tokens" else (mask.sum(-1) > 0).sum()
        output["num_items_in_batch"] = self.accelerator.gather(local).sum()
        self._metrics[self._mode]["completions/empty"].append(float(n_empty))
        output.update(self._teacher_batch(inputs, output))
        return output

    # ----------------------------------------------------------------------------------------------- 2. teacher context
    def _teacher_batch(self, inputs, output) -> dict[str, Any]:
        """Per sample: teacher prompt ids + slot mask, and VT features (cache) or VT pixels (online)."""
        limit, grids, counts = self.args.max_prompt_length, output.get("image_grid_thw"), output.get("num_images")
        check_prompt_lengths(inputs, output["prompt_mask"].sum(-1).tolist(), "student", limit)
        batch, truncated, n_vts = self.teacher_context.batch(inputs, grids, counts)
        # The problem images' features the VT cache holds (problem columns), reused while the tower is frozen.
        reuse = reusable(self.adapter, self.model, self.args.reuse_problem_image_features)
        batch["problem_slots_cached"] = (cached_problem_slots(self.vt_cache, inputs, grids, counts) if reuse
                                         else [None] * len(inputs))
        check_prompt_lengths(inputs, [len(p) for p in batch["teacher_prompt_ids"]], "teacher", limit)
        if truncated:
            self._metrics[self._mode]["vt/truncated"].append(truncated)
        self._metrics[self._mode]["vt/images_per_sample"].append(sum(n_vts) / len(n_vts))
        return batch

    # ----------------------------------------------------------------------------------------------- 3. teacher forward
    def _teacher_pass(self, unwrapped, inputs) -> dict[str, Any]:
        """Teacher hidden states (and the teacher's head when it differs from the policy's), computed under the
        teacher weights. Runs outside the student's wrapped forward, while ZeRO-3 holds every weight partitioned,
        so swapping in the shadow weights cannot leave a gathered live copy in use."""
        t0 = time.perf_counter()
        head = unwrapped.get_output_embeddings()
        with self._teacher_weights(unwrapped):
            hidden = self._teacher_hidden_states(unwrapped, inputs)
            teacher_head = None
            if self._needs_shadow() and head.weight.requires_grad:  # the EMA / fixed teacher's own trained head
                with gathered([head.weight]):
                    teacher_head = head.weight.detach().clone()
        self._metrics[self._mode]["time/teacher"].append(time.perf_counter() - t0)
        return {"teacher_hidden": hidden, "teacher_head": teacher_head}

    def _teacher_weights(self, unwrapped):
        mode = self.args.teacher_mode
        if mode == "self":
            return contextlib.nullcontext()
        if mode == "fixed" and self._peft:
            return unwrapped.disable_adapter()
        # Under DeepSpeed, every gathered weight is released around the swap (see ShadowWeights.swapped).
        release = getattr(self.model_wrapped, "empty_partition_cache", None) if self.is_deepspeed_enabled else None
        return self.teacher_shadow.swapped(release_gathered=release)

    def _needs_shadow(self) -> bool:
        return self.args.needs_teacher_copy(peft=self._peft)

    @property
    def teacher_shadow(self) -> ShadowWeights:
        """The EMA / fixed teacher weights, created on first use (after DeepSpeed has partitioned the model)."""
        if self._shadow is None:
            self._shadow = ShadowWeights(self.model)
            if self._resume_dir is not None:
                load_shadow(self._shadow, self._resume_dir, self.accelerator.process_index)
        return self._shadow

    @torch.no_grad()
    def _teacher_hidden_states(self, unwrapped, inputs) -> torch.Tensor:
        """Teacher hidden states on the completion positions, `(B, C, H)`."""
        device = self.accelerator.device
        input_ids, attention_mask, slot_mask = self.teacher_context.sequences(inputs, self._tokenizer.pad_token_id,
                                                                              device)
        slots = self.teacher_context.slots_for_batch(self.adapter, unwrapped, inputs, device)
        hidden = self.adapter.teacher_hidden_states(unwrapped, input_ids, attention_mask, slot_mask, slots)
        c = inputs["completion_ids"].size(1)
        return hidden[:, -c - 1 : -1, :]

    # ----------------------------------------------------------------------------------------------- 4-5. student, loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        unwrapped = self.accelerator.unwrap_model(model)
        # With a frozen tower, the problem images' features are computed once here for both forwards (under the live
        # weights: a frozen tower is the teacher's too); else None and each forward encodes its own.
        shared = reusable(self.adapter, unwrapped, self.args.reuse_problem_image_features)
        inputs = {**inputs, "problem_slots": problem_image_slots(self.adapter, unwrapped, inputs) if shared else None}
        inputs = {**inputs, **self._teacher_pass(unwrapped, inputs)}
        # The parent runs `_compute_loss` inside the wrapped forward and normalises `num_items_in_batch`.
        loss = super().compute_loss(model, inputs, return_outputs=False, num_items_in_batch=num_items_in_batch)
        trl_hooks.drop_parent_entropy(self._metrics[self._mode])
        self._metrics[self._mode][self.args.loss_type].append(self.accelerator.gather(loss.detach()).mean().item())
        return (loss, None) if return_outputs else loss

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """Student forward + loss; runs inside the wrapped model's forward (ZeRO-3 gathers the head once)."""
        mode = self._mode
        t1 = time.perf_counter()
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        c = inputs["completion_ids"].size(1)
        if inputs.get("problem_slots") is not None:  # the problem images' features, computed once this step
            student_hidden = student_hidden_states(self.adapter, unwrapped_student, input_ids, attention_mask,
                                                   inputs["problem_slots"], c)
        else:
            mm = {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids") if k in inputs}
            student_hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, c, **mm)
        t2 = time.perf_counter()
        mask = inputs["completion_mask"].bool()
        loss, diagnostics = completion_loss(
            self.args, unwrapped_student, student_hidden, inputs["teacher_hidden"], inputs["teacher_head"], mask,
            inputs["completion_ids"], num_items_in_batch, fused=self._fusable(unwrapped_student),
            # Diagnostics cost two extra vocabulary projections: only for steps that get logged (and every eval batch).
            diagnose=not self.model.training or trl_hooks.step_will_log(self.args, self.state),
            step=self.state.global_step, sample_ids=inputs["sample_ids"],
        )
        for key, value in diagnostics.items():
            self._metrics[mode][key].append(value)
        self._metrics[mode]["time/student"].append(t2 - t1)
        return trl_hooks.no_entropy(loss, mask.sum())

    def _fusable(self, model) -> bool:
        """Whether the generalized JSD goes through the fused kernel; when it cannot, says why (once)."""
        if self.args.loss_type != "gjsd":  # the only loss with a fused kernel
            return False
        if self._fuse_ok is None:
            reason = unfusable_reason(model) if self.args.fused_loss else "fused_loss=False"
            self._fuse_ok = reason is None
            if reason is not None:
                logger.warning(f"Visual-OPSD loss: using the logits path ({reason}).")
        return self._fuse_ok

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if self.is_world_process_zero():
            from .model_card import add_to_card

            add_to_card(self)  # the method, the recipe, the final metrics

    # ----------------------------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, model, trial):
        """Atomic (`opsd_trl.checkpoints`): the folder is marked incomplete until every rank has written everything,
        teacher shadow included; older checkpoints are rotated away only then."""
        run_dir = self._get_output_dir(trial)
        folder = os.path.join(run_dir, f"checkpoint-{self.state.global_step}")
        if self.args.should_save:
            mark_incomplete(folder)
        self.accelerator.wait_for_everyone()
        with trl_hooks.rotation_deferred(self.args) as limit:
            super()._save_checkpoint(model, trial)
            if self._needs_shadow():
                self.teacher_shadow.save(shadow_path(folder, self.accelerator.process_index))
            self.accelerator.wait_for_everyone()
        if self.args.should_save:
            mark_complete(folder)
            rotate_checkpoints(run_dir, save_total_limit=limit, best_model_checkpoint=self.state.best_model_checkpoint)

    def train(self, resume_from_checkpoint=None, **kwargs):
        resume_from_checkpoint = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        if resume_from_checkpoint is not None and self._needs_shadow():
            self._resume_dir = resume_from_checkpoint
            self._shadow = None  # rebuilt and loaded from the checkpoint at first use
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self._load_full_weights(resume_from_checkpoint, self.model if model is None else model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):  # `load_best_model_at_end`
        if not self._load_full_weights(self.state.best_model_checkpoint, self.model):
            super()._load_best_model()

    def _load_full_weights(self, folder, model) -> bool:
        """Resume and best-model load: a checkpoint's full weights go through the model's key mapping and must load
        completely (the parent's `load_state_dict(strict=False)` only warns, and matches none of the renamed
        Qwen2.5-VL keys). False, loading nothing, where the parent's load applies: DeepSpeed (its engine state;
        transformers never resumes it through `_load_from_checkpoint`), FSDP, a PEFT adapter, no full weights."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or self._peft or not has_full_weights(folder):
            return False
        load_checkpoint_weights(self.accelerator.unwrap_model(model), folder)
        return True


__all__ = ["VisualOPSDConfig", "VisualOPSDTrainer"]
