"""The cost of the paper recipes' vision-tower choice on the tiny Qwen2.5-VL: the reference's (tower + connector
trained, VTs and problem images encoded online under the teacher's EMA weights every step) vs the fast variant
(`*_frozen_vit.yaml`: frozen tower, VTs and problem images read from a VT cache built once).

Each variant runs in its own process: 1 warm-up step, then `--steps` timed steps (EMA teacher, batch 2, 3 VTs of
`--image` px per sample, 8-token completions, HF generation); time per step from the trainer's step times, peak RSS
of the process. The cache build is timed separately (once per dataset, not per step).

    OMP_NUM_THREADS=1 python benchmarks/bench_recipe_variants.py --write docs/recipes.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import load_average, machine, write_section  # noqa: E402

VARIANTS = {
    "reference": "tower + connector trained, VTs online (paper recipes)",
    "frozen_vit": "frozen tower, VT cache (`*_frozen_vit.yaml`)",
}


def dataset(n: int, side: int):
    from datasets import Dataset
    from PIL import Image

    def square(c, k):
        img = Image.new("RGB", (side, side), (40 * c % 256, 30 * k % 256, 200))
        img.paste((255 - 40 * c % 256, 90, 128), (0, 0, side // 2, side // 2))
        return img

    return Dataset.from_list([dict(id=f"s{i}", answer="R", images=[square(i, 9)], vt_images=[square(i, k)
                                                                                          for k in range(3)],
                                   prompt=[{"role": "user", "content": [{"type": "image"},
                                                                        {"type": "text", "text": f"Which way {i}?"}]}])
                              for i in range(n)])


def one(variant: str, steps: int, side: int, workdir: str) -> dict:
    import torch

    from opsd_trl import VisualOPSDConfig, VisualOPSDTrainer
    from opsd_trl.models.loading import load_pretrained
    from opsd_trl.vt_cache import VisionEncoder, build_vt_cache

    torch.manual_seed(0)
    model, processor = load_pretrained("tiny:qwen2_5_vl")
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": side * side}
    data = dataset(2 * (steps + 1), side)
    cache, build_seconds = None, None
    if variant == "frozen_vit":
        model.model.visual.requires_grad_(False)
        t0 = time.perf_counter()
        cache = build_vt_cache(data, VisionEncoder(model, processor), os.path.join(workdir, "cache"),
                               problem_columns=["images"], progress=False)
        build_seconds = time.perf_counter() - t0
    args = VisualOPSDConfig(
        output_dir=os.path.join(workdir, "run"), per_device_train_batch_size=2, max_steps=steps + 1, bf16=False,
        gradient_checkpointing=False, max_completion_length=8, logging_steps=1, report_to=[], learning_rate=1e-4,
        teacher_top_k=16, save_strategy="no", seed=0, disable_tqdm=True, dataloader_pin_memory=False,
        teacher_mode="ema", vt_cache_dir=str(cache) if cache else None)
    trainer = VisualOPSDTrainer(model=model, args=args, train_dataset=data, processing_class=processor)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "step_time" in h][1:]  # after the warm-up step
    mean = lambda key: sum(h[key] for h in logs) / len(logs)  # noqa: E731
    return {"variant": variant, "steps": len(logs), "step_s": mean("step_time"), "teacher_s": mean("time/teacher"),
            "student_s": mean("time/student"), "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "cache_build_s": build_seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--image", type=int, default=112, help="side of the VT and problem images (px)")
    p.add_argument("--write", help="also write the table into this page, between the generated markers")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--workdir", default="/tmp/bench_recipe_variants")
    args = p.parse_args()
    if args.one:
        os.makedirs(os.path.join(args.workdir, args.one), exist_ok=True)
        print(json.dumps(one(args.one, args.steps, args.image, os.path.join(args.workdir, args.one))))
        return
    started = load_average()
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--one", variant, "--steps", str(args.steps), "--image", str(args.image),
               "--workdir", args.workdir]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ref = rows[0]["step_s"]
    lines = [f"Tiny Qwen2.5-VL (`tiny:qwen2_5_vl`), 1 process, fp32, batch 2, 1 problem image + 3 VTs of "
             f"{args.image} px per sample, 8-token completions, EMA teacher, {args.steps} timed steps after 1 "
             f"warm-up; {machine()}; load average {started} at the start.", "",
             "| variant | trainable parameters | s / step | teacher s | student s | peak RSS MB | VT cache build s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        build = f"{r['cache_build_s']:.2f}" if r["cache_build_s"] is not None else "-"
        lines.append(f"| {VARIANTS[r['variant']]} | {r['trainable']:,} | {r['step_s']:.3f} "
                     f"({r['step_s'] / ref:.2f}x) | {r['teacher_s']:.3f} | {r['student_s']:.3f} | "
                     f"{r['peak_mb']:.0f} | {build} |")
    body = "\n".join(lines)
    print(body)
    if args.write:
        write_section(args.write, os.path.basename(__file__), body)


if __name__ == "__main__":
    main()
