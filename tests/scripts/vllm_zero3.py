"""VisualOPSDTrainer with real vLLM colocate (one engine per rank, TRL's external_launcher) under accelerate launch.

For each variant (plain | lora | ema), `trainer_checks.train_and_check`: 2 SGD steps, every vLLM generation compared
with HF greedy of the (ZeRO-3 gathered) policy; after a last sync, vLLM == HF on changed outputs. EMA: the HF greedy
under the EMA weights is recorded too (vLLM must follow the policy, not the EMA copy). Writes per-rank results, sync
times and peak RSS from the main process. Run with the .venv-vllm interpreter (scripts/test_vllm.sh).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vllm_support"))


def run_variant(variant: str, model_dir: str, out_dir: Path, steps: int) -> dict:
    from peft import LoraConfig
    from trainer_checks import train_and_check
    from trainer_utils import text_dataset

    from opsd_trl.models.loading import load_pretrained

    model, tok = load_pretrained(model_dir)
    model.name_or_path = model.config._name_or_path = model_dir  # what vLLM loads at start
    peft_config = None
    if variant == "lora":  # a large alpha so that 2 steps move the merged weights enough to change greedy tokens
        peft_config = LoraConfig(r=8, lora_alpha=256, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                                 lora_dropout=0.0)  # fmt: skip
    t0 = time.perf_counter()
    r = train_and_check(
        model, tok, text_dataset(n=8), out_dir / variant, steps=steps, peft_config=peft_config,
        per_device_train_batch_size=1, teacher_mode="ema" if variant == "ema" else "self", ema_decay=0.5,
        ddp_backend="gloo",
    )  # fmt: skip
    trainer = r.pop("trainer")
    r["train_s"] = time.perf_counter() - t0
    gen = trainer.generator
    t0 = time.perf_counter()
    gen.vllm.sync_weights()
    r["sync_s"] = time.perf_counter() - t0
    if variant == "ema":  # HF greedy under the EMA weights, on the same prompts
        from opsd_trl.generation import HFGenerator

        with trainer._teacher_weights(trainer.accelerator.unwrap_model(trainer.model)):
            hf = HFGenerator(trainer.model_wrapped, tok, gen.settings, trainer.accelerator)
            r["ema_hf"] = hf.generate(*r.pop("first_inputs")).completion_ids
    r.pop("first_inputs", None)
    r["zero_stage"] = trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None
    return r


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--variants", default="plain,lora,ema")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    from accelerate.utils import gather_object

    out = Path(args.out)
    results = {}
    for variant in args.variants.split(","):
        results[variant] = gather_object([run_variant(variant, args.model_dir, out.parent, args.steps)])
    rss_mb = gather_object([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024])
    if torch.distributed.get_rank() == 0:
        out.write_text(json.dumps(dict(world_size=torch.distributed.get_world_size(), results=results, rss_mb=rss_mb)))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
