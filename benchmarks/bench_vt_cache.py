"""VT cache benchmark, ratios measured side by side in one run (CPU, OMP_NUM_THREADS=1 recommended).

1. Teacher side, tiny Qwen2.5-VL, 8 VT images per sample: (a) VT features from the cache vs re-encoding the 8
   images (image processor + vision tower + merger); (b) a full teacher forward both ways (re-encode inside
   ``model(pixel_values=...)`` vs cached rows spliced into ``inputs_embeds`` with explicit M-RoPE positions).
2. Load latency p50 / p99 per sample (8 VTs) in random order from a synthetic cache of N samples.
3. Build throughput, images/s: tiny Qwen2.5-VL end to end, and the synthetic encoder (format overhead alone).
4. The stale-VT check (``check_vts``: SHA-256 of a sample's decoded VT pixels against the index's ``vt_digest``) per
   sample, beside reading the same sample from the cache and beside a training step of the tiny Qwen2.5-VL with
   the cache (the check runs inside that step).

    OMP_NUM_THREADS=1 python benchmarks/bench_vt_cache.py [--samples 10000] [--workdir DIR]
    OMP_NUM_THREADS=1 python benchmarks/bench_vt_cache.py --write docs/benchmarks.md  # also rewrite its section there
    OMP_NUM_THREADS=1 python benchmarks/bench_vt_cache.py --only check --write-check docs/vt_cache.md  # 4. alone
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from opsd_trl.testing.synthetic_encoder import SyntheticEncoder
from opsd_trl.vt_cache import VisionEncoder, VTCache, build_vt_cache, check_vts

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import load_average, machine, uptime, write_section  # noqa: E402

N_VTS = 8


def vt_image(i: int, size: int = 112) -> Image.Image:
    return Image.fromarray(np.random.RandomState(i).randint(0, 255, (size, size, 3), dtype=np.uint8))


class LazySamples:
    """``n`` samples of ``N_VTS`` images each, generated on access (no 80k images in memory)."""

    def __init__(self, n: int, size: int):
        self.n, self.size = n, size
        self.pool = [vt_image(i, size) for i in range(97)]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return {"id": f"s{i:06d}", "vt_images": [self.pool[(i * N_VTS + j) % 97] for j in range(N_VTS)]}


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def timeit(fn, reps: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def teacher_inputs(model, processor, images):
    """A teacher-like sequence: problem text, the 8 VT images, then a 64-token completion."""
    content = [{"type": "text", "text": "Solve the maze."}] + [{"type": "image"} for _ in images]
    text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True) + "step " * 13
    return processor(text=[text], images=images, return_tensors="pt")


@torch.no_grad()
def bench_teacher(workdir: Path, reps: int) -> dict:
    from opsd_trl.testing.tiny_models import build_tiny_qwen2_5_vl

    model, processor = build_tiny_qwen2_5_vl(seed=0)
    encoder = VisionEncoder(model, processor)
    images = [vt_image(1000 + j) for j in range(N_VTS)]
    cache = VTCache(build_vt_cache([{"id": "x", "vt_images": images}], encoder, workdir / "teacher", progress=False))
    inputs = teacher_inputs(model, processor, images)
    inner = model.model

    def reencode_forward():
        return model(**inputs).logits

    def cached_forward():
        entry = cache["x"]
        ids = inputs["input_ids"]
        embeds = inner.get_input_embeddings()(ids)
        mask = (ids == model.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, torch.cat(entry.embeds).to(embeds.dtype))
        pos, _ = inner.get_rope_index(ids, inputs["mm_token_type_ids"], image_grid_thw=entry.grid_thw,
                                      attention_mask=inputs["attention_mask"])
        inner.rope_deltas = None
        return model(inputs_embeds=embeds, position_ids=pos, attention_mask=inputs["attention_mask"]).logits

    inner.rope_deltas = None
    diff = (reencode_forward() - cached_forward()).abs().max().item()
    t_enc = timeit(lambda: encoder.encode(images), reps)
    t_load = timeit(lambda: cache["x"], reps)
    t_fwd_enc = timeit(reencode_forward, reps)
    t_fwd_cache = timeit(cached_forward, reps)
    return {
        "tokens_per_vt": cache["x"].embeds[0].shape[0], "seq_len": inputs["input_ids"].shape[1],
        "encode_8_ms": 1e3 * t_enc, "cache_8_ms": 1e3 * t_load, "features_speedup": t_enc / t_load,
        "forward_reencode_ms": 1e3 * t_fwd_enc, "forward_cached_ms": 1e3 * t_fwd_cache,
        "forward_speedup": t_fwd_enc / t_fwd_cache, "logits_max_abs_diff": diff,
    }


def bench_build_qwen(workdir: Path, n: int) -> dict:
    from opsd_trl.testing.tiny_models import build_tiny_qwen2_5_vl

    encoder = VisionEncoder(*build_tiny_qwen2_5_vl(seed=0))
    t = time.perf_counter()
    build_vt_cache(LazySamples(n, 112), encoder, workdir / "qwen_build", batch_size=8, progress=False)
    return {"qwen_build_images_per_s": n * N_VTS / (time.perf_counter() - t)}


def bench_load(workdir: Path, n: int, reps: int) -> dict:
    out = workdir / "synthetic"
    t = time.perf_counter()
    # hidden 128, 112x112 images -> 16 tokens per VT (the tiny model's geometry); 64 MB shards
    build_vt_cache(LazySamples(n, 112), SyntheticEncoder(hidden_size=128), out, batch_size=64,
                   shard_bytes=64 << 20, progress=False)
    build_s = time.perf_counter() - t
    anon0 = rss_kb("RssAnon")
    t = time.perf_counter()
    cache = VTCache(out)
    open_s = time.perf_counter() - t
    ids = list(cache.ids())
    random.Random(0).shuffle(ids)
    lat, cpu = [], []  # wall clock, and this thread's CPU time (immune to preemption on a loaded machine)
    for sid in ids[:reps]:
        t, c = time.perf_counter(), time.thread_time()
        entry = cache[sid]
        lat.append(time.perf_counter() - t)
        cpu.append(time.thread_time() - c)
        assert len(entry.embeds) == N_VTS
    lat_ms, cpu_ms = 1e3 * np.array(lat), 1e3 * np.array(cpu)
    return {
        "samples": n, "images": n * N_VTS, "shards": len(cache.manifest["shards"]),
        "tensor": f"{'x'.join(map(str, entry.embeds[0].shape))} {str(entry.embeds[0].dtype).removeprefix('torch.')}",
        "cache_mb": sum(s["bytes"] for s in cache.manifest["shards"]) / 2**20,
        "synthetic_build_images_per_s": n * N_VTS / build_s, "open_s": open_s,
        "load_p50_ms": float(np.percentile(lat_ms, 50)), "load_p99_ms": float(np.percentile(lat_ms, 99)),
        "load_max_ms": float(lat_ms.max()), "load_cpu_p50_ms": float(np.percentile(cpu_ms, 50)),
        "load_cpu_p99_ms": float(np.percentile(cpu_ms, 99)),
        # private memory grown while reading (mapped shard pages are file-backed page cache, not counted here)
        "anon_rss_growth_mb": (rss_kb("RssAnon") - anon0) / 1024, "file_rss_mb": rss_kb("RssFile") / 1024,
    }


CHECK_SIZES = (112, 448)  # VT side in pixels: the tiny model's geometry, and a ThinkMorph-like VT
STEP_BATCH = 2  # samples per training step in the step timing


def bench_check(workdir: Path, reps: int, steps: int) -> dict:
    """Per VT size: the stale-VT check of one sample (N_VTS VTs) vs `cache[id]` of the same sample, and the wall time
    of a training step (tiny Qwen2.5-VL, VT cache with problem images, STEP_BATCH samples of N_VTS VTs)."""
    from datasets import Dataset
    from transformers import TrainerCallback

    from opsd_trl import VisualOPSDConfig, VisualOPSDTrainer
    from opsd_trl.testing.tiny_models import build_tiny_qwen2_5_vl

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], 0.0

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)

    out = {}
    for size in CHECK_SIZES:
        model, processor = build_tiny_qwen2_5_vl(seed=0)
        model.model.visual.requires_grad_(False)  # a VT cache needs a frozen tower
        encoder = VisionEncoder(model, processor)
        images = [vt_image(2000 + j, size) for j in range(N_VTS)]
        cache = VTCache(build_vt_cache([{"id": "x", "vt_images": images}], encoder, workdir / f"check{size}",
                                       progress=False))
        entry = cache["x"]
        out[f"check_{size}_ms"] = 1e3 * timeit(lambda: check_vts(entry, images, "x", "bench"), reps)  # noqa: B023
        out[f"read_{size}_ms"] = 1e3 * timeit(lambda: cache["x"], reps)  # noqa: B023
        content = [{"type": "image"}, {"type": "text", "text": "Solve the maze."}]
        rows = [{"id": f"s{i}", "prompt": [{"role": "user", "content": content}], "images": [vt_image(3000 + i)],
                 "vt_images": [vt_image(4000 + N_VTS * i + j, size) for j in range(N_VTS)], "answer": "R"}
                for i in range(STEP_BATCH * (steps + 1))]
        dataset = Dataset.from_list(rows)
        cache_dir = build_vt_cache(dataset, encoder, workdir / f"train_cache{size}", problem_columns=["images"],
                                   progress=False)
        args = VisualOPSDConfig(
            output_dir=str(workdir / "run"), per_device_train_batch_size=STEP_BATCH, max_steps=steps + 1, bf16=False,
            use_cpu=True, gradient_checkpointing=False, max_completion_length=16, logging_steps=1, report_to=[],
            teacher_top_k=16, save_strategy="no", seed=0, disable_tqdm=True, dataloader_pin_memory=False,
            vt_cache_dir=str(cache_dir), max_prompt_length=None,
        )
        timer = StepTimer()
        VisualOPSDTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                          callbacks=[timer]).train()
        out[f"step_{size}_ms"] = 1e3 * float(np.median(timer.times[1:]))  # the first step warms up
        out["steps_timed"] = len(timer.times) - 1
    return out


def check_report(r: dict, reps: int, started: str, ended: str) -> str:
    """The generated section of docs/vt_cache.md: the stale-VT check's cost beside the cache read and a step."""
    env = "".join(f"{k}={os.environ[k]} " for k in ("OMP_NUM_THREADS",) if k in os.environ)
    command = " ".join([f"{env}python benchmarks/bench_vt_cache.py", *sys.argv[1:]])
    rows = [f"| {n}x{n} | {r[f'check_{n}_ms']:.2f} | {r[f'read_{n}_ms']:.2f} | {r[f'check_{n}_ms'] / r[f'read_{n}_ms']:.1f} "
            f"| {r[f'step_{n}_ms']:.0f} | **{100 * STEP_BATCH * r[f'check_{n}_ms'] / r[f'step_{n}_ms']:.2f}%** |"
            for n in CHECK_SIZES]
    return "\n".join([
        f"Command: `{command}`, measured {time.strftime('%Y-%m-%d')}. {machine()}, {torch.get_num_threads()} torch "
        f"thread(s); load average {started} at the start; `uptime` at the end: {ended}.",
        "",
        f"Per sample of {N_VTS} VTs: the check and `cache[id]` (CRC-checked read of the same sample), each the mean of "
        f"{reps} calls after a warm-up; a training step of the tiny Qwen2.5-VL with the cache ({STEP_BATCH} samples "
        f"of {N_VTS} VTs, median of {r['steps_timed']} steps after the first), which runs the check of its "
        f"{STEP_BATCH} samples:",
        "",
        "| VT size | check (ms / sample) | cache read (ms / sample) | check / read | step (ms) | checks / step |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "The check hashes pixels, so it grows with the VT size where the read (rows of tokens) hardly does; a real "
        "policy's step is far longer than the tiny model's, so its share of a step is smaller still.",
    ])  # fmt: skip


