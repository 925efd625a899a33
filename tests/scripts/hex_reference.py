"""Float-hex reference of short trainings: prints every logged number of a 3-step run, and a checksum of the trained
weights, in float-hex for a few configurations. A refactor that must not change behaviour leaves the output
byte-identical (docs/development.md):

    python tests/scripts/hex_reference.py before.txt   # on the old commit
    python tests/scripts/hex_reference.py after.txt    # on the new one
    cmp before.txt after.txt

Configurations: the tiny text LM (self teacher, fused top-K loss; EMA teacher on the logits path; the sampled-token
reverse KL), the tiny Qwen2.5-VL (self, fused full-vocabulary; EMA, logits path) and the quickstart policy from its
shipped warm-start with the quickstart's own settings (fixed teacher, beta 1, VT cache off: online VTs).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from transformers.trainer_callback import PrinterCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: trainer_utils

from trainer_utils import make_trainer, text_dataset, vl_dataset  # noqa: E402

from opsd_trl.testing.tiny_models import build_tiny_qwen2_5_vl, build_tiny_text_lm  # noqa: E402


def _quickstart():
    """The quickstart policy, its contexts' words and 8 training mazes (the module moves between versions)."""
    try:
        from opsd_trl.quickstart import model as qs

        qs.build_quickstart_model  # noqa: B018 - the policy's module in this version
    except (ImportError, AttributeError):
        from opsd_trl.testing import quickstart_model as qs
    from opsd_trl.eval import vision_token_ids
    from opsd_trl.tasks import make_dataset

    model, processor = qs.load_weights(Path(str(qs.shipped_warmstart())))
    for p in model.model.visual.parameters():
        p.requires_grad_(False)
    data = make_dataset("maze", "train", 8, size=3, prompt="short", answer_format="numbered", seed=0)
    extra = dict(teacher_mode="fixed", beta=1.0, jsd_clip=None, teacher_top_k=None, max_completion_length=16,
                 max_image_skips=0, teacher_intro=qs.TEACHER_INTRO, teacher_transition=qs.TEACHER_TRANSITION,
                 lr_scheduler_type="cosine", warmup_steps=1, adam_beta2=0.95, max_grad_norm=1.0,
                 per_device_train_batch_size=4, learning_rate=5e-4,
                 generation_kwargs={"suppress_tokens": vision_token_ids(processor)})
    return model, processor, data, extra


def configurations():
    yield "text/self/fused-topk", lambda: (*build_tiny_text_lm(), text_dataset(4), dict(teacher_mode="self"))
    yield "text/ema/logits", lambda: (*build_tiny_text_lm(), text_dataset(4),
                                      dict(teacher_mode="ema", ema_decay=0.5, fused_loss=False, jsd_clip=0.05))
    yield "text/self/sampled_reverse_kl", lambda: (*build_tiny_text_lm(), text_dataset(4),
                                                   dict(loss_type="sampled_reverse_kl"))
    yield "vl/self/fused-full", lambda: (*build_tiny_qwen2_5_vl(), vl_dataset(4),
                                         dict(teacher_mode="self", teacher_top_k=None))
    yield "vl/ema/logits", lambda: (*build_tiny_qwen2_5_vl(), vl_dataset(4),
                                    dict(teacher_mode="ema", ema_decay=0.5, fused_loss=False))
    yield "quickstart/fixed", _quickstart


def main(path: str) -> None:
    torch.set_num_threads(1)
    lines = []
    for name, build in configurations():
        model, processing_class, dataset, extra = build()
        with tempfile.TemporaryDirectory() as tmp:
            trainer = make_trainer(model, processing_class, dataset, Path(tmp), **{"max_steps": 3, **extra})
            trainer.remove_callback(PrinterCallback)  # its dicts hold timings
            trainer.train()
        lines.append(f"== {name}")
        for entry in trainer.state.log_history:
            fields = [f"{k}={float(v).hex()}" for k, v in sorted(entry.items())
                      if isinstance(v, (int, float)) and not k.startswith(("time/", "step_time", "train_runtime",
                                                                          "train_samples", "train_steps"))]
            lines.append(" ".join(fields))
        checksum = sum(p.detach().double().sum() for p in model.parameters())
        lines.append(f"weights={float(checksum).hex()}")
    Path(path).write_text("\n".join(lines) + "\n")  # a file: libraries print to stdout


if __name__ == "__main__":
    main(sys.argv[1])
