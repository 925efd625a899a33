"""`opsd-trl quickstart --levers`: validation experiments toward Visual-OPSD above the supervised baseline, each a
row written from its run folder (validation split only; the test split is never read here).

A lever is the default `Settings` with a few fields changed and the methods it trains from the warm-start those
settings key (its own warm-start when it changes one). A row gives, per distillation seed, the validation accuracy
of the teacher with VTs and of the student before (the warm-start), then each trained method's accuracy at its last
step and KL-gap closure (KL(T‖S) to that warm-start's teacher, start -> end), and the command that reproduces it.
Finished runs are reused. The default lever reuses the quickstart's own runs in the same `--out` folder; levers
whose warm-start has the same key share it (`pipeline.warmstart_home`).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ..eval import Contexts, evaluate
from .advice import decision_accuracy
from .model import TEACHER_INTRO, TEACHER_TRANSITION, load_weights
from .pipeline import Settings, _contexts, check_reuse, datasets, method_stage, option_start, run_dir, warmstart_stage
from .report import LABELS, PAIRED_HEAD, paired_counts, paired_line

# The defaults before they were chosen on validation (docs/quickstart.md, "How the defaults were chosen"): the
# learning rates chosen from the earlier warm-starts (re-chosen from the 1800-step one), the 600-step warm-start
# (frozen in bd48e69) and, before it, teacher share 0.85. The levers and candidates measured from those starts name
# them, so their commands still reproduce them.
OLD_LRS = {"opsd_lr": 5e-4, "supervised_lr": 1e-3}
OLD_STEPS = {"sft_steps": 600, **OLD_LRS}
OLD_SHARE = {"sft_teacher_share": 0.85, **OLD_STEPS}
OLD_STEPS_NAME = "600-step warm-start"
# name -> (methods, Settings overrides). Every lever keeps today's defaults for everything it does not name.
LEVERS: dict[str, tuple[tuple[str, ...], dict]] = {
    "default (route VTs, numbered answers)": (("visual_opsd", "supervised", "noise_control"), {}),
    "leak-free noise control (3 noise VTs per maze)": (("noise_control",), {"noise_vt_count": 3}),
    "supervised to its plateau (900 steps)": (("supervised",), {"supervised_steps": 900}),
    "Visual-OPSD for 900 steps": (("visual_opsd",), {"opsd_steps": 900}),
    # The paper's regime on this task: intermediate tokens the VTs make easy to write (its own warm-start).
    "cells: after each move the cell it reaches": (("visual_opsd", "supervised"), {"answer_format": "cells"}),
    # The 1800-step warm-start with the learning rates chosen from the 600-step one (the lever that chose that start).
    "1800-step warm-start at the earlier learning rates": (("visual_opsd", "supervised", "noise_control"), OLD_LRS),
    f"{OLD_STEPS_NAME} (the defaults frozen in bd48e69)": (("visual_opsd", "supervised", "noise_control"), OLD_STEPS),
    f"leak-free noise control (3 noise VTs per maze, {OLD_STEPS_NAME})": (("noise_control",),
                                                                         {**OLD_STEPS, "noise_vt_count": 3}),
    f"supervised to its plateau (900 steps, {OLD_STEPS_NAME})": (("supervised",), {**OLD_STEPS,
                                                                                 "supervised_steps": 900}),
    f"Visual-OPSD for 900 steps ({OLD_STEPS_NAME})": (("visual_opsd",), {**OLD_STEPS, "opsd_steps": 900}),
    "old default (teacher share 0.85)": (("visual_opsd", "supervised", "noise_control"), OLD_SHARE),
    "cells: after each move the cell it reaches (teacher share 0.85)": (
        ("visual_opsd", "supervised"), {**OLD_SHARE, "answer_format": "cells"}),
    "policy map: one VT of shortest-way arrows, half the warm-start's teacher samples with a detour first "
    "(teacher share 0.85)": (("visual_opsd", "supervised"),
                             {**OLD_SHARE, "vts": "policy_map", "sft_detour_share": 0.5}),
    "leak-free noise control (3 noise VTs per maze, teacher share 0.85)": (("noise_control",),
                                                                           {**OLD_SHARE, "noise_vt_count": 3}),
    "supervised to its plateau (900 steps, teacher share 0.85)": (("supervised",),
                                                                  {**OLD_SHARE, "supervised_steps": 900}),
    "Visual-OPSD for 900 steps (teacher share 0.85)": (("visual_opsd",), {**OLD_SHARE, "opsd_steps": 900}),
}
# The supervised baseline run to its validation plateau from the defaults' start: the fresh test split scores it too,
# so a reader sees whether Visual-OPSD wins only at equal budget.
PLATEAU_LEVER = "supervised to its plateau (900 steps)"


def folder_slug(name: str) -> str:
    """A lever's or a tuning candidate's name as a folder name."""
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def lever_folder(out: Path, name: str) -> Path:
    """The default lever's runs are the quickstart's own (`out`); the others live under `out/levers/<slug>/`."""
    return out if not LEVERS[name][1] else out / "levers" / folder_slug(name)


def plateau_runs(out: Path, seeds: int, progress: bool = True) -> dict[str, Path]:
    """The `PLATEAU_LEVER`'s supervised runs of seeds 0..seeds-1 (trained here when missing), by the name the fresh
    scoring gives them (`supervised_plateau_seed<k>`)."""
    run_levers(out, [PLATEAU_LEVER], seeds=seeds, progress=progress)
    return {f"supervised_plateau_seed{seed}": run_dir(lever_folder(out, PLATEAU_LEVER), "supervised", seed)
            / "final.safetensors" for seed in range(seeds)}


def teacher_accuracy(s: Settings, data: dict, warm: Path, folder: Path, progress: bool) -> float:
    """Validation accuracy of the warm-start with its VTs (the teacher), computed once per warm-start folder."""
    path = folder / "teacher_validation.json"
    if not path.exists():
        model, processor = load_weights(warm, s.seed)
        metrics = evaluate(model, processor, data["validation"], teacher_context=True, contexts=_contexts(processor),
                           progress=progress, desc="validation: teacher with VTs")
        path.write_text(json.dumps({"accuracy": metrics["accuracy"]}))
    return json.loads(path.read_text())["accuracy"]


def validation_correct(s: Settings, data: dict, folder: Path, method: str, seed: int, points: list[dict]) -> list:
    """Per-maze validation outcomes of a run's final model, in validation order: its last curve point's (runs made
    before curves kept them are evaluated once and cached as `validation_correct.json`)."""
    if "correct" in points[-1]:
        return points[-1]["correct"]
    path = run_dir(folder, method, seed) / "validation_correct.json"
    if not path.exists():
        model, processor = load_weights(run_dir(folder, method, seed) / "final.safetensors", s.seed)
        metrics = evaluate(model, processor, data["validation"], contexts=_contexts(processor), progress=False)
        path.write_text(json.dumps([p["correct"] for p in metrics["predictions"]]))
    return json.loads(path.read_text())


def run_levers(out: Path, names: list[str] | None = None, seeds: int = 1, progress: bool = True) -> dict:
    """Train each named lever (all by default) for distillation seeds 0..seeds-1; returns every row recorded so far
    in `out/levers.json` (rows of earlier invocations are kept)."""
    base = Settings()
    check_reuse(out, base)  # a folder of other defaults would lend its warm-start and runs to today's rows
    record = out / "levers.json"
    rows = json.loads(record.read_text()) if record.exists() else {}
    for name in names or list(LEVERS):
        if name not in LEVERS:
            raise ValueError(f"unknown lever {name!r}; known: {sorted(LEVERS)}")
        methods, overrides = LEVERS[name]
        s = replace(base, **overrides)
        folder = lever_folder(out, name)
        folder.mkdir(parents=True, exist_ok=True)
        data, warm, cache = option_start(out, s, methods, progress)
        teacher = teacher_accuracy(s, data, warm, folder, progress)
        for seed in range(seeds):
            runs, correct = {}, {}
            for method in methods:
                method_stage(method, s, data, warm, folder, cache, seed, progress)
                runs[method] = json.loads((run_dir(folder, method, seed) / "history.json").read_text())["validation"]
                correct[method] = validation_correct(s, data, folder, method, seed, runs[method])
                for point in runs[method]:
                    point.pop("correct", None)  # levers.json keeps the final outcomes only
            rows[f"{name} / seed {seed}"] = {"lever": name, "seed": seed, "overrides": overrides,
                                             "teacher": teacher, "runs": runs, "correct": correct}
    record.write_text(json.dumps(rows, indent=1))
    return rows


def command(name: str, seed: int) -> str:
    seeds = f" --seeds {seed + 1}" if seed else ""
    return f"`opsd-trl quickstart --levers \"{name}\"{seeds} --out quickstart_3seeds`"


def levers_table(rows: dict) -> str:
    """One line per (lever, seed): validation accuracy of the teacher, the warm-start student and each trained method
    (last step), each method's KL-gap closure, and the command."""
    lines = ["| lever (validation, 200 mazes) | seed | teacher with VTs | student before | Visual-OPSD (closure) | "
             "supervised baseline (closure) | noise-VT control (closure) | command |", "|---|---|---|---|---|---|---|---|"]
    order = list(LEVERS)
    for row in sorted(rows.values(), key=lambda r: (order.index(r["lever"]) if r["lever"] in order else len(order),
                                                    r["seed"])):
        start = next(iter(row["runs"].values()))[0]
        cells = []
        for method in ("visual_opsd", "supervised", "noise_control"):
            points = row["runs"].get(method)
            if points is None:
                cells.append("")
                continue
            kl0, kl1 = points[0]["kl_teacher_student"], points[-1]["kl_teacher_student"]
            steps = f", {points[-1]['step']} steps" if method == "supervised" else ""
            cells.append(f"{100 * points[-1]['accuracy']:.1f}% ({100 * (kl0 - kl1) / kl0:+.1f}%{steps})")
        lines.append(f"| {row['lever']} | {row['seed']} | {100 * row['teacher']:.1f}% | {100 * start['accuracy']:.1f}% "
                     f"| {' | '.join(cells)} | {command(row['lever'], row['seed'])} |")
    return "\n".join(lines)


