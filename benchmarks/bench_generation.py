"""Generation throughput: vLLM (colocate, through opsd_trl.generation) vs HF generate, same prompts and weights.

Run in the vLLM venv (scripts/test_vllm.sh builds it):
    VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 HF_HUB_OFFLINE=1 \\
        .venv-vllm/bin/python benchmarks/bench_generation.py --prompts 32 --max-new-tokens 128
Prints one line per backend: new tokens, seconds, tokens/s, and the vLLM/HF ratio. The first vLLM call is a warm-up
(not timed). Default model: the tiny in-code Qwen2 (weights spread so it does not stop at once); `--model PATH`
takes a saved checkpoint instead. `--device cuda` times both backends on a GPU. `--write docs/benchmarks.md` also
writes the table into that page, between the script's markers.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "vllm_support"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import load_average, machine, uptime, write_section  # noqa: E402

# The environment the run needs or that changes its figures, written into the command line of the report.
REPORTED_ENV = ("OMP_NUM_THREADS", "VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING", "HF_HUB_OFFLINE")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="saved checkpoint (default: tiny in-code Qwen2)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--hf-batch", type=int, default=32, help="HF generate batch size")
    ap.add_argument("--dtype", default="float32", help="vLLM dtype (HF runs the model as loaded)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--write", metavar="PAGE", help="also write the table into this page (docs/benchmarks.md), "
                    "between the markers")
    args = ap.parse_args()
    started = load_average()

    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opsd_trl.generation import HFGenerator, SamplingSettings, VLLMGenerator

    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(args.model)
    else:
        from checkpoints import save_for_vllm

        from opsd_trl.testing.tiny_models import build_tiny_text_lm

        model, tok = build_tiny_text_lm()
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        save_for_vllm(model, tok, tempfile.mkdtemp())
    model.to(args.device)
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": f"question {i}: " + "x" * (i % 17)}],
                                add_generation_prompt=True, return_dict=True)["input_ids"]
        for i in range(args.prompts)
    ]  # fmt: skip
    # Sampled (T=1) like training; image-skip off so both backends do exactly one round.
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=1.0, image_skip_marker=None)

    def timed(generate):
        t0 = time.perf_counter()
        n = sum(len(c) for c in generate())
        return n, time.perf_counter() - t0

    vgen = VLLMGenerator(model, tok, Accelerator(cpu=args.device == "cpu"), settings, gpu_memory_utilization=0.3,
                         max_model_length=512, llm_kwargs=dict(dtype=args.dtype))  # fmt: skip
    vgen.generate(prompts[:2])  # warm-up
    v_tokens, v_s = timed(lambda: vgen.generate(prompts).completion_ids)
    hf = HFGenerator(model, tok, settings)
    batches = [prompts[i : i + args.hf_batch] for i in range(0, len(prompts), args.hf_batch)]
    hf.generate(prompts[:2])  # warm-up
    h_tokens, h_s = timed(lambda: [c for b in batches for c in hf.generate(b).completion_ids])
    torch_threads = torch.get_num_threads()
    print(f"prompts={args.prompts} max_new_tokens={args.max_new_tokens} device={args.device} threads={torch_threads}")
    print(f"vllm  {v_tokens:6d} tokens  {v_s:7.2f} s  {v_tokens / v_s:9.1f} tok/s")
    print(f"hf    {h_tokens:6d} tokens  {h_s:7.2f} s  {h_tokens / h_s:9.1f} tok/s")
    print(f"vllm/hf throughput ratio: {(v_tokens / v_s) / (h_tokens / h_s):.2f}x")
    if args.write:
        import vllm

        env = "".join(f"{k}={os.environ[k]} " for k in REPORTED_ENV if k in os.environ)
        command = " ".join([f"{env}.venv-vllm/bin/python benchmarks/bench_generation.py", *sys.argv[1:]])
        model_name = args.model or "tiny in-code Qwen2 (hidden 64)"
        body = "\n".join([
            f"Command: `{command}`, measured {time.strftime('%Y-%m-%d')}. {model_name}, {args.prompts} prompts, "
            f"{args.max_new_tokens} new tokens at most, temperature 1, vLLM {vllm.__version__} (colocate, dtype "
            f"{args.dtype}), HF batch {args.hf_batch}, device {args.device}, {torch_threads} torch thread(s), "
            f"{machine()}; load average {started} at the start; `uptime` at the end: {uptime()}.",
            "",
            "| backend | new tokens | seconds | tokens/s | throughput vs HF |",
            "|---|---|---|---|---|",
            f"| vLLM | {v_tokens} | {v_s:.2f} | {v_tokens / v_s:.1f} | **{(v_tokens / v_s) / (h_tokens / h_s):.2f}x** |",
            f"| HF generate | {h_tokens} | {h_s:.2f} | {h_tokens / h_s:.1f} | 1.00x |",
        ])  # fmt: skip
        print("\n" + body)
        write_section(args.write, "bench_generation.py", body)


if __name__ == "__main__":
    main()
