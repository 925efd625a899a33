"""What the `self` teacher could reuse from the student: the shared prompt prefix, measured on the `arithmetic` task.

In `teacher_mode="self"` the teacher runs the student's weights, and its context starts with the student's own
prompt tokens up to where the privileged context is inserted (SDFT's template appends it to the last user turn). The
keys and values of that prefix are the same in both contexts, so the teacher forward could start from the prefix's
KV cache and run only the suffix (the privileged text, the rest of the prompt and the completion). This script
measures, with the trainer's own context builder (`opsd_trl.eval.Contexts`, as `bench_sdft.py`'s samples):
  - the shared prefix as a share of the teacher's tokens (prompt + `--completion` tokens);
  - the no-grad teacher forward of SmolLM2-135M-Instruct (fp32) on the full context against the same forward on the
    suffix given the prefix's KV cache (the cache built beforehand, as the student's forward would give it), median
    over `--repeats` interleaved runs;
  - the largest logit difference between the two, in float32 and float64 (rounding, or not).

    python benchmarks/bench_prefix_reuse.py                              # ~1 min on 2 CPU cores
    python benchmarks/bench_prefix_reuse.py --write docs/sdft.md          # also rewrite its section there
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sdft import TASK_KWARGS  # noqa: E402  (the same samples as the side-by-side benchmark)
from report import load_average, machine, write_section  # noqa: E402


def shared_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32, help="training samples whose contexts are measured")
    ap.add_argument("--batch", type=int, default=4, help="rows of the timed teacher forward")
    ap.add_argument("--completion", type=int, default=40, help="completion tokens (bench_sdft.py's length)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", help="also write the result into this page (docs/sdft.md), between the markers")
    a = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from opsd_trl.eval import Contexts
    from opsd_trl.tasks import make_dataset
    from opsd_trl.testing.pretrained import MODEL_DIR, prepare_smollm2

    prepare_smollm2()
    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    contexts = Contexts(tok)
    rows = list(make_dataset("arithmetic", "train", a.n, seed=0, **TASK_KWARGS))
    students = [contexts.prompt_ids(r, teacher=False)[0] for r in rows]
    teachers = [contexts.prompt_ids(r, teacher=True)[0] for r in rows]
    shared = [shared_prefix(s, t) for s, t in zip(students, teachers, strict=True)]
    teacher_tokens = [len(t) + a.completion for t in teachers]
    fraction = sum(shared) / sum(teacher_tokens)

    # The timed batch: the first rows, cut to a common teacher-prompt length, with a common prefix length.
    width, prefix = min(len(t) for t in teachers[: a.batch]), min(shared[: a.batch])
    completion = torch.randint(0, tok.vocab_size, (a.batch, a.completion), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([torch.tensor([t[:width] for t in teachers[: a.batch]]), completion], 1)

    def full(m):
        with torch.no_grad():
            return m(ids).logits

    def suffix(m):
        with torch.no_grad():
            cache = DynamicCache(config=m.config)
            m(ids[:, :prefix], past_key_values=cache, use_cache=True)  # what the student's forward would leave
            t0 = time.perf_counter()
            logits = m(ids[:, prefix:], past_key_values=cache, use_cache=True).logits
            return logits, time.perf_counter() - t0

    diff32 = (full(model)[:, prefix:] - suffix(model)[0]).abs().max().item()
    full_s, suffix_s = [], []
    for _ in range(a.repeats):  # interleaved: a load change hits both alike
        t0 = time.perf_counter()
        full(model)
        full_s.append(time.perf_counter() - t0)
        suffix_s.append(suffix(model)[1])
    model64 = model.to(torch.float64)
    diff64 = (full(model64)[:, prefix:] - suffix(model64)[0]).abs().max().item()
    tf, ts = statistics.median(full_s), statistics.median(suffix_s)
    body = (
        f"Command: `python benchmarks/bench_prefix_reuse.py {' '.join(sys.argv[1:])}`, measured "
        f"{time.strftime('%Y-%m-%d')}; {machine()}, {a.threads} torch thread(s); load average {load_average()} at "
        f"the end. Arithmetic {TASK_KWARGS}, {a.n} training samples, SmolLM2-135M-Instruct's chat template: student "
        f"prompt {statistics.mean(len(s) for s in students):.1f} tokens, teacher prompt "
        f"{statistics.mean(len(t) for t in teachers):.1f}, shared prefix {statistics.mean(shared):.1f}; with "
        f"{a.completion}-token completions the shared prefix is **{fraction:.1%} of the teacher's tokens**.\n\n"
        f"No-grad teacher forward, batch {a.batch} x {ids.shape[1]} tokens (prefix {prefix}), median of "
        f"{a.repeats}: full context {tf:.3f} s, suffix given the prefix's KV cache {ts:.3f} s: **{1 - ts / tf:.0%} "
        f"of the teacher forward saved**. Largest logit difference between the two: {diff32:.1e} in float32, "
        f"{diff64:.1e} in float64 (the same function, summed in another order)."
    )
    print(body)
    if a.write:
        write_section(a.write, "bench_prefix_reuse.py", body)


if __name__ == "__main__":
    main()
