"""Side-by-side peak memory and time of the Visual-OPSD loss against the dense reference and TRL's functions.

Each (case, T) runs forward + backward in a fresh subprocess. Extra peak memory is the process's peak resident set
(VmHWM, reset through /proc/self/clear_refs after the inputs are built) minus its resident set at that point, so it
counts only what the loss and its backward allocate; inputs are excluded. Ratios are against the first case of each
group. Linux only.

    python benchmarks/bench_loss.py                 # small sizes, a smoke run (~1 min on 2 cores)
    python benchmarks/bench_loss.py --full          # V=152064, H=896, T in {128, 512, 1024}, B=1 (heavy on CPU)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings

import torch

LOGITS_CASES = ("dense fp32 reference", "opsd top_k=256 clip=0.05", "trl GKD generalized_jsd_loss")
FUSED_CASES = ("trl _chunked_divergence_loss", "opsd fused top_k=256 clip=0.05", "trl GKD generalized_jsd_loss")


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


def run_case(case: str, group: str, length: int, vocab: int, hidden: int) -> dict:
    warnings.filterwarnings("ignore")
    from trl.experimental.gkd import GKDTrainer
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    from opsd_trl.fused_loss import fused_generalized_jsd
    from opsd_trl.losses import generalized_jsd

    torch.manual_seed(0)
    mask = torch.ones(1, length, dtype=torch.bool)
    if group == "fused":
        weight = (torch.randn(vocab, hidden) * 0.02).requires_grad_()
        student_hidden = torch.randn(1, length, hidden).requires_grad_()
        teacher_hidden = student_hidden.detach() + 0.3 * torch.randn(1, length, hidden)
        leaves = (student_hidden, weight)
        if case.startswith("opsd"):
            fn = lambda: fused_generalized_jsd(  # noqa: E731
                student_hidden, teacher_hidden, weight, mask=mask, beta=0.5, top_k=256, clip=0.05
            )
        elif case.startswith("trl _chunked"):
            fn = lambda: _chunked_divergence_loss(  # noqa: E731
                student_hidden, teacher_hidden, weight, weight.detach(), mask, 0.5
            )[0]
        else:  # logits-in: the projections are part of the measured work
            fn = lambda: GKDTrainer.generalized_jsd_loss(  # noqa: E731
                student_hidden @ weight.T, teacher_hidden @ weight.detach().T, beta=0.5
            )
    else:
        student_logits = (torch.randn(1, length, vocab) * 3).requires_grad_()
        teacher_logits = torch.randn(1, length, vocab) * 3
        leaves = (student_logits,)
        fn = {
            LOGITS_CASES[0]: lambda: dense_reference(student_logits, teacher_logits, 0.5),
            LOGITS_CASES[1]: lambda: generalized_jsd(student_logits, teacher_logits, mask=mask, top_k=256, clip=0.05),
            LOGITS_CASES[2]: lambda: GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, beta=0.5),
        }[case]
    baseline = _rss_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    fn().backward()
    seconds = time.perf_counter() - start
    assert all(leaf.grad is not None for leaf in leaves)
    return {"seconds": seconds, "extra_peak_bytes": _rss_bytes("VmHWM") - baseline}


def _table(title: str, rows: list[tuple[str, int, dict]]) -> str:
    lines = [
        f"### {title}",
        "",
        "| case | T | time (s) | extra peak (MB) | time ratio | memory ratio |",
        "|---|---|---|---|---|---|",
    ]
    base = {}
    for case, length, r in rows:
        ref = base.setdefault(length, r)
        lines.append(
            f"| {case} | {length} | {r['seconds']:.2f} | {r['extra_peak_bytes'] / 2**20:.0f} | "
            f"{r['seconds'] / ref['seconds']:.2f} | {r['extra_peak_bytes'] / max(ref['extra_peak_bytes'], 1):.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="V=152064, H=896, T in {128, 512, 1024}")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--fused-length", type=int, default=256)
    parser.add_argument("--groups", nargs="+", default=["logits", "fused"], choices=["logits", "fused"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)  # case group T V H (subprocess entry)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        case, group, length, vocab, hidden = args.one
        print(json.dumps(run_case(case, group, int(length), int(vocab), int(hidden))))
        return
    if args.full:
        args.vocab, args.hidden, args.lengths, args.fused_length = 152064, 896, [128, 512, 1024], 1024

    def measure(case, group, length):
        cmd = [sys.executable, __file__, "--threads", str(args.threads), "--one", case, group, str(length)]
        out = subprocess.run(cmd + [str(args.vocab), str(args.hidden)], check=True, capture_output=True, text=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"  {group:6s} T={length:5d} {case:32s} {result['seconds']:8.2f} s {result['extra_peak_bytes'] / 2**20:8.0f} MB",
            file=sys.stderr,
        )
        return case, length, result

    print(f"V={args.vocab} H={args.hidden} B=1 threads={args.threads} torch={torch.__version__}, fwd+bwd\n")
    if "logits" in args.groups:
        rows = [measure(case, "logits", length) for length in args.lengths for case in LOGITS_CASES]
        print(_table("Logits-in generalized JSD (ratios vs the first row of each T)", rows) + "\n")
    if "fused" in args.groups:
        rows = [measure(case, "fused", args.fused_length) for case in FUSED_CASES]
        print(_table("Fused hidden-state loss (ratios vs TRL's fused function)", rows))


if __name__ == "__main__":
    main()
