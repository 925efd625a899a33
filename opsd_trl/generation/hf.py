"""HF `generate` on the (possibly accelerate / DeepSpeed wrapped) policy."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from trl.trainer.utils import pad

from .rounds import Generator, Images, SamplingSettings, _eos_ids, _tokenizer

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
