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

from .levers import folder_slug, validation_correct
from .model import load_weights
from .pipeline import Settings, datasets, method_stage, vt_cache, warmstart_stage
from .report import LABELS, mcnemar_exact, paired_counts

# name -> (method, Settings overrides). The defaults' own run is "default"; the others change one thing each.
CANDIDATES: dict[str, tuple[str, dict]] = {
    "default (beta 1)": ("visual_opsd", {}),
    "beta 0 (forward KL)": ("visual_opsd", {"beta": 0.0}),
    "beta 0.5 (the paper's)": ("visual_opsd", {"beta": 0.5}),
    "beta 1, lr 1e-3": ("visual_opsd", {"opsd_lr": 1e-3}),
    "noise-VT control": ("noise_control", {}),
    "supervised, lr 5e-4": ("supervised", {"supervised_lr": 5e-4}),
    "supervised, lr 1e-3 (default)": ("supervised", {}),
    "supervised, lr 2e-3": ("supervised", {"supervised_lr": 2e-3}),
    "50/50 warm-start (student share 0.5)": ("visual_opsd", {"sft_teacher_share": 0.5}),
    # The supervised baseline's learning rate re-chosen from the 50/50 warm-start (it won the choice above by
    # Visual-OPSD's final accuracy; the baseline gets its own best of three from the same start).
    "50/50 warm-start, supervised lr 5e-4": ("supervised", {"sft_teacher_share": 0.5, "supervised_lr": 5e-4}),
    "50/50 warm-start, supervised lr 1e-3": ("supervised", {"sft_teacher_share": 0.5}),
    "50/50 warm-start, supervised lr 2e-3": ("supervised", {"sft_teacher_share": 0.5, "supervised_lr": 2e-3}),
}


def run_tuning(out: Path, names: list[str] | None = None, progress: bool = True, seeds: int = 1) -> str:
    """Train each named candidate (all by default) under `out/tuning/` for distillation seeds 0..seeds-1, then return
    the markdown tables (seed 0 per candidate; with more seeds, the final accuracy per seed and its mean).
    `out/tuning.json` keeps the rows of earlier invocations."""
    base = Settings()
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
        data = datasets(s)
        warm = warmstart_stage(s, data, warmstart_folder(out, name, s), rebuild=False, progress=progress)
        cache = None
        if method != "supervised":
            same_start = s.warmstart_key() == base.warmstart_key()
            model, processor = load_weights(warm, s.seed)
            cache = vt_cache(model, processor, data["train"], (out if same_start else folder) / "vt_cache",
                             progress=progress)
        finals = dict(rows.get(name, {}).get("final_by_seed", {}))
        correct = dict(rows.get(name, {}).get("correct_by_seed", {}))
        for seed in range(seeds):
            method_stage(method, s, data, warm, folder, cache, seed, progress)
            history = json.loads((folder / method / f"seed{seed}" / "history.json").read_text())
            finals[str(seed)] = history["validation"][-1]["accuracy"]
            if seeds > 1:  # per-maze outcomes, for the paired test against the default's seeds
                correct[str(seed)] = validation_correct(s, data, folder, method, seed, history["validation"])
            if seed == 0:
                validation = [{k: v for k, v in p.items() if k != "correct"} for p in history["validation"]]
                rows[name] = {"method": method, "overrides": overrides, "validation": validation}
        rows[name].update(final_by_seed=finals, correct_by_seed=correct)
    record.write_text(json.dumps(rows, indent=1))
    seeded = seeds_table(rows, base)
    return tuning_table(rows, base) + (f"\n\n{seeded}" if seeded else "")


def warmstart_folder(out: Path, name: str, s: Settings) -> Path:
    """Where candidate `name` (settings `s`) finds its warm-start: the folder of the first candidate listed before it
    whose warm-start has the same key (trained once), else its own (no file there: the shipped one when it fits)."""
    key = s.warmstart_key()
    if key != Settings().warmstart_key():
        for other, (_, overrides) in CANDIDATES.items():
            if other == name:
                break
            if replace(Settings(), **overrides).warmstart_key() == key:
                return out / "tuning" / folder_slug(other)
    return out / "tuning" / folder_slug(name) if s != Settings() else out


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


def seeds_table(rows: dict, base: Settings) -> str:
    """Final validation accuracy per distillation seed and its mean, for the candidates trained on several seeds (the
    defaults are chosen by this mean; the spread between seeds is the yardstick for a margin), and each one against
    the default on the same mazes and seeds (paired, exact McNemar)."""
    multi = {n: r for n, r in rows.items() if len(r.get("final_by_seed", {})) > 1}
    if not multi:
        return ""
    lines = [f"| candidate (validation, {base.n_validation} mazes) | trains | final accuracy per seed | mean | "
             "spread (max - min) | vs the default, paired by seed and maze: solved by it only / by the default only "
             "(exact McNemar p) |", "|---|---|---|---|---|---|"]
    default = {(k, i): ok for k, c in multi.get(DEFAULT, {}).get("correct_by_seed", {}).items() for i, ok in enumerate(c)}
    for name, row in multi.items():
        acc = [100 * row["final_by_seed"][k] for k in sorted(row["final_by_seed"], key=int)]
        per_seed = " / ".join(f"{a:.1f}" for a in acc)
        mine = {(k, i): ok for k, c in row.get("correct_by_seed", {}).items() for i, ok in enumerate(c)}
        counts = paired_counts(mine, default)
        paired = (f"{counts['only_a']} / {counts['only_b']} of {counts['pairs']} "
                  f"(p = {mcnemar_exact(counts['only_a'], counts['only_b']):.2g})"
                  if name != DEFAULT and counts["pairs"] else "")
        lines.append(f"| {name} | {LABELS[row['method']]} | {per_seed}% ({len(acc)} seeds) | "
                     f"{sum(acc) / len(acc):.1f}% | {max(acc) - min(acc):.1f} | {paired} |")
    return "\n".join(lines)
