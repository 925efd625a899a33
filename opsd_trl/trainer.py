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
from trl.data_utils import prepare_multimodal_messages
from trl.trainer.utils import pad

from .checkpoints import is_complete, last_complete_checkpoint, mark_complete, mark_incomplete
from .config import VisualOPSDConfig
from .data import decode_sample_images, defer_image_decoding, validate_prompt, validate_standard
from .diagnostics import token_diagnostics
from .fused_loss import fused_generalized_jsd, unfusable_reason
from .generation import build_generator, require_vllm
from .losses import generalized_jsd, sampled_token_reverse_kl
from .models.adapters import SlotFeatures, get_adapter, head_logits, unwrap_base
from .models.loading import has_full_weights, load_checkpoint_weights
from .teacher_context import teacher_messages, tokenize_teacher_prompt
from .teacher_weights import ShadowWeights
from .vision_features import (
    cached_problem_slots,
    grids_per_sample,
    problem_image_slots,
    reusable,
    student_hidden_states,
)
from .vt_cache import VTCache, check_compatible
from .zero3 import gathered

logger = logging.get_logger(__name__)

SHADOW_FILE = "teacher_shadow_rank{rank}.safetensors"


def _map_datasets(eval_dataset):
    if isinstance(eval_dataset, dict):
        return {name: defer_image_decoding(ds) for name, ds in eval_dataset.items()}
    return defer_image_decoding(eval_dataset)


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
        # this class owns the teacher forward. vLLM is set up by `opsd_trl.generation` (image-skip rounds, weight
        # sync in any dtype, encoder-cache reset), not by the parent: hide `use_vllm` from its __init__.
        use_vllm, args.use_vllm = args.use_vllm, False
        train_dataset, eval_dataset = defer_image_decoding(train_dataset), _map_datasets(eval_dataset)
        super().__init__(
            model=model,
            teacher_model=None,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            peft_config=peft_config,
        )
        args.use_vllm = self.use_vllm = use_vllm
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
            self._check_cache()
        self._shadow: ShadowWeights | None = None
        self._resume_dir: str | None = None
        self._generator = None
        self._fuse_ok: bool | None = None
        self.add_callback(_TeacherUpdate(self))

    # ----------------------------------------------------------------------------------------------- set-up
    @property
    def generator(self):
        """The student sampler, built on first use: after `accelerator.prepare` has wrapped the model."""
        if self._generator is None:
            config = unwrap_base(self.model).config
            # A sampled image placeholder would match no image features in the student forward (both backends).
            suppress = [getattr(config, k, None) for k in ("image_token_id", "video_token_id")]
            extra = (
                {"llm_kwargs": self.args.vllm_llm_kwargs}
                if self.use_vllm
                else {"gather_deepspeed3_params": self.args.ds3_gather_for_generation}
            )
            self._generator = build_generator(
                self.args, self.model_wrapped, self.processing_class, self.accelerator,
                suppress_token_ids=[i for i in suppress if i is not None], **extra,
            )
            self._generator.eos_token_ids = set(self.eos_token_ids)
        return self._generator

    def _check_cache(self) -> None:
        check_compatible(self.vt_cache, unwrap_base(self.model), self.processing_class,
                         allow_trainable_vision=self.args.allow_trainable_vision_with_cache)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["id", "prompt", "image", "images", "vt_images", "vt_text"]

    @property
    def teacher_shadow(self) -> ShadowWeights:
        """The EMA / fixed teacher weights, created on first use (after DeepSpeed has partitioned the model)."""
        if self._shadow is None:
            self._shadow = ShadowWeights(self.model)
            if self._resume_dir is not None:
                path = os.path.join(self._resume_dir, SHADOW_FILE.format(rank=self.accelerator.process_index))
                if not os.path.isfile(path):
                    raise ValueError(
                        f"{self._resume_dir} has no teacher shadow for rank {self.accelerator.process_index} "
                        f"({os.path.basename(path)}): it was saved with another teacher_mode or number of processes. "
                        "Resume with the same teacher_mode and process count."
                    )
                self._shadow.load(path)
        return self._shadow

    def _teacher_weights(self, unwrapped):
        mode = self.args.teacher_mode
        if mode == "self":
            return contextlib.nullcontext()
        if mode == "fixed" and self._peft:
            return unwrapped.disable_adapter()
        # Under DeepSpeed, every gathered weight is released around the swap (see ShadowWeights.swapped).
        release = getattr(self.model_wrapped, "empty_partition_cache", None) if self.is_deepspeed_enabled else None
        return self.teacher_shadow.swapped(release_gathered=release)

    # ----------------------------------------------------------------------------------------------- generation
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
        # An empty completion (a backend that returned nothing) becomes one pad token with no loss weight:
        # the parent needs a last token, and `_generate_and_score_completions` masks it out and counts it.
        self._empty_completions = [not ids for ids in result.completion_ids]
        return [ids or [self._tokenizer.pad_token_id] for ids in result.completion_ids]

    def _generate(self, prompts: list):
        """The parent's generation (which logs lengths and `completions/clipped_ratio` of the sampled completions),
        then, with `close_truncated_completions`, the reference's closing of a cut completion: its last sampled token
        is replaced by the turn-closing token, which is scored like a sampled EOS (the reference's sampler drops the
        last token of a round cut by the budget, and its packer ends every completion with `<|im_end|>`)."""
        prompt_ids, completion_ids, tool_mask, images, tool_images = super()._generate(prompts)
        empty = self._empty_completions or [False] * len(completion_ids)
        sampled_eos = [not e and ids[-1] in self.eos_token_ids for ids, e in zip(completion_ids, empty, strict=True)]
        eos = torch.tensor(sampled_eos, dtype=torch.float32, device=self.accelerator.device)
        self._metrics[self._mode]["completions/eos_rate"].append(self.accelerator.gather(eos).mean().item())
        if self.args.close_truncated_completions:
            close = self._closing_token_id()
            completion_ids = [
                ids if e or ended else [*ids[:-1], close]
                for ids, e, ended in zip(completion_ids, empty, sampled_eos, strict=True)
            ]
        return prompt_ids, completion_ids, tool_mask, images, tool_images

    def _closing_token_id(self) -> int:
        """`image_skip_token` (`<|im_end|>`) when it is one of the EOS ids, else the tokenizer's EOS."""
        tok = self._tokenizer
        close = tok.convert_tokens_to_ids(self.args.image_skip_token)
        return close if close in self.eos_token_ids else tok.eos_token_id

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        inputs = [decode_sample_images(x) for x in inputs]
        self._check_samples(inputs)
        self._empty_completions = []
        output = super()._generate_and_score_completions(inputs)
        if any(self._empty_completions):
            empty = torch.tensor(self._empty_completions, device=output["completion_mask"].device)
            output["completion_mask"][empty] = 0
        # Recounted on every rank (a collective): the masked-out empty completions carry no tokens. What the loss is
        # divided by over the accumulation window: its completion tokens, or its samples with at least one token.
        mask = output["completion_mask"]
        local = mask.sum() if self.args.loss_normalization == "tokens" else (mask.sum(-1) > 0).sum()
        output["num_items_in_batch"] = self.accelerator.gather(local).sum()
        self._metrics[self._mode]["completions/empty"].append(float(sum(self._empty_completions)))
        output.update(self._teacher_batch(inputs, output))
        return output

    def _check_samples(self, inputs) -> None:
        for x in inputs:
            if "id" not in x:
                raise ValueError("every sample needs an `id` column (the VT cache key and the name used in errors).")
            validate_prompt(x)
            if self.adapter.uses_images:
                validate_standard({"images": [], **x})
            n_vt = len(x.get("vt_images") or []) if self.adapter.uses_images else None
            if self.args.on_missing_vt != "error":
                continue
            if self.vt_cache is not None and x["id"] in self.vt_cache:  # the cache is then the only VT source
                if self._cached_vt_count(x["id"]) == 0:
                    where = self.args.vt_cache_dir or "(vt_cache=)"
                    raise ValueError(
                        f"sample {x['id']!r} is in the VT cache {where} with no visual thoughts (its VT columns were "
                        "empty when the cache was built); fix the data and rebuild the cache, or set "
                        "on_missing_vt='no_vt_teacher'."
                    )
            elif not (n_vt if self.adapter.uses_images else x.get("vt_text")):  # a VLM's teacher never reads vt_text
                raise ValueError(
                    f"sample {x['id']!r} has no visual thoughts (vt_images / vt_text empty, not in the VT cache); "
                    "fix the data or set on_missing_vt='no_vt_teacher'."
                )

    def _cached_vt_count(self, sample_id) -> int:
        counter = getattr(self.vt_cache, "num_images", None)  # a VTCache counts from its index, reading nothing
        return counter(sample_id) if counter is not None else len(self.vt_cache[sample_id].embeds)

    # ----------------------------------------------------------------------------------------------- teacher batch
    def _vt_slots(self, x) -> list[SlotFeatures] | None:
        """This sample's VT features from the cache (None when they are encoded online or given as text)."""
        if self.vt_cache is None:
            return None
        if x["id"] not in self.vt_cache:
            if self.args.on_missing_vt == "error":
                raise KeyError(
                    f"sample {x['id']!r} is not in the VT cache {self.args.vt_cache_dir}; rebuild the cache over this "
                    "dataset or set on_missing_vt='no_vt_teacher'."
                )
            return []
        entry = self.vt_cache[x["id"]]
        grids = entry.grid_thw if entry.grid_thw is not None else [None] * len(entry.embeds)
        deep = entry.deepstack or [None] * len(entry.embeds)
        return [SlotFeatures(e, g, d) for e, g, d in zip(entry.embeds, grids, deep, strict=True)]

    def _teacher_batch(self, inputs, output) -> dict[str, Any]:
        """Per sample: teacher prompt ids + slot mask, and VT features (cache) or VT pixels (online)."""
        self._check_prompt_lengths(inputs, output["prompt_mask"].sum(-1).tolist(), "student")
        problem_tokens = self._problem_image_tokens(output, len(inputs))
        batch = {"sample_ids": [], "teacher_prompt_ids": [], "teacher_slot_mask": [], "vt_slots": [], "vt_pixels": []}
        batch["problem_slots_cached"] = self._cached_problem_slots(inputs, output)
        truncated, n_vts = 0, []
        for x, image_tokens in zip(inputs, problem_tokens, strict=True):
            slots, pixels, vt_tokens, n_all = self._sample_vts(x)
            truncated += n_all > len(vt_tokens)
            prompt = self._teacher_prompt(x, len(vt_tokens), image_tokens + vt_tokens, use_vt_text=slots is None)
            batch["sample_ids"].append(x["id"])
            batch["teacher_prompt_ids"].append(prompt.input_ids)
            batch["teacher_slot_mask"].append(prompt.slot_mask)
            batch["vt_slots"].append(slots or [])
            batch["vt_pixels"].append(pixels)
            n_vts.append(len(vt_tokens))
        self._check_prompt_lengths(inputs, [len(p) for p in batch["teacher_prompt_ids"]], "teacher")
        if truncated:
            self._metrics[self._mode]["vt/truncated"].append(truncated)
        self._metrics[self._mode]["vt/images_per_sample"].append(sum(n_vts) / len(n_vts))
        return batch

    def _cached_problem_slots(self, inputs, output) -> list:
        """Per sample, its problem-image features from the VT cache (None where not cached or not reusable)."""
        if not (self.args.reuse_problem_image_features and reusable(self.adapter, self.model)):
            return [None] * len(inputs)
        grids = grids_per_sample(output.get("image_grid_thw"), output.get("num_images") or [0] * len(inputs))
        return [cached_problem_slots(self.vt_cache, x, g) for x, g in zip(inputs, grids, strict=True)]

    @property
    def _mode(self) -> str:
        return "train" if self.model.training else "eval"

    def _check_prompt_lengths(self, inputs, lengths: list[int], role: str) -> None:
        limit = self.args.max_prompt_length
        for x, length in zip(inputs, lengths, strict=True):
            if limit is not None and length > limit:
                raise ValueError(
                    f"sample {x['id']!r}: {role} prompt has {length} tokens > max_prompt_length={limit}; raise the "
                    "limit or shorten the prompt" + (" / reduce max_vt_images." if role == "teacher" else ".")
                )

    def _problem_image_tokens(self, output, n_samples: int) -> list[list[int]]:
        """Per sample, the placeholder count of each problem image (from the student's image grids)."""
        grids, counts = output.get("image_grid_thw"), output.get("num_images") or [0] * n_samples
        tokens = self._placeholders_per_image(grids) if grids is not None else []
        offsets = [sum(counts[:i]) for i in range(n_samples)]
        return [tokens[o : o + n] for o, n in zip(offsets, counts, strict=True)]

    def _sample_vts(self, x):
        """`(cached slots | None, VT pixel inputs | None, placeholder count per kept VT, VTs available)`."""
        slots = self._vt_slots(x)
        if slots is not None:
            kept = slots[: self.args.max_vt_images]
            return kept, None, [s.embeds.shape[0] for s in kept], len(slots)
        images = list(x.get("vt_images") or []) if self.adapter.uses_images else []
        kept = images[: self.args.max_vt_images]
        if not kept:
            return None, None, [], len(images)
        pixels = self.processing_class.image_processor(images=kept, return_tensors="pt")
        return None, pixels, self._placeholders_per_image(pixels["image_grid_thw"]), len(images)

    def _placeholders_per_image(self, grid_thw) -> list[int]:
        """Image placeholder tokens per image: its pre-merge patch grid `(n, 3)` over the merge window."""
        merge = getattr(getattr(self.processing_class, "image_processor", None), "merge_size", 1)
        return (grid_thw.prod(-1) // merge**2).tolist()

    def _vt_text(self, x) -> str | None:
        """The sample's text VTs; under `noise_vt`, random vocabulary tokens as many as the VT text has (fresh every
        step; decoded, so re-tokenised about as long), so the control keeps the context length, not the content."""
        text = x.get("vt_text")
        if not (self.args.noise_vt and text):
            return text
        tok = self._tokenizer
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        special = set(tok.all_special_ids)
        ids = [i for i in torch.randint(len(tok), (2 * n + 8,)).tolist() if i not in special][:n]
        return tok.decode(ids)

    def _teacher_prompt(self, x, n_vt: int, tokens_per_slot: list[int], use_vt_text: bool):
        """Render and tokenize one sample's teacher context (slots: problem images, then VTs)."""
        messages = x["prompt"]
        if self.adapter.uses_images:
            messages = prepare_multimodal_messages(messages, images=x.get("images") or [])
        messages = teacher_messages(
            messages, n_vt=n_vt, intro=self.args.teacher_intro, transition=self.args.teacher_transition,
            vt_text=self._vt_text(x) if use_vt_text and not self.adapter.uses_images else None,
            as_images=self.adapter.uses_images,
        )
        text = self.processing_class.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **self.chat_template_kwargs
        )
        image_token = getattr(self.processing_class, "image_token", None) if self.adapter.uses_images else None
        tok = self._tokenizer
        return tokenize_teacher_prompt(
            text, tok, image_token=image_token, tokens_per_slot=tokens_per_slot, placeholder_id=tok.pad_token_id
        )

    # ----------------------------------------------------------------------------------------------- forward passes
    @torch.no_grad()
    def _teacher_hidden_states(self, unwrapped, inputs) -> torch.Tensor:
        """Teacher hidden states on the completion positions, `(B, C, H)`."""
        device = self.accelerator.device
        pad_id = self._tokenizer.pad_token_id
        prompt_ids = pad([torch.tensor(p) for p in inputs["teacher_prompt_ids"]], padding_value=pad_id,
                         padding_side="left").to(device)
        prompt_mask = pad([torch.ones(len(p), dtype=torch.long) for p in inputs["teacher_prompt_ids"]],
                          padding_value=0, padding_side="left").to(device)
        slot_mask = pad([torch.tensor(m) for m in inputs["teacher_slot_mask"]], padding_value=False,
                        padding_side="left").to(device)
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        slot_mask = torch.cat([slot_mask, torch.zeros_like(completion_ids, dtype=torch.bool)], dim=1)
        slots = self._slots_for_batch(unwrapped, inputs)
        hidden = self.adapter.teacher_hidden_states(unwrapped, input_ids, attention_mask, slot_mask, slots)
        c = completion_ids.size(1)
        return hidden[:, -c - 1 : -1, :]

    def _slots_for_batch(self, unwrapped, inputs) -> list[SlotFeatures]:
        """Row-major slot features: per sample its problem images (encoded now, under the teacher weights), then
        its VTs (from the cache, or encoded now)."""
        if not self.adapter.uses_images:
            return [s for per in inputs["vt_slots"] for s in self._embedding_noise(per)]
        problem: list[SlotFeatures] = inputs.get("problem_slots") or []  # shared with the student forward
        if inputs.get("problem_slots") is None and inputs.get("pixel_values") is not None:
            problem = self.adapter.encode_images(unwrapped, inputs["pixel_values"], inputs["image_grid_thw"])
        counts = inputs.get("num_images") or [0] * len(inputs["vt_slots"])
        slots, offset = [], 0
        for n_img, cached, pixels in zip(counts, inputs["vt_slots"], inputs["vt_pixels"], strict=True):
            slots += problem[offset : offset + n_img]
            offset += n_img
            slots += self._vt_features(unwrapped, cached, pixels)
        return slots

    def _vt_features(self, unwrapped, cached: list[SlotFeatures], pixels) -> list[SlotFeatures]:
        """One sample's VT features: cached, or encoded now; under `noise_vt`, the paper's control encodes standard
        Gaussian pixels of each VT's shape instead (fresh every step), or noises the features (`embeddings`)."""
        pixel_noise = self.args.noise_vt and self.args.noise_vt_space == "pixels"
        if pixels is None and not (pixel_noise and cached):
            return self._embedding_noise(cached)
        device = self.accelerator.device
        grid = pixels["image_grid_thw"] if pixels is not None else torch.stack([s.grid_thw for s in cached])
        if pixel_noise:
            values = torch.randn(int(grid.prod(-1).sum()), self.adapter.pixel_dim(), device=device)
        else:
            values = pixels["pixel_values"].to(device)
        return self._embedding_noise(self.adapter.encode_images(unwrapped, values, grid))

    def _embedding_noise(self, slots: list[SlotFeatures]) -> list[SlotFeatures]:
        """`noise_vt_space="embeddings"` (and text LMs' embedding VTs, which have no pixels): Gaussian features with
        each image's mean and std."""
        if not self.args.noise_vt or (self.adapter.uses_images and self.args.noise_vt_space == "pixels"):
            return slots
        def noise(t):
            return torch.randn_like(t) * t.std() + t.mean() if t is not None else None
        return [SlotFeatures(noise(s.embeds), s.grid_thw, noise(s.deepstack)) for s in slots]

    def _teacher_pass(self, unwrapped, inputs) -> dict[str, Any]:
        """Teacher hidden states (and the teacher's head when it differs from the policy's), computed under the
        teacher weights. Runs outside the student's wrapped forward, while ZeRO-3 holds every weight partitioned,
        so swapping in the shadow weights cannot leave a gathered live copy in use."""
        t0 = time.perf_counter()
        head = unwrapped.get_output_embeddings()
        with self._teacher_weights(unwrapped):
            hidden = self._teacher_hidden_states(unwrapped, inputs)
            teacher_head = None
            if self._teacher_head_differs(head):  # the EMA / fixed teacher's own head, when the head trains
                with gathered([head.weight]):
                    teacher_head = head.weight.detach().clone()
        self._metrics[self._mode]["time/teacher"].append(time.perf_counter() - t0)
        return {"teacher_hidden": hidden, "teacher_head": teacher_head}

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """Student forward + loss; runs inside the wrapped model's forward (ZeRO-3 gathers the head once)."""
        mode = self._mode
        head = unwrapped_student.get_output_embeddings()
        teacher_hidden, teacher_head = inputs["teacher_hidden"], inputs["teacher_head"]
        t1 = time.perf_counter()
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mm_keys = ("pixel_values", "image_grid_thw", "mm_token_type_ids")
        if inputs.get("problem_slots") is not None:  # the problem images' features, computed once this step
            student_hidden = student_hidden_states(self.adapter, unwrapped_student, input_ids, attention_mask,
                                                   inputs["problem_slots"], inputs["completion_ids"].size(1))
        else:
            student_hidden = self._get_last_hidden_state(
                unwrapped_student, input_ids, attention_mask, inputs["completion_ids"].size(1),
                **{k: inputs[k] for k in mm_keys if k in inputs},
            )
        t2 = time.perf_counter()
        mask = inputs["completion_mask"].bool()
        args = self.args
        teacher_weight = head.weight if teacher_head is None else teacher_head
        if args.loss_type == "gjsd" and self._fusable(unwrapped_student):
            loss, per_token = fused_generalized_jsd(
                student_hidden, teacher_hidden, head.weight, teacher_lm_head_weight=teacher_head, mask=mask,
                beta=args.beta, top_k=args.teacher_top_k, clip=args.jsd_clip, temperature=args.temperature,
                num_items_in_batch=num_items_in_batch, return_per_token=True, chunk_size=args.loss_chunk_size,
                clip_form=args.jsd_clip_form, normalization=args.loss_normalization,
            )
        else:
            student_logits = head_logits(unwrapped_student, student_hidden)
            teacher_logits = head_logits(unwrapped_student, teacher_hidden, weight=teacher_weight).detach()
            common = dict(temperature=args.temperature, mask=mask, num_items_in_batch=num_items_in_batch,
                          return_per_token=True, chunk_size=args.loss_chunk_size,
                          normalization=args.loss_normalization)
            if args.loss_type == "gjsd":
                loss, per_token = generalized_jsd(student_logits, teacher_logits, beta=args.beta,
                                                  top_k=args.teacher_top_k, clip=args.jsd_clip,
                                                  clip_form=args.jsd_clip_form, **common)
            else:
                loss, per_token = sampled_token_reverse_kl(student_logits, teacher_logits, inputs["completion_ids"],
                                                           **common)
        if not torch.isfinite(per_token[mask]).all() or not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss at step {self.state.global_step} for samples {inputs['sample_ids']}; not training "
                "on it (check the learning rate, the data and the VT features; see docs/troubleshooting.md)."
            )
        if self._is_logging_step():
            for key, value in token_diagnostics(
                student_hidden.detach(), teacher_hidden, head.weight.detach(), teacher_weight.detach(), mask,
                temperature=args.temperature, chunk_size=args.loss_chunk_size,
            ).items():
                self._metrics[mode][key].append(value)
        self._metrics[mode]["time/student"].append(t2 - t1)
        return loss, torch.zeros((), device=loss.device), mask.sum()

    def _problem_slots(self, unwrapped, inputs) -> list[SlotFeatures] | None:
        """The micro-batch's problem-image features for both forwards (frozen tower), else None (each forward
        encodes its own). Encoded under the live weights: a frozen tower is the teacher's too."""
        if not (self.args.reuse_problem_image_features and reusable(self.adapter, unwrapped)):
            return None
        return problem_image_slots(self.adapter, unwrapped, inputs)

    def _teacher_head_differs(self, head) -> bool:
        return self._needs_shadow() and head.weight.requires_grad

    def _fusable(self, model) -> bool:
        if self._fuse_ok is None:
            reason = unfusable_reason(model) if self.args.fused_loss else "fused_loss=False"
            self._fuse_ok = reason is None
            if reason is not None:
                logger.warning(f"Visual-OPSD loss: using the logits path ({reason}).")
        return self._fuse_ok

    def _is_logging_step(self) -> bool:
        """Diagnostics cost two extra vocabulary projections: compute them only for steps that get logged."""
        if not self.model.training:
            return True
        steps = self.args.logging_steps
        return (self.state.global_step + 1) % max(int(steps), 1) == 0 or self.state.global_step == 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        unwrapped = self.accelerator.unwrap_model(model)
        inputs = {**inputs, "problem_slots": self._problem_slots(unwrapped, inputs)}
        inputs = {**inputs, **self._teacher_pass(unwrapped, inputs)}
        loss = super().compute_loss(model, inputs, return_outputs=False, num_items_in_batch=num_items_in_batch)
        mode = self._mode
        self._metrics[mode].pop("entropy", None)  # replaced by entropy/student and entropy/teacher
        self._metrics[mode][self.args.loss_type].append(self.accelerator.gather(loss.detach()).mean().item())
        return (loss, None) if return_outputs else loss

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if self.is_world_process_zero():
            from .model_card import add_to_card

            add_to_card(self)  # the method, the recipe, the final metrics

    # ----------------------------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, model, trial):
        run_dir = self._get_output_dir(trial)
        folder = os.path.join(run_dir, f"checkpoint-{self.state.global_step}")
        if self.args.should_save:
            mark_incomplete(folder)
        self.accelerator.wait_for_everyone()
        # Older checkpoints are rotated away only once this one is complete.
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
            if self._needs_shadow():
                self.teacher_shadow.save(os.path.join(folder, SHADOW_FILE.format(rank=self.accelerator.process_index)))
            self.accelerator.wait_for_everyone()
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            mark_complete(folder)
            rotate_checkpoints(run_dir, save_total_limit=limit, best_model_checkpoint=self.state.best_model_checkpoint)

    def train(self, resume_from_checkpoint=None, **kwargs):
        if resume_from_checkpoint is True:  # the last *complete* checkpoint, not merely the last folder
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"no complete checkpoint in {self.args.output_dir} to resume from; start without "
                    "resume_from_checkpoint or point output_dir at the run to continue."
                )
        elif isinstance(resume_from_checkpoint, str):
            if not os.path.isdir(resume_from_checkpoint):
                raise ValueError(f"resume_from_checkpoint {resume_from_checkpoint} is not a folder.")
            if not is_complete(resume_from_checkpoint):
                previous = last_complete_checkpoint(os.path.dirname(resume_from_checkpoint.rstrip("/")))
                raise ValueError(
                    f"{resume_from_checkpoint} is not a complete checkpoint (its save was interrupted, or it has no "
                    "trainer_state.json); "
                    + (f"resume from {previous} instead." if previous else "no complete checkpoint is next to it.")
                )
        if resume_from_checkpoint is not None and self._needs_shadow():
            self._resume_dir = resume_from_checkpoint
            self._shadow = None  # rebuilt and loaded from the checkpoint at first use
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Full weights (no DeepSpeed: DeepSpeed resumes from its own engine state) go through the model's key
        mapping and must load completely; the parent's `load_state_dict(strict=False)` only warns, and matches
        none of the renamed Qwen2.5-VL keys."""
        model = self.model if model is None else model
        if not self._peft and not self.is_fsdp_enabled and has_full_weights(resume_from_checkpoint):
            load_checkpoint_weights(self.accelerator.unwrap_model(model), resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        """`load_best_model_at_end` without DeepSpeed: the same complete, key-mapped load as resume."""
        best = self.state.best_model_checkpoint
        if not self.is_deepspeed_enabled and not self.is_fsdp_enabled and not self._peft and has_full_weights(best):
            load_checkpoint_weights(self.accelerator.unwrap_model(self.model), best)
            return
        super()._load_best_model()

    def _needs_shadow(self) -> bool:
        return self.args.teacher_mode == "ema" or (self.args.teacher_mode == "fixed" and not self._peft)


__all__ = ["VisualOPSDConfig", "VisualOPSDTrainer"]
