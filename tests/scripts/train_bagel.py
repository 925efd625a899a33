"""A few Visual-OPSD steps of a saved tiny BAGEL (`--model-dir`, written by `save_tiny`), under whatever launcher
runs this script: plain python is the single-process reference, `accelerate launch` with a ZeRO-3 config the
distributed run. Greedy generation, so both runs train on the same completions. Writes losses, grad norms and the
final full weights next to `--out` (same JSON as train_opsd.py, which tests/test_trainer_distributed.py compares).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (trainer_utils)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--mode", default="ema")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    from safetensors.torch import save_file
    from trainer_utils import make_config, vl_dataset

    from opsd_trl import VisualOPSDTrainer
    from opsd_trl.models.loading import load_pretrained

    world = int(os.environ.get("WORLD_SIZE", "1"))
    model, processor = load_pretrained(args.model_dir)
    out = Path(args.out)
    config = make_config(
        out.parent, output_dir=str(out.parent / "run"), teacher_mode=args.mode, max_steps=args.steps,
        per_device_train_batch_size=2 // world, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant",
        ema_decay=0.5, ddp_backend="gloo" if world > 1 else None, max_completion_length=6,
    )
    trainer = VisualOPSDTrainer(model=model, args=config, train_dataset=vl_dataset(n=8), processing_class=processor)
    trainer.generator.settings.temperature = 0.0
    trainer.train()

    history = [h for h in trainer.state.log_history if "loss" in h]
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    shadow = trainer.teacher_shadow.state_dict() if trainer._shadow is not None else None
    if trainer.accelerator.is_main_process:
        weights = out.with_suffix(".safetensors")
        save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(weights))
        out.write_text(json.dumps({
            "world_size": world,
            "loss": [h["loss"] for h in history],
            "grad_norm": [h["grad_norm"] for h in history],
            "weights": str(weights),
            "shadow_numel": None if shadow is None else sum(v.numel() for v in shadow.values()),
        }))
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
