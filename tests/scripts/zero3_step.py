"""One forward + backward + SGD step of a saved tiny VLM under the launching accelerate config.

Each rank takes its share (``rank::world``) of a fixed global batch of image+text samples. The script writes the
global loss (mean over ranks of per-rank means over samples) and saves the post-step full weights, so a test
can compare both with a single-process step on the whole batch. ``make_batch`` / ``batch_loss`` are imported by
that test for the reference: one definition, no drift.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

N_SAMPLES = 4


def make_batch(processor, indices) -> dict:
    """Samples ``indices`` of the global batch, collated. All samples have the same length (no padding), so a
    rank's slice is exactly the rows the single-process batch has for those samples."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(N_SAMPLES, 56, 56, 3), dtype=np.uint8)
    texts, images = [], []
    for i in indices:
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Sample {i}: colour?"}]},
            {"role": "assistant", "content": f"colour {i} <image_start> done"},
        ]
        texts.append(processor.apply_chat_template(messages, tokenize=False))
        images.append(Image.fromarray(pixels[i]))
    return dict(processor(text=texts, images=images, return_tensors="pt"))


def batch_loss(model, batch, image_token_id: int) -> torch.Tensor:
    """Mean over samples of each sample's mean next-token cross-entropy (image placeholders excluded)."""
    logits = model(**batch).logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    mask = (targets != image_token_id).float()
    ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return ((ce * mask).sum(1) / mask.sum(1)).mean()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--lr", type=float, default=1.0)
    args = parser.parse_args()

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs
    from safetensors.torch import save_file

    from opsd_trl.models.loading import load_pretrained

    # gloo: DeepSpeed on CPU otherwise comes up as a single process.
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    rank, world = accelerator.process_index, accelerator.num_processes
    assert N_SAMPLES % world == 0, "every rank must hold the same number of samples for the mean to match"

    model, processor = load_pretrained(args.model_dir)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    if accelerator.state.deepspeed_plugin is not None:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = N_SAMPLES // world  # no dataloader to infer it from
        # Without a Trainer, "auto" gradient_clipping becomes 1.0, which would rescale the update to norm 1 and
        # hide a wrong gradient scale (e.g. summed instead of averaged over ranks). Compare the raw SGD step.
        ds_config["gradient_clipping"] = 0.0
    model, optimizer = accelerator.prepare(model, optimizer)

    batch = make_batch(processor, range(rank, N_SAMPLES, world))
    loss = batch_loss(model, batch, processor.image_token_id)
    accelerator.backward(loss)  # DeepSpeed / DDP average gradients over ranks = gradient of the global mean
    optimizer.step()
    optimizer.zero_grad()

    rank_losses = accelerator.gather(loss.detach().reshape(1)).tolist()
    state = accelerator.get_state_dict(model)  # ZeRO-3: gathers the partitioned parameters on the main process
    if accelerator.is_main_process:
        weights = Path(args.out).with_suffix(".safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
        result = {
            "world_size": world,
            "distributed_type": str(accelerator.distributed_type),
            "rank_losses": rank_losses,
            "loss": sum(rank_losses) / len(rank_losses),
            "weights": str(weights),
        }
        Path(args.out).write_text(json.dumps(result))
    accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
