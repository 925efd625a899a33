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

from .model import load_weights
from .pipeline import Settings, datasets, method_stage, vt_cache, warmstart_stage
from .report import LABELS

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
}


def run_tuning(out: Path, names: list[str] | None = None, progress: bool = True) -> str:
    """Train each named candidate (all by default) under `out/tuning/`, then return the markdown table."""
    base = Settings()
    rows = {}
    for name in names or list(CANDIDATES):
        method, overrides = CANDIDATES[name]
        s = replace(base, **overrides)
        # The defaults' own runs are the quickstart's seed 0 in `out` (trained once, shared with its report).
        folder = out / "tuning" / _slug(name) if overrides else out
        folder.mkdir(parents=True, exist_ok=True)
        data = datasets(s)
        warm = warmstart_stage(s, data, folder, rebuild=False, progress=progress)
        cache = None
        if method != "supervised":
            same_start = s.warmstart_key() == base.warmstart_key()
            model, processor = load_weights(warm, s.seed)
            cache = vt_cache(model, processor, data["train"], (out if same_start else folder) / "vt_cache",
                             progress=progress)
        method_stage(method, s, data, warm, folder, cache, 0, progress)
        history = json.loads((folder / method / "seed0" / "history.json").read_text())
        rows[name] = {"method": method, "overrides": overrides, "validation": history["validation"]}
    (out / "tuning.json").write_text(json.dumps(rows, indent=1))
    return tuning_table(rows, base)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


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