def paired_levers_table(rows: dict) -> str:
    """Per lever with both methods: Visual-OPSD against the supervised baseline on the validation mazes, pooled
    over the lever's seeds (each maze of each seed one pair), with the exact McNemar test."""
    lines = [PAIRED_HEAD.replace("comparison (pooled", "lever: comparison (validation, pooled")]
    for name in [n for n in LEVERS if n in {r["lever"] for r in rows.values()}]:
        outcomes = {m: {(r["seed"], i): ok for r in rows.values() if r["lever"] == name
                        for i, ok in enumerate(r.get("correct", {}).get(m, []))} for m in ("visual_opsd", "supervised")}
        counts = paired_counts(outcomes["visual_opsd"], outcomes["supervised"])
        if counts["pairs"]:
            seeds = len({k[0] for k in outcomes["visual_opsd"].keys() & outcomes["supervised"].keys()})
            lines.append(paired_line(f"{name}, {seeds} seed{'s' * (seeds > 1)}: {LABELS['visual_opsd']}",
                                     LABELS["supervised"], counts))
    return "\n".join(lines) if len(lines) > 1 else ""


# What each noise-VT control leaves the teacher: (label, Contexts options, teacher context?).
LEAK_ROWS = (("teacher with VTs", {}, True),
             ("noised teacher, as many noise VTs as moves (the paper's control)", {"noise_vt": True}, True),
             ("noised teacher, 3 noise VTs per maze (leak-free)", {"noise_vt": True, "noise_vt_count": 3}, True),
             ("student (no VTs)", {}, False))


def noise_leak(out: Path, progress: bool = True) -> dict:
    """The default warm-start, teacher-forced on the validation reference answers: how often each context's top token
    is right at the move decisions and at the stop/go decisions (`advice.decision_accuracy`); `out/noise_leak.json`."""
    path = out / "noise_leak.json"
    if not path.exists():
        s = Settings()
        data = datasets(s)
        warm = warmstart_stage(s, data, out, rebuild=False, progress=progress)
        model, processor = load_weights(warm, s.seed)
        rows = list(data["validation"])
        result = {label: decision_accuracy(model, Contexts(processor, intro=TEACHER_INTRO,
                                                           transition=TEACHER_TRANSITION, **options), rows, teacher)
                  for label, options, teacher in LEAK_ROWS}
        path.write_text(json.dumps(result, indent=1))
    return json.loads(path.read_text())


def leak_table(leak: dict) -> str:
    lines = ["| context (warm-start, validation reference answers, teacher-forced) | move decisions right | stop/go "
             "decisions right |", "|---|---|---|"]
    for label, counts in leak.items():
        cells = [f"{100 * counts[k]['right'] / counts[k]['decisions']:.1f}% of {counts[k]['decisions']}"
                 for k in ("move", "stop_go")]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)
