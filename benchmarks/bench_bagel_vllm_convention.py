"""Measure how far vLLM's image convention for BAGEL is from BAGEL's own, on the same weights and inputs.

vLLM's `BagelForConditionalGeneration` runs the LLM as a plain Qwen2: image tokens get sequential positions and
causal attention. BAGEL gives an image block one shared position and full attention inside it. This script builds
the tiny random BAGEL twice (same seed, the two conventions) and reports, over the text tokens that follow the
images, the max |logit difference|, the max per-token KL(native || vLLM-like) and the greedy-token agreement, for
each factor alone and both together (the table in docs/models.md). `python benchmarks/bench_bagel_vllm_convention.py`.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from opsd_trl.diagnostics import full_vocab_kl
from opsd_trl.testing.tiny_bagel import build_tiny_bagel

CONVENTIONS = {
    "positions only (sequential, bidirectional)": dict(image_rope="sequential"),
    "attention only (shared, causal)": dict(image_attention="causal"),
    "vLLM (sequential, causal)": dict(image_rope="sequential", image_attention="causal"),
}


def _inputs(processor, n_images: int, seed: int):
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)) for _ in range(n_images)]
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": "Which way leads to the goal? Answer."}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    return processor(text=[text], images=[images], return_tensors="pt")


@torch.no_grad()
def measure(seeds=(0, 1, 2), n_images=(1, 3)) -> list[dict]:
    rows = []
    for name, overrides in CONVENTIONS.items():
        for n in n_images:
            stats = []
            for seed in seeds:
                native, processor = build_tiny_bagel(seed=seed)
                other, _ = build_tiny_bagel(seed=seed, **overrides)
                enc = _inputs(processor, n, seed)
                after = int(enc["mm_token_type_ids"][0].nonzero().max()) + 2  # past the last <|vision_end|>
                a, b = native(**enc).logits[0, after:], other(**enc).logits[0, after:]
                kl = full_vocab_kl(a, b)
                stats.append(((a - b).abs().max().item(), kl.max().item(),
                              (a.argmax(-1) == b.argmax(-1)).float().mean().item(), a.std().item()))
            s = np.array(stats)
            rows.append(dict(convention=name, images=n, max_abs_logit_diff=s[:, 0].max(), max_kl=s[:, 1].max(),
                             argmax_agreement=s[:, 2].mean(), logit_std=s[:, 3].mean()))
    return rows


def main() -> None:
    print("| convention | images | max abs logit diff | max KL (nats) | argmax agreement | logit std |")
    print("|---|---|---|---|---|---|")
    for r in measure():
        print(f"| {r['convention']} | {r['images']} | {r['max_abs_logit_diff']:.3g} | {r['max_kl']:.2g} | "
              f"{r['argmax_agreement']:.3f} | {r['logit_std']:.3g} |")


if __name__ == "__main__":
    main()
