"""A few Visual-OPSD training steps of a saved tiny model, under whatever launcher runs this script.

Run plainly (`python train_opsd.py ...`) it is the single-process reference; under `accelerate launch` with a
ZeRO-3 / ZeRO-2 / DDP config it is the distributed run. Generation is greedy so both runs train on the same
completions. Writes the per-step losses and grad norms, and the final full weights (safetensors) next to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (trainer_utils)


def parse_args(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--kind", choices=["text", "vl"], default="text")
    parser.add_argument("--mode", default="self", help="teacher mode, or several comma-separated (one run each)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=2)
    parser.add_argument("--ga", type=int, default=1)
    parser.add_argument("--fused", type=int, default=1)
    parser.add_argument("--norm", default="tokens", help="loss_normalization: tokens | samples")
    parser.add_argument("--uneven", type=int, default=0, help="1: completion lengths differ between samples")
    parser.add_argument("--resume", default=None, help="checkpoint folder to resume from, or 'last'")
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--sample", type=int, default=0, help="1: sample at temperature 1 (tests RNG restore)")
    parser.add_argument("--kill-during-save-at", type=int, default=0, help="SIGKILL this process mid-save at step N")
    parser.add_argument("--kill-after-save-at", type=int, default=0,
                        help="SIGKILL this process once checkpoint-N is complete")
    parser.add_argument("--n-train", type=int, default=8, help="training rows")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--pause-at-step", type=int, default=0,
                        help="after step N, create <out dir>/paused and wait until <out dir>/go exists")
    parser.add_argument("--final-save", type=int, default=0, help="1: save_model(output_dir) after training")
    parser.add_argument("--kill-during-final-save", type=int, default=0,
                        help="1: SIGKILL this process once save_model has written the weights, before the processor")
    parser.add_argument("--then-resume-from", type=int, default=0,
                        help="N: after each mode's run, run it again in this process resumed from its checkpoint-N "
                             "(into <out dir>/resumed; its result under 'resumed')")
    parser.add_argument("--ema-init", default=None, help="ema_init_weights (e.g. auto)")
    parser.add_argument("--probe-teacher", type=int, default=0,
                        help="1: in ema mode, save the full teacher and student weights at the start and after step 1")
    return parser.parse_args(argv)


def stop_after_prompt_digit(tok):
    """A logits processor that forces EOS after `1 + d % 3` generated tokens, `d` the first digit of the prompt: the
    greedy completions of the tiny models get different lengths per sample, the same whatever the process count."""
    from transformers import LogitsProcessor, LogitsProcessorList

    start = tok.convert_tokens_to_ids("<|im_start|>")
    digits = {tok.convert_tokens_to_ids(str(d)): d for d in range(10)}
    opening = len(tok.encode("assistant\n"))

    class StopAfterPromptDigit(LogitsProcessor):
        def __call__(self, input_ids, scores):
            for r, row in enumerate(input_ids.tolist()):
                pos = len(row) - 1 - row[::-1].index(start)  # the assistant turn's <|im_start|>
                digit = next(digits[t] for t in row[:pos] if t in digits)
                if len(row) - pos - 1 - opening == 1 + digit % 3:
                    scores[r] = -float("inf")
                    scores[r, tok.eos_token_id] = 0.0
            return scores

    return LogitsProcessorList([StopAfterPromptDigit()])


def PauseAt(step: int, out_dir: Path):
    """A callback that holds the run after `step` (signalled by the file `paused`) until the file `go` exists."""
    import time

    from transformers import TrainerCallback

    class _PauseAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                (out_dir / "paused").touch()
                while not (out_dir / "go").exists():
                    time.sleep(0.05)

    return _PauseAt()


def TeacherProbe(trainer, out_dir: Path, mode: str):
    """A callback saving the full (ZeRO-3: gathered) weights the teacher pass sees and the student's, once training
    has begun (`<mode>-start-{teacher,student}`) and after the EMA update of step 1 (`<mode>-step1-...`)."""
    from safetensors.torch import save_file
    from transformers import TrainerCallback

    from opsd_trl.zero3 import gathered

    def full(model) -> dict:
        params = dict(model.named_parameters())
        with gathered(list(params.values())):  # every rank: a collective under ZeRO-3
            return {n: p.detach().clone().contiguous() for n, p in params.items()}

    def save(tag):
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        with trainer._teacher_weights(unwrapped):  # the swap the teacher pass runs under
            teacher = full(unwrapped)
        student = full(unwrapped)
        if trainer.accelerator.is_main_process:
            save_file(teacher, str(out_dir / f"{mode}-{tag}-teacher.safetensors"))
            save_file(student, str(out_dir / f"{mode}-{tag}-student.safetensors"))

    class _TeacherProbe(TrainerCallback):  # added after the trainer's EMA update: on_step_end sees the new shadow
        def on_train_begin(self, args, state, control, **kwargs):
            save("start")

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                save("step1")

    return _TeacherProbe()


def train_one(args, mode: str, out_dir: Path) -> dict:
    """Train with one teacher mode; return losses, grad norms, the final full weights' file and the shadow size."""
    from safetensors.torch import save_file
    from trainer_utils import make_config, text_dataset, vl_dataset

    from opsd_trl import VisualOPSDTrainer
    from opsd_trl.models.loading import load_pretrained

    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_device = args.global_batch // (world * args.ga)
    assert per_device * world * args.ga == args.global_batch, "the global batch must split evenly"
    model, processing_class = load_pretrained(args.model_dir, dtype="float32")  # any family: the CLI's loader
    dataset = text_dataset(n=args.n_train) if args.kind == "text" else vl_dataset(n=args.n_train)
    config = make_config(
        out_dir,
        output_dir=str(out_dir / "run"),
        teacher_mode=mode,
        max_steps=args.steps,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=args.ga,
        optim="sgd",
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        fused_loss=bool(args.fused),
        ema_decay=0.5,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        ddp_backend="gloo" if world > 1 else None,
        max_completion_length=6,
        loss_normalization=args.norm,
        ema_init_weights=args.ema_init if mode == "ema" else None,
    )
    trainer = VisualOPSDTrainer(model=model, args=config, train_dataset=dataset, processing_class=processing_class)
    if not args.sample:
        trainer.generator.settings.temperature = 0.0  # greedy: the same completions whatever the process count
    if args.uneven:
        trainer.generator.logits_processor = stop_after_prompt_digit(getattr(processing_class, "tokenizer",
                                                                              processing_class))
    if args.kill_during_save_at:
        save_rng = trainer._save_rng_state

        def save_rng_then_die(output_dir):  # the model and optimizer are on disk, the RNG and state are not
            if trainer.state.global_step == args.kill_during_save_at:
                os.kill(os.getpid(), signal.SIGKILL)
            save_rng(output_dir)

        trainer._save_rng_state = save_rng_then_die
    if args.kill_after_save_at:
        save_checkpoint = trainer._save_checkpoint

        def save_then_die(model, trial):  # a kill between two saves: checkpoint-N is complete, the run is not
            save_checkpoint(model, trial)
            if trainer.state.global_step == args.kill_after_save_at:
                os.kill(os.getpid(), signal.SIGKILL)

        trainer._save_checkpoint = save_then_die
    if args.pause_at_step:
        trainer.add_callback(PauseAt(args.pause_at_step, out_dir))
    if args.probe_teacher and mode == "ema":
        trainer.add_callback(TeacherProbe(trainer, out_dir, mode))
    trainer.train(resume_from_checkpoint=True if args.resume == "last" else args.resume)
    if args.kill_during_final_save:
        def save_processor_then_die(*a, **k):  # the weights are on disk, the tokenizer files are not
            os.kill(os.getpid(), signal.SIGKILL)

        trainer.processing_class.save_pretrained = save_processor_then_die
    if args.final_save or args.kill_during_final_save:
        trainer.save_model(config.output_dir)

    history = [h for h in trainer.state.log_history if "loss" in h]
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    weights = out_dir / f"weights-{mode}.safetensors"
    if trainer.accelerator.is_main_process:
        # clone: tied embeddings share storage, which safetensors refuses
        save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(weights))
    trainer.accelerator.wait_for_everyone()
    shadow = trainer._shadow.state_dict() if trainer._shadow is not None else None
    shadow_file = None
    if shadow is not None:  # this rank's pieces (ZeRO-3 partitions), as the checkpoint stores them
        shadow_file = out_dir / f"shadow-{mode}-rank{trainer.accelerator.process_index}.safetensors"
        save_file(shadow, str(shadow_file))
    return {
        "loss": [h["loss"] for h in history],
        "mean_length": [h["completions/mean_length"] for h in history],
        "min_length": [h["completions/min_length"] for h in history],
        "max_length": [h["completions/max_length"] for h in history],
        "grad_norm": [h["grad_norm"] for h in history],
        "generator_model": type(trainer.generator.model).__name__,  # what generation ran on (a wrapper or not)
        "weights": str(weights),
        "shadow": None if shadow_file is None else str(shadow_file),
        "shadow_numel": None if shadow is None else sum(v.numel() for v in shadow.values()),
    }


def run(argv=None) -> dict:
    """All requested modes in this process: `{"world_size": N, "runs": {mode: result}}` (written to --out)."""
    args = parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "runs": {mode: train_one(args, mode, out.parent) for mode in args.mode.split(",")},
    }
    if args.then_resume_from:  # a second trainer and engine in this process (a launch costs far more than a run)
        assert "," not in args.mode, "--then-resume-from takes one mode (the modes share <out dir>/run)"
        checkpoint = out.parent / "run" / f"checkpoint-{args.then_resume_from}"
        resumed = argparse.Namespace(**{**vars(args), "resume": str(checkpoint)})
        (out.parent / "resumed").mkdir(exist_ok=True)
        for mode in args.mode.split(","):
            result["runs"][mode]["resumed"] = train_one(resumed, mode, out.parent / "resumed")
    if int(os.environ.get("RANK", "0")) == 0:
        out.write_text(json.dumps(result))
    return result


def main():
    run()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
