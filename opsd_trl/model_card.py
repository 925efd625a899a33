"""The Visual-OPSD section of the model card: the method, the recipe, its key settings and the final metrics.

`VisualOPSDTrainer.create_model_card` (called on checkpoints, by `opsd-trl train` after `save_model`, and by
`push_to_hub`) appends it to TRL's card. The recipe comes from `trainer.model_card_info` (set by `opsd_trl.train`);
evaluation results added later (e.g. by a sweep) go through `add_eval_results`.
"""

from __future__ import annotations

import math
import os

from .config import GJSD, SAMPLED_REVERSE_KL

METHOD = (
    "Visual-OPSD (visual on-policy self-distillation, arXiv 2606.18974): the policy samples its own completions from "
    "the student context (problem image + question) and is trained towards the same weights conditioned on "
    "privileged visual thoughts (the teacher context), with a generalized JSD on the teacher's top-K tokens."
)
KEY_SETTINGS = ("beta", "teacher_top_k", "jsd_clip", "teacher_mode", "ema_decay", "temperature", "learning_rate",
                "max_steps", "max_completion_length", "max_vt_images", "noise_vt")
# The card lists these final training metrics (the log has many more: timings, length statistics).
CARD_METRICS = ("train_loss", "loss", GJSD, SAMPLED_REVERSE_KL, "kl_teacher_student", "entropy/student",
                "entropy/teacher", "completions/mean_length", "completions/eos_rate", "train_runtime", "step")
EVAL_HEADER = "## Evaluation"


def final_metrics(log_history: list[dict]) -> dict:
    """The last logged value of every numeric metric (the trainer logs loss, KL and timings at `logging_steps`)."""
    out = {}
    for entry in log_history:
        out.update({k: v for k, v in entry.items() if isinstance(v, int | float) and not isinstance(v, bool)})
    return out


def _fmt(value) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return str(value)


def section(args, info: dict, metrics: dict) -> str:
    lines = ["", "## Visual-OPSD", "", METHOD, ""]
    if info.get("recipe"):
        lines += [f"Recipe: `{info['recipe']}` (run it with `accelerate launch -m opsd_trl.train --config "
                  f"{info['recipe']}`).", ""]
    if info.get("dataset"):
        lines += [f"Training data: `{info['dataset']}`.", ""]
    lines += ["| setting | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(getattr(args, k))} |" for k in KEY_SETTINGS if hasattr(args, k)]
    if metrics:
        lines += ["", "### Final training metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    return "\n".join(lines) + "\n"


def add_to_card(trainer) -> None:
    """Append the section to the README.md that TRL's `create_model_card` has just written."""
    path = os.path.join(trainer.args.output_dir, "README.md")
    info = getattr(trainer, "model_card_info", None) or {}
    metrics = final_metrics(trainer.state.log_history)
    with open(path, "a") as f:
        f.write(section(trainer.args, info, {k: metrics[k] for k in CARD_METRICS if k in metrics}))


def add_eval_results(output_dir: str, metrics: dict) -> None:
    """Add (or replace) the evaluation table of a saved model's card."""
    path = os.path.join(output_dir, "README.md")
    text = open(path).read() if os.path.exists(path) else ""
    text = text.split("\n" + EVAL_HEADER)[0].rstrip("\n") + "\n"
    rows = [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    with open(path, "w") as f:
        f.write("\n".join([text, EVAL_HEADER, "", "| metric | value |", "|---|---|", *rows]) + "\n")
