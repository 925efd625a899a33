"""`opsd-trl quickstart --tune`: the validation runs behind the quickstart's defaults, one seed each, written as a
table (validation split only; the test split is never read here).

Each candidate is the default `Settings` with a few fields changed; it trains one method (Visual-OPSD, the noise-VT
control or the supervised baseline) from the warm-start those settings key, and records the validation curve.
Finished candidates are reused, so the table can grow run by run; the candidates that are the defaults reuse the
quickstart's own seed-0 runs in the same `--out` folder.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from .levers import OLD_SHARE, OLD_STEPS, OLD_STEPS_NAME, folder_slug, validation_correct
from .pipeline import Settings, check_reuse, method_stage, option_start, run_dir
from .report import LABELS, mcnemar_exact, paired_counts

# name -> (method, Settings overrides). The defaults' own runs are "default (beta 1)"; the others change one thing
# each. The candidates of the earlier defaults' warm-starts name them, so they still reproduce: the 600-step one
# (frozen in bd48e69; the 1800 steps were chosen over it by the lever "1800-step warm-start at the earlier learning
# rates" against "600-step warm-start (the defaults frozen in bd48e69)", three seeds, and the learning rates chosen
# again from it after that) and, before it, teacher share 0.85 (the 50/50 share was chosen by "600-step warm-start:
# default (beta 1)" against "old default (beta 1, teacher share 0.85)").
OLD = f"{OLD_STEPS_NAME}: "
CANDIDATES: dict[str, tuple[str, dict]] = {
    "default (beta 1)": ("visual_opsd", {}),
    "noise-VT control": ("noise_control", {}),
    "beta 0 (forward KL)": ("visual_opsd", {"beta": 0.0}),
    "beta 0.5 (the paper's)": ("visual_opsd", {"beta": 0.5}),
    "beta 1, lr 1.25e-4": ("visual_opsd", {"opsd_lr": 1.25e-4}),
    "beta 1, lr 5e-4": ("visual_opsd", {"opsd_lr": 5e-4}),
    "beta 1, lr 1e-3": ("visual_opsd", {"opsd_lr": 1e-3}),
    "supervised, lr 5e-4 (default)": ("supervised", {}),
    "supervised, lr 2.5e-4": ("supervised", {"supervised_lr": 2.5e-4}),
    "supervised, lr 1e-3": ("supervised", {"supervised_lr": 1e-3}),
    "supervised, lr 2e-3": ("supervised", {"supervised_lr": 2e-3}),
    # Measured at lr 5e-4 before the learning rate was re-chosen (seed 0).
    "lr 5e-4: beta 0 (forward KL)": ("visual_opsd", {"opsd_lr": 5e-4, "beta": 0.0}),
    "lr 5e-4: beta 0.5 (the paper's)": ("visual_opsd", {"opsd_lr": 5e-4, "beta": 0.5}),
    "lr 5e-4: live teacher (self)": ("visual_opsd", {"opsd_lr": 5e-4, "teacher_mode": "self"}),
    "lr 5e-4: EMA teacher (the paper's)": ("visual_opsd", {"opsd_lr": 5e-4, "teacher_mode": "ema"}),
    f"{OLD}default (beta 1)": ("visual_opsd", OLD_STEPS),
    f"{OLD}noise-VT control": ("noise_control", OLD_STEPS),
    f"{OLD}supervised, lr 5e-4": ("supervised", {**OLD_STEPS, "supervised_lr": 5e-4}),
    f"{OLD}supervised, lr 1e-3": ("supervised", OLD_STEPS),
    f"{OLD}supervised, lr 2e-3": ("supervised", {**OLD_STEPS, "supervised_lr": 2e-3}),
    "old default (beta 1, teacher share 0.85)": ("visual_opsd", OLD_SHARE),
    "teacher share 0.85: beta 0 (forward KL)": ("visual_opsd", {**OLD_SHARE, "beta": 0.0}),
    "teacher share 0.85: beta 0.5 (the paper's)": ("visual_opsd", {**OLD_SHARE, "beta": 0.5}),
    "teacher share 0.85: beta 1, lr 1e-3": ("visual_opsd", {**OLD_SHARE, "opsd_lr": 1e-3}),
    "teacher share 0.85: noise-VT control": ("noise_control", OLD_SHARE),
    "teacher share 0.85: supervised, lr 5e-4": ("supervised", {**OLD_SHARE, "supervised_lr": 5e-4}),
    "teacher share 0.85: supervised, lr 1e-3": ("supervised", OLD_SHARE),
    "teacher share 0.85: supervised, lr 2e-3": ("supervised", {**OLD_SHARE, "supervised_lr": 2e-3}),
}


def run_tuning(out: Path, names: list[str] | None = None, progress: bool = True, seeds: int = 1) -> str:
    """Train each named candidate (all by default) under `out/tuning/` for distillation seeds 0..seeds-1, then return
    the markdown tables (seed 0 per candidate; with more seeds, the final accuracy per seed and its mean).
    `out/tuning.json` keeps the rows of earlier invocations."""
    base = Settings()
    check_reuse(out, base)  # a folder of other defaults would lend its warm-start and runs to today's rows
    record = out / "tuning.json"
    rows = json.loads(record.read_text()) if record.exists() else {}
    for name in names or list(CANDIDATES):
        if name not in CANDIDATES:
            raise ValueError(f"unknown tuning candidate {name!r} (--tune-only); known: {sorted(CANDIDATES)}")
        method, overrides = CANDIDATES[name]
        s = replace(base, **overrides)
        # The defaults' own runs are the quickstart's seed 0 in `out` (trained once, shared with its report).
        folder = out / "tuning" / folder_slug(name) if overrides else out
        folder.mkdir(parents=True, exist_ok=True)
        data, warm, cache = option_start(out, s, [method], progress)
        finals = dict(rows.get(name, {}).get("final_by_seed", {}))
        correct = dict(rows.get(name, {}).get("correct_by_seed", {}))
        for seed in range(seeds):
            method_stage(method, s, data, warm, folder, cache, seed, progress)
            history = json.loads((run_dir(folder, method, seed) / "history.json").read_text())
            finals[str(seed)] = history["validation"][-1]["accuracy"]
            if seeds > 1:  # per-maze outcomes, for the paired test against the default's seeds
                correct[str(seed)] = validation_correct(s, data, folder, method, seed, history["validation"])
            if seed == 0:
                validation = [{k: v for k, v in p.items() if k != "correct"} for p in history["validation"]]
                rows[name] = {"method": method, "overrides": overrides, "validation": validation}
        rows[name].update(final_by_seed=finals, correct_by_seed=correct)
    # In `CANDIDATES` order (rows of earlier invocations first otherwise), which `paired_with` reads as "listed first".
    rows = {n: rows[n] for n in CANDIDATES if n in rows} | {n: r for n, r in rows.items() if n not in CANDIDATES}
    record.write_text(json.dumps(rows, indent=1))
    seeded = seeds_table(rows, base)
    return tuning_table(rows, base) + (f"\n\n{seeded}" if seeded else "")


def tuning_table(rows: dict, base: Settings) -> str:
    """Validation accuracy along the run and the KL(T||S) closure at its end, per candidate."""
    lines = [f"| candidate (validation, {base.n_validation} mazes, seed 0) | trains | accuracy: start -> lowest -> "
             "end | KL(T‖S) start -> end | closure |", "|---|---|---|---|---|"]
    for name, row in rows.items():
        points = row["validation"]
        acc = [100 * p["accuracy"] for p in points]
        kl0, kl1 = points[0]["kl_teacher_student"], points[-1]["kl_teacher_student"]
        lines.append(f"| {name} | {LABELS[row['method']]} | {acc[0]:.1f} -> {min(acc):.1f} -> {acc[-1]:.1f}% "
                     f"| {kl0:.3f} -> {kl1:.3f} | {100 * (kl0 - kl1) / kl0:.1f}% |")
    return "\n".join(lines)

DEFAULT = "default (beta 1)"


def paired_with(rows: dict, base: Settings) -> dict[str, str]:
    """Whom each multi-seed candidate is paired with: the first one listed that trains its method from the same
    warm-start (a change is judged against its own start), else the default (the choice between starts)."""
    def start(row: dict) -> tuple:
        return row["method"], replace(base, **row.get("overrides", {})).warmstart_key()

    pairs = {}
    for name, row in rows.items():
        first = next(n for n, r in rows.items() if start(r) == start(row))
        pairs[name] = first if first != name else DEFAULT
    return {name: other for name, other in pairs.items() if other != name and other in rows}


def seeds_table(rows: dict, base: Settings) -> str:
    """Final validation accuracy per distillation seed and its mean, for the candidates trained on several seeds (the
    defaults are chosen by this mean; the spread between seeds is the yardstick for a margin), and each one against
    the candidate it is paired with (`paired_with`) on the same mazes and seeds (exact McNemar)."""
    multi = {n: r for n, r in rows.items() if len(r.get("final_by_seed", {})) > 1}
    if not multi:
        return ""
    lines = [f"| candidate (validation, {base.n_validation} mazes) | trains | final accuracy per seed | mean | "
             "spread (max - min) | paired with (by seed and maze) | solved by it only / by that one only (exact "
             "McNemar p) |", "|---|---|---|---|---|---|---|"]

    def outcomes(row: dict) -> dict:
        return {(k, i): ok for k, c in row.get("correct_by_seed", {}).items() for i, ok in enumerate(c)}

    partner = paired_with(multi, base)
    for name, row in multi.items():
        acc = [100 * row["final_by_seed"][k] for k in sorted(row["final_by_seed"], key=int)]
        per_seed = " / ".join(f"{a:.1f}" for a in acc)
        other = partner.get(name)
        counts = paired_counts(outcomes(row), outcomes(multi[other])) if other else {"pairs": 0}
        paired = (f"{counts['only_a']} / {counts['only_b']} of {counts['pairs']} "
                  f"(p = {mcnemar_exact(counts['only_a'], counts['only_b']):.2g})" if counts["pairs"] else "")
        lines.append(f"| {name} | {LABELS[row['method']]} | {per_seed}% ({len(acc)} seeds) | "
                     f"{sum(acc) / len(acc):.1f}% | {max(acc) - min(acc):.1f} | {other if paired else ''} | {paired} |")
    return "\n".join(lines)