def report(r: dict, reps: int, started: str, ended: str) -> str:
    """The generated section of docs/benchmarks.md: the run's settings and load, then one table per measurement."""
    env = "".join(f"{k}={os.environ[k]} " for k in ("OMP_NUM_THREADS",) if k in os.environ)
    command = " ".join([f"{env}python benchmarks/bench_vt_cache.py", *sys.argv[1:]])
    return "\n".join([
        f"Command: `{command}`, measured {time.strftime('%Y-%m-%d')}. {machine()}, {torch.get_num_threads()} torch "
        f"thread(s); load average {started} at the start; `uptime` at the end: {ended}.",
        "",
        f"Teacher side, tiny Qwen2.5-VL: {N_VTS} VT images of 112x112 ({r['tokens_per_vt']} tokens each), teacher "
        f"sequence of {r['seq_len']} tokens; each time is the mean of {reps} calls after a warm-up.",
        "",
        "| measurement | re-encode (ms) | cached (ms) | ratio |",
        "|---|---|---|---|",
        f"| VT features for one sample ({N_VTS} images: image processor + tower + merger vs `cache[id]`) | "
        f"{r['encode_8_ms']:.2f} | {r['cache_8_ms']:.2f} | **{r['features_speedup']:.0f}x** |",
        f"| full teacher forward (`model(pixel_values=...)` vs spliced `inputs_embeds` + explicit M-RoPE) | "
        f"{r['forward_reencode_ms']:.2f} | {r['forward_cached_ms']:.2f} | **{r['forward_speedup']:.2f}x** |",
        "",
        f"Logits of the two teacher forwards: max abs diff {r['logits_max_abs_diff']:.3g}.",
        "",
        f"Load latency, synthetic cache of {r['samples']:,} samples x {N_VTS} VTs ({r['images']:,} tensors of "
        f"{r['tensor']}, {r['cache_mb']:.0f} MB in {r['shards']} shard(s)), random reads of one sample ({N_VTS} tensors, "
        "CRC-checked):",
        "",
        "| p50 wall (ms) | p99 wall (ms) | max wall (ms) | p50 thread CPU (ms) | p99 thread CPU (ms) | open (s) | "
        "private memory growth (MB) |",
        "|---|---|---|---|---|---|---|",
        f"| {r['load_p50_ms']:.2f} | **{r['load_p99_ms']:.2f}** | {r['load_max_ms']:.2f} | {r['load_cpu_p50_ms']:.2f} "
        f"| {r['load_cpu_p99_ms']:.2f} | {r['open_s']:.2f} | {r['anon_rss_growth_mb']:.0f} |",
        "",
        "Build throughput:",
        "",
        "| encoder | images/s |",
        "|---|---|",
        f"| tiny Qwen2.5-VL, end to end (batch 8 samples) | **{r['qwen_build_images_per_s']:.0f}** |",
        f"| synthetic (decode, hash, CRC, shard writing alone; batch 64 samples) | "
        f"{r['synthetic_build_images_per_s']:.0f} |",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=10_000, help="samples in the synthetic load cache")
    parser.add_argument("--reads", type=int, default=5_000, help="random reads timed")
    parser.add_argument("--reps", type=int, default=20, help="repetitions of each teacher-side timing")
    parser.add_argument("--build-samples", type=int, default=64, help="samples (x8 VTs) for the Qwen build timing")
    parser.add_argument("--workdir", type=Path, help="default: a temporary directory")
    parser.add_argument("--write", metavar="PAGE", help="also write the tables into this page (docs/benchmarks.md), "
                        "between the markers")
    parser.add_argument("--write-check", metavar="PAGE", help="also write the stale-VT check's table into this page "
                        "(docs/vt_cache.md), between the markers")
    parser.add_argument("--only", choices=["check"], help="run only the stale-VT check measurement (4.)")
    parser.add_argument("--check-reps", type=int, default=200, help="repetitions of each check / read timing")
    parser.add_argument("--steps", type=int, default=6, help="training steps timed (after one warm-up step)")
    args = parser.parse_args()
    torch.manual_seed(0)
    started = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        results = bench_check(workdir, args.check_reps, args.steps)
        if args.only is None:
            results.update({**bench_teacher(workdir, args.reps), **bench_build_qwen(workdir, args.build_samples),
                            **bench_load(workdir, args.samples, args.reads)})
    for k, v in results.items():
        print(f"{k:32s} {v:.4g}" if isinstance(v, float) else f"{k:32s} {v}")
    ended = uptime()
    check_body = check_report(results, args.check_reps, started, ended)
    print("\n" + check_body)
    if args.write_check:
        write_section(args.write_check, "bench_vt_cache.py", check_body)
    if args.only is None:
        body = report(results, args.reps, started, ended)
        print("\n" + body)
        if args.write:
            write_section(args.write, "bench_vt_cache.py", body)


if __name__ == "__main__":
    main()
