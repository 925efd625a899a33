"""The quickstart's results table (markdown) and validation curves (PNG)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {"visual_opsd": "Visual-OPSD", "noise_control": "noise-VT control"}


def results_table(r: dict) -> str:
    def pct(x):
        return f"{100 * x:.1f}%"

    before, opsd, noise = r["student_before"], r["visual_opsd"], r["noise_control"]
    rows = [
        ("teacher-with-VT accuracy", pct(r["teacher_with_vt"]["accuracy"])),
        ("student accuracy before", pct(before["accuracy"])),
        ("student accuracy after Visual-OPSD", pct(opsd["accuracy"])),
        ("student accuracy after noise control", pct(noise["accuracy"])),
        ("KL(T||S) before, nats/token", f"{before['kl_teacher_student']:.4f}"),
        ("KL(T||S) after Visual-OPSD", f"{opsd['kl_teacher_student']:.4f}"),
        ("KL(T||S) after noise control", f"{noise['kl_teacher_student']:.4f}"),
        ("KL-gap closure, Visual-OPSD", pct(opsd["kl_gap_closure"])),
        ("KL-gap closure, noise control", pct(noise["kl_gap_closure"])),
        ("mean output tokens (before / OPSD / noise)",
         f"{before['mean_output_tokens']:.2f} / {opsd['mean_output_tokens']:.2f} / {noise['mean_output_tokens']:.2f}"),
        ("latency per sample, ms (student after OPSD)", f"{1000 * opsd['latency_s_per_sample']:.1f}"),
    ]
    n = r["student_before"]["n"]
    lines = [f"| metric (held-out test, {n} mazes) | value |", "|---|---|"]
    return "\n".join(lines + [f"| {k} | {v} |" for k, v in rows])


def plot_curves(histories: dict, path: Path) -> None:
    """Validation accuracy and KL against the fixed reference teacher, per training step, for each run."""
    fig, (ax_acc, ax_kl) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, history in histories.items():
        points = history["validation"]
        steps = [p["step"] for p in points]
        ax_acc.plot(steps, [100 * p["accuracy"] for p in points], marker="o", label=LABELS.get(name, name))
        ax_kl.plot(steps, [p["kl_teacher_student"] for p in points], marker="o", label=LABELS.get(name, name))
    ax_acc.set(xlabel="training step", ylabel="student accuracy (%)", title="validation accuracy")
    ax_kl.set(xlabel="training step", ylabel="nats / token", title="KL(reference teacher || student)")
    for ax in (ax_acc, ax_kl):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, histories: dict, out: Path, *, settings: dict, minutes: float) -> str:
    table = results_table(results)
    plot_curves(histories, out / "curves.png")
    text = (f"# Visual-OPSD quickstart results\n\n{table}\n\n![validation curves](curves.png)\n\n"
            f"Settings: `{json.dumps(settings)}`. This run: {minutes:.1f} min (finished stages are reused).\n")
    (out / "results.md").write_text(text)
    return table
