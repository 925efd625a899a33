"""VisualOPSDTrainer with real vLLM (colocate): every generation checked against HF greedy of the live policy.

Shared by tests/test_vllm.py (one process) and tests/scripts/vllm_zero3.py (2-process ZeRO-3). Test-only.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (trainer_utils)

from trainer_utils import make_trainer  # noqa: E402

from opsd_trl.generation import HFGenerator  # noqa: E402

VLLM_ARGS = dict(
    use_vllm=True,
    vllm_mode="colocate",
    vllm_gpu_memory_utilization=0.3,
    vllm_max_model_length=512,
    vllm_llm_kwargs={"dtype": "float32"},  # fp32 on both sides: greedy compared token for token
)


def train_and_check(model, processing_class, dataset, out_dir, steps=3, peft_config=None, **overrides) -> dict:
    """Train `steps` SGD steps with vLLM greedy generation; compare each vLLM generation with HF greedy of the policy
    at that moment (all ranks take part: under ZeRO-3 the HF reference gathers the model). After training, sync once
    more and compare on the first step's prompts. `model.name_or_path` must be a checkpoint vLLM can load."""
    kwargs = dict(max_steps=steps, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant",
                  max_completion_length=8, **VLLM_ARGS)  # fmt: skip
    kwargs.update(overrides)
    trainer = make_trainer(model, processing_class, dataset, out_dir, peft_config=peft_config, **kwargs)
    gen = trainer.generator
    gen.settings.temperature = gen.vllm.temperature = 0.0  # greedy (the HF settings and TRL's helper)
    ref_settings = dataclasses.replace(gen.settings, eos_token_ids=sorted(gen.eos_token_ids))
    records, syncs = [], []
    vllm_generate, vllm_sync = gen.generate, gen.sync_weights

    def reference(prompt_ids, images):
        hf = HFGenerator(trainer.model_wrapped, processing_class, ref_settings, trainer.accelerator)
        return hf.generate(prompt_ids, images).completion_ids

    def checked_generate(prompt_ids, images=None):
        out = vllm_generate(prompt_ids, images)
        records.append(dict(step=trainer.state.global_step, prompts=[list(p) for p in prompt_ids], images=images,
                            vllm=out.completion_ids, hf=reference(prompt_ids, images)))  # fmt: skip
        return out

    def counted_sync():
        syncs.append(trainer.state.global_step)
        vllm_sync()

    gen.generate, gen.sync_weights = checked_generate, counted_sync
    trainer.train()
    gen.generate = vllm_generate

    first = records[0]
    vllm_sync()  # the last optimizer step's weights
    final_vllm = gen.generate(first["prompts"], first["images"]).completion_ids
    final_hf = reference(first["prompts"], first["images"])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return dict(
        losses=losses,
        losses_finite=len(losses) == steps and all(math.isfinite(x) for x in losses),
        sync_steps=syncs,
        steps_checked=[r["step"] for r in records],
        mismatches=[(r["step"], r["vllm"], r["hf"]) for r in records if r["vllm"] != r["hf"]],
        first=first["vllm"],
        first_inputs=(first["prompts"], first["images"]),
        final_vllm=final_vllm,
        final_hf=final_hf,
        images_per_prompt=sorted({len(imgs) for r in records for imgs in (r["images"] or []) if imgs}),
        trainer=trainer,
    )
