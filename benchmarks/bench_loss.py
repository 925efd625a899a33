"""Side-by-side peak memory and time of the Visual-OPSD loss against the dense reference, TRL's functions and the
arithmetic floor.

Each (case, T) runs forward + backward in a fresh subprocess, after a warm-up call of the same case at T = 128 in that
process (threads, allocator). Extra peak memory is the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs after the inputs are built) minus its resident set at that point, so it counts only what the
loss and its backward allocate; inputs are excluded. Ratios are against the named row of the same T, measured in the
same run. Linux only.

    python benchmarks/bench_loss.py                 # small sizes, a smoke run (~1 min on 2 cores)
    python benchmarks/bench_loss.py --full          # V=152064, H=896; logits T in {128, 512, 1024}, fused T in
                                                    # {1024, 4096} (heavy on CPU: ~15-30 min on 2 cores)
    python benchmarks/bench_loss.py --full --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import load_average, machine, uptime, write_section  # noqa: E402

LOGITS_CASES = ("dense fp32 reference", "opsd top_k=256 clip=0.05", "trl GKD generalized_jsd_loss")
TRL, FULL, TOPK = "trl _chunked_divergence_loss", "opsd fused, full vocabulary", "opsd fused, top_k=256 clip=0.05"
FLOOR_FULL, FLOOR_TOPK = "floor: 4 vocabulary projections", "floor: teacher projection + top-K"
FUSED_CASES = (TRL, FULL, FLOOR_FULL, TOPK, FLOOR_TOPK)
CHUNK = 256  # VisualOPSDConfig.loss_chunk_size's default: what the trainer passes


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def dense_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """Straightforward full-vocabulary fp32 generalized JSD (what the chunked function replaces)."""
    log_s, log_t = student_logits.log_softmax(-1), teacher_logits.log_softmax(-1)
    log_m = torch.logsumexp(
        torch.stack([log_s + torch.log1p(torch.tensor(-beta)), log_t + torch.log(torch.tensor(beta))]), 0
    )
    terms = beta * log_t.exp() * (log_t - log_m) + (1 - beta) * log_s.exp() * (log_s - log_m)
    return terms.sum(-1).mean()


@torch.no_grad()
def floor(student_hidden, teacher_hidden, weight, top_k: int | None) -> None:
    """The arithmetic no implementation avoids, chunk by chunk like the fused loss: with top-K the teacher's projection
    and its top-K (the student needs only K rows); without, four ``(C, H) x (H, V)`` products (teacher and student
    logits, the gradients of the hidden rows and of the weight)."""
    h_s, h_t = student_hidden[0], teacher_hidden[0]
    grad_weight = None if top_k else torch.zeros_like(weight)
    for start in range(0, h_s.size(0), CHUNK):
        teacher = h_t[start : start + CHUNK] @ weight.T
        if top_k:
            teacher.topk(top_k, dim=-1)
            continue
        student = h_s[start : start + CHUNK] @ weight.T
        _ = student @ weight
        grad_weight.addmm_(student.T, h_s[start : start + CHUNK])


def _inputs(group: str, length: int, vocab: int, hidden: int):
    torch.manual_seed(0)
    if group == "fused":
        weight = (torch.randn(vocab, hidden) * 0.02).requires_grad_()
        student_hidden = torch.randn(1, length, hidden).requires_grad_()
        teacher_hidden = student_hidden.detach() + 0.3 * torch.randn(1, length, hidden)
        return (student_hidden, teacher_hidden, weight), (student_hidden, weight)
    student_logits = (torch.randn(1, length, vocab) * 3).requires_grad_()
    return (student_logits, torch.randn(1, length, vocab) * 3), (student_logits,)


def _call(case: str, inputs) -> torch.Tensor | None:
    from trl.experimental.gkd import GKDTrainer
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    from opsd_trl.fused_loss import fused_generalized_jsd
    from opsd_trl.losses import generalized_jsd

    if case in (FLOOR_FULL, FLOOR_TOPK):
        return floor(*inputs, top_k=256 if case == FLOOR_TOPK else None)
    if case in FUSED_CASES:
        hs, ht, w = inputs
        mask = torch.ones(hs.shape[:2], dtype=torch.bool)
        if case == TRL:
            return _chunked_divergence_loss(hs, ht, w, w.detach(), mask, 0.5)[0]
        top_k, clip = (256, 0.05) if case == TOPK else (None, None)
        return fused_generalized_jsd(hs, ht, w, mask=mask, beta=0.5, top_k=top_k, clip=clip, chunk_size=CHUNK)
    student, teacher = inputs
    mask = torch.ones(student.shape[:2], dtype=torch.bool)
    if case == LOGITS_CASES[0]:
        return dense_reference(student, teacher, 0.5)
    if case == LOGITS_CASES[1]:
        return generalized_jsd(student, teacher, mask=mask, top_k=256, clip=0.05)
    return GKDTrainer.generalized_jsd_loss(student, teacher, beta=0.5)


def run_case(case: str, group: str, length: int, vocab: int, hidden: int) -> dict:
    warnings.filterwarnings("ignore")
    warm, leaves = _inputs(group, min(length, 128), vocab, hidden)
    loss = _call(case, warm)
    if loss is not None:
        loss.backward()
    del warm, leaves, loss
    inputs, leaves = _inputs(group, length, vocab, hidden)
    baseline = _rss_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current RSS
    load = os.getloadavg()[0]
    start = time.perf_counter()
    loss = _call(case, inputs)
    if loss is not None:
        loss.backward()
        assert all(leaf.grad is not None for leaf in leaves)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "extra_peak_bytes": _rss_bytes("VmHWM") - baseline, "load": load}


def _logits_table(rows: list[tuple[str, int, dict]]) -> str:
    lines = [
        "| case | T | time (s) | extra peak (MB) | time ratio | memory ratio | load |",
        "|---|---|---|---|---|---|---|",
    ]
    base = {}
    for case, length, r in rows:
        ref = base.setdefault(length, r)
        lines.append(
            f"| {case} | {length} | {r['seconds']:.2f} | {r['extra_peak_bytes'] / 2**20:.0f} | "
            f"{r['seconds'] / ref['seconds']:.2f} | {r['extra_peak_bytes'] / max(ref['extra_peak_bytes'], 1):.3f} | "
            f"{r['load']:.1f} |"
        )
    return "\n".join(lines)


def _fused_table(results: dict[int, dict[str, dict]]) -> str:
    lines = [
        "| T | case | time (s) | extra peak (MB) | time vs TRL | memory vs TRL | time vs its floor | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    floors = {FULL: FLOOR_FULL, TOPK: FLOOR_TOPK, TRL: FLOOR_FULL}
    for length, by_case in results.items():
        trl = by_case[TRL]
        for case in FUSED_CASES:
            r = by_case[case]
            versus = "" if case.startswith("floor") else f"{r['seconds'] / by_case[floors[case]]['seconds']:.2f}"
            lines.append(
                f"| {length} | {case} | {r['seconds']:.2f} | {r['extra_peak_bytes'] / 2**20:.0f} | "
                f"{r['seconds'] / trl['seconds']:.2f} | {r['extra_peak_bytes'] / max(trl['extra_peak_bytes'], 1):.2f} "
                f"| {versus} | {r['load']:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="V=152064, H=896, logits T in {128, 512, 1024}, fused "
                        "T in {1024, 4096}")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--fused-lengths", type=int, nargs="+", default=[256])
    parser.add_argument("--groups", nargs="+", default=["logits", "fused"], choices=["logits", "fused"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", help="also write the tables into this page (docs/benchmarks.md), between the "
                        "markers of bench_loss.py")
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)  # case group T V H (subprocess entry)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        case, group, length, vocab, hidden = args.one
        print(json.dumps(run_case(case, group, int(length), int(vocab), int(hidden))))
        return
    if args.full:
        args.vocab, args.hidden, args.lengths, args.fused_lengths = 152064, 896, [128, 512, 1024], [1024, 4096]

    def measure(case, group, length):
        cmd = [sys.executable, __file__, "--threads", str(args.threads), "--one", case, group, str(length)]
        out = subprocess.run(cmd + [str(args.vocab), str(args.hidden)], check=True, capture_output=True, text=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {group:6s} T={length:5d} {case:36s} {result['seconds']:8.2f} s "
              f"{result['extra_peak_bytes'] / 2**20:8.0f} MB  load {result['load']:.1f}", file=sys.stderr)
        return result

    started = load_average()
    header = (f"V = {args.vocab}, H = {args.hidden}, B = 1, fp32, beta = 0.5, {args.threads} threads, {machine()}; "
              f"load average {started} at the start")
    print(header + "\n")
    sections = []
    if "logits" in args.groups:
        rows = [(case, length, measure(case, "logits", length)) for length in args.lengths for case in LOGITS_CASES]
        sections.append("#### Logits-in generalized JSD (`opsd_trl.losses.generalized_jsd`; ratios vs the dense "
                        "fp32 reference of the same T)\n\n" + _logits_table(rows))
        print(sections[-1] + "\n")
    if "fused" in args.groups:
        results = {length: {case: measure(case, "fused", length) for case in FUSED_CASES}
                   for length in args.fused_lengths}
        sections.append("#### Fused hidden-state loss (`opsd_trl.fused_loss.fused_generalized_jsd`, chunk "
                        f"{CHUNK}; ratios vs TRL's fused function and vs the floor of the same T)\n\n"
                        + _fused_table(results))
        print(sections[-1] + "\n")
    ended = uptime()
    print(ended)
    if args.write:
        command = " ".join(["python benchmarks/bench_loss.py", *sys.argv[1:]])
        body = (f"Command: `{command}`, measured {time.strftime('%Y-%m-%d')}. {header}; `uptime` at the end: "
                f"{ended}.\n\n" + "\n\n".join(sections))
        write_section(args.write, "bench_loss.py", body)


if __name__ == "__main__":
    main()
