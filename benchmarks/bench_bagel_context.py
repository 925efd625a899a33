"""BAGEL teacher forward at long context: dense (L, L) mask with repeated K/V vs `query_chunk_size` (SDPA over
query chunks, mask built per chunk, K/V shared by their query groups). Each (mode, length) runs in a fresh process;
peak memory = the process's peak RSS minus its RSS after building the model and inputs (CPU), or
`torch.cuda.max_memory_allocated` on a GPU. No-grad forward of the language model over `inputs_embeds` with one
image block per 1,000 tokens (the teacher pass; the vision tower is not part of it with a VT cache).

    OMP_NUM_THREADS=1 python benchmarks/bench_bagel_context.py --lengths 1024 2048 4096
    python benchmarks/bench_bagel_context.py --device cuda --full-size --lengths 5000 15000 45000   # the plan
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
from report import write_section  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def one(mode: str, length: int, chunk: int, device: str, full: bool) -> dict:
    import torch

    from opsd_trl.models.bagel import BagelConfig, BagelModel

    torch.manual_seed(0)
    text = (dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=2, num_attention_heads=28,
                 num_key_value_heads=4) if full else
            dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2))
    text.update(vocab_size=1024, query_chunk_size=chunk if mode == "chunked" else None)
    config = BagelConfig(text_config=text, vision_config=dict(hidden_size=32, intermediate_size=64,
                                                              num_hidden_layers=1, num_attention_heads=2),
                         image_token_id=5, vision_start_token_id=6, vision_end_token_id=7)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = BagelModel(config).to(device, dtype).eval()
    ids = torch.randint(10, 1024, (1, length), device=device)
    image = torch.zeros_like(ids, dtype=torch.bool)
    for start in range(100, length - 900, 1000):  # a 784-token image block every 1,000 tokens
        image[0, start : start + 784] = True
    embeds = model.get_input_embeddings()(ids)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_mb()
    t0 = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, inputs_embeds=embeds, image_mask=image, use_cache=False)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {"mode": mode, "length": length, "seconds": round(time.perf_counter() - t0, 3), "peak_mb": round(peak, 1)}




def dense_gb(length: int, heads: int) -> float:
    """What the dense path holds at once, at least: the boolean (L, L) mask and fp32 (heads, L, L) scores."""
    return length**2 * (1 + 4 * heads) / 2**30


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--full-size", action="store_true", help="ThinkMorph-7B's layer sizes (2 layers)")
    p.add_argument("--dense-max-gb", type=float, default=8.0,
                   help="skip the dense path where its mask + scores alone would exceed this (it would swap or OOM)")
    p.add_argument("--write", help="also write the table into this page, between the generated markers")
    p.add_argument("--one", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.chunk, args.device, args.full_size)))
        return
    heads = 28 if args.full_size else 8
    load = os.getloadavg()[0]
    lines = [f"| L | dense s | dense peak MB | chunked({args.chunk}) s | chunked peak MB |", "|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for length in args.lengths:
        row = {}
        for mode in ("dense", "chunked"):
            if mode == "dense" and dense_gb(length, heads) > args.dense_max_gb:
                row[mode] = {"seconds": "not run", "peak_mb": f"needs > {dense_gb(length, heads):.0f} GB"}
                continue
            cmd = [sys.executable, __file__, "--one", mode, str(length), "--chunk", str(args.chunk), "--device",
                   args.device] + (["--full-size"] if args.full_size else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            row[mode] = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else \
                {"seconds": "failed", "peak_mb": out.stderr.strip().splitlines()[-1][:60]}
        lines.append(f"| {length:,} | {row['dense']['seconds']} | {row['dense']['peak_mb']} | "
                     f"{row['chunked']['seconds']} | {row['chunked']['peak_mb']} |")
        print(lines[-1], flush=True)
    if args.write:
        size = "ThinkMorph-7B layer sizes" if args.full_size else "hidden 256, 8 heads, 2 KV heads"
        body = (f"Command: `python benchmarks/bench_bagel_context.py {' '.join(sys.argv[1:])}` on {args.device}, 2 "
                f"layers ({size}), 1-min load average {load:.1f} at the start.\n\n" + "\n".join(lines))
        write_section(args.write, "bench_bagel_context.py", body)


if __name__ == "__main__":
    main()
