"""`opsd-trl sweep`: one training + one evaluation per point of a grid over recipe fields, then a table and a plot.

    opsd-trl sweep --config recipes/cpu_quickstart.yaml --beta 0 0.5 1 --seeds 0 1 --sweep jsd_clip=0.02,0.05

Each point trains in its own process (`python -m opsd_trl.train`, or `--launcher "accelerate launch ..."`) into
`<out>/runs/<point>/`, then is evaluated here on the recipe's test split against the initial policy (the fixed
reference teacher, which also gives the KL-gap closure). A point whose `metrics.json` exists is not rerun; a point
whose training finished but whose eval did not is only evaluated. Outputs: results.csv (one row per run),
results.md (mean +- std over seeds) and results.png (metrics vs the first swept field).
"""

from __future__ import annotations

import csv
import itertools
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

METRICS = ("accuracy", "kl_teacher_student", "kl_gap_closure", "mean_output_tokens")
LABELS = {"accuracy": "accuracy", "kl_teacher_student": "KL(T||S), nats/token", "kl_gap_closure": "KL-gap closure",
          "mean_output_tokens": "output tokens"}


def grid(axes: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the axes, in order (the last axis varies fastest)."""
    return [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]


def point_name(point: dict[str, str]) -> str:
    return "__".join(f"{k}={v}" for k, v in point.items())


def _as_cli(fields: dict[str, str]) -> list[str]:
    return [arg for k, v in fields.items() for arg in (f"--{k}", str(v))]


class Sweep:
    def __init__(self, config: str, axes: dict[str, list[str]], out: str | Path, fixed: dict[str, str] | None = None,
                 launcher: str | None = None, progress: bool = True):
        from .train import load_eval_dataset, parse_args

        self.config, self.axes, self.out = config, axes, Path(out)
        self.fixed = fixed or {}
        self.launcher = shlex.split(launcher) if launcher else [sys.executable]
        self.progress = progress
        if "output_dir" in {*axes, *self.fixed}:
            raise ValueError("output_dir is set by the sweep (<out>/runs/<point>); choose the folder with --out.")
        both = sorted(set(axes) & set(self.fixed))
        if both:
            raise ValueError(f"{both[0]} is both swept ({', '.join(axes[both[0]])}) and fixed by --set "
                             f"({self.fixed[both[0]]}); give it once.")
        self.points = grid(axes)
        # A bad value or an unknown field fails now, not after hours of training; so does a point given twice.
        _refuse_repeats(axes, {point_name(p): parse_args(self._train_args(p)) for p in self.points})
        self.script_args, self.training_args, self.model_args = parse_args(self._train_args({}))
        self._eval_data = load_eval_dataset(self.script_args)  # refuses an evaluation on training rows, now

    def _train_args(self, point: dict[str, str]) -> list[str]:
        return ["--config", self.config, *_as_cli(self.fixed), *_as_cli(point)]

    # ------------------------------------------------------------------------------------------- running
    def settings(self) -> dict:
        """What every point of this sweep folder shares: the recipe's values and the --set overrides (the swept
        fields may grow between calls; these may not, or a reused point or baseline would be another setting's)."""
        import yaml

        return {"config": str(self.config), "recipe": yaml.safe_load(Path(self.config).read_text()),
                "fixed": self.fixed}

    def _claim_folder(self) -> None:
        """Record this sweep's settings in `<out>/sweep.json`, or refuse a folder made with other settings."""
        path, mine = self.out / SETTINGS_FILE, json.loads(json.dumps(self.settings(), default=str))
        if path.exists():
            theirs = json.loads(path.read_text())
            changed = sorted(_changed(theirs.get("recipe") or {}, mine["recipe"]) |
                             {f"--set {k}" for k in _changed(theirs.get("fixed") or {}, mine["fixed"])})
            if changed:
                raise ValueError(
                    f"sweep folder {self.out} holds the runs of a sweep with other settings (recipe "
                    f"{theirs.get('config')}; differing: {', '.join(changed)}); its finished points would be reused "
                    "as this sweep's. Give another --out, or delete the folder to start over."
                )
            return
        self.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(mine, indent=1))

    def run(self) -> list[dict]:
        self._claim_folder()
        rows = []
        for point in self.points:
            run_dir = self.out / "runs" / point_name(point)
            metrics_file = run_dir / "metrics.json"
            if not metrics_file.exists():
                if not (run_dir / "train_results.json").exists():
                    self._train(point, run_dir)
                metrics = self._evaluate(run_dir)
                metrics_file.write_text(json.dumps(metrics, indent=1))
            rows.append({**point, **json.loads(metrics_file.read_text())})
        write_results(rows, list(self.axes), self.out, baseline=self._baseline())
        return rows

    def _train(self, point: dict[str, str], run_dir: Path) -> None:
        from .checkpoints import last_complete_checkpoint

        cmd = [*self.launcher, "-m", "opsd_trl.train", *self._train_args(point), "--output_dir", str(run_dir),
               "--recipe", self.config]
        if last_complete_checkpoint(str(run_dir)) is not None:  # an interrupted run continues (a fresh one is refused)
            cmd += ["--resume_from_checkpoint", "last"]
        print(f"[sweep] training {point_name(point)}: {shlex.join(cmd)}", flush=True)
        try:
            subprocess.run(cmd, check=True)
        except (subprocess.CalledProcessError, OSError) as e:
            reason = f"exit status {e.returncode}" if isinstance(e, subprocess.CalledProcessError) else str(e)
            raise RuntimeError(
                f"sweep point {point_name(point)}: training failed ({reason}; its output is above, the command is "
                f"{shlex.join(cmd)}). Fix it and rerun the sweep: finished points in {self.out} are reused."
            ) from e

    def _model(self, path: str | None = None):
        from dataclasses import replace

        from .train import load_model

        trust = self.training_args.trust_remote_code
        if path is None:
            return load_model(self.script_args, self.model_args, trust)
        # A trained run folder holds the full weights: no init_weights on top.
        return load_model(replace(self.script_args, init_weights=None),
                          replace(self.model_args, model_name_or_path=path), trust)

    def _eval_setup(self):
        if not hasattr(self, "_contexts"):
            from .eval import Contexts

            args = self.training_args
            self._reference, processor = self._model()
            self._contexts = Contexts.from_config(processor, args)
        return self._reference, self._contexts, self._eval_data

    def _run_eval(self, model, processor, desc: str, predictions_path: Path) -> dict:
        from .eval import evaluate, write_predictions

        reference, contexts, data = self._eval_setup()
        metrics = evaluate(model, processor, data, reference=reference, contexts=contexts, desc=desc,
                           batch_size=self.script_args.eval_batch_size,
                           max_new_tokens=self.script_args.eval_max_new_tokens, progress=self.progress)
        return write_predictions(metrics, predictions_path)

    def _baseline(self) -> dict:
        """The initial policy's metrics (the KL-gap closure's 'before'), computed once per sweep folder."""
        path = self.out / "baseline.json"
        if not path.exists():
            import copy

            reference, contexts, _ = self._eval_setup()
            metrics = self._run_eval(copy.deepcopy(reference), contexts.processor, "baseline",
                                     self.out / "baseline_predictions.jsonl")
            path.write_text(json.dumps(metrics, indent=1))
        return json.loads(path.read_text())

    def _evaluate(self, run_dir: Path) -> dict:
        from .eval import kl_gap_closure
        from .model_card import add_eval_results

        model, processor = self._model(str(run_dir))
        metrics = self._run_eval(model, processor, run_dir.name, run_dir / "predictions.jsonl")
        metrics["kl_gap_closure"] = kl_gap_closure(self._baseline()["kl_teacher_student"],
                                                   metrics["kl_teacher_student"])
        train = json.loads((run_dir / "train_results.json").read_text())
        metrics["train_loss"] = train.get("train_loss")
        add_eval_results(str(run_dir), metrics)
        return metrics


SETTINGS_FILE = "sweep.json"


def _changed(old: dict, new: dict) -> set[str]:
    return {k for k in set(old) | set(new) if old.get(k) != new.get(k)}


def _refuse_repeats(axes: dict[str, list[str]], parsed: dict[str, tuple]) -> None:
    """Two points with the same values (`--beta 0.5 0.5`, `--sweep beta=0.5,0.50`) would train once and count
    twice; refuse them, naming the field and the values."""
    for name, values in axes.items():
        if len(set(values)) < len(values):
            raise ValueError(f"the sweep lists {name} {' '.join(values)}: a value twice. Each point trains once; give "
                             "each value once (repeat runs with --seeds).")
    seen: dict[tuple, str] = {}
    for point, args in parsed.items():
        key = tuple(repr(_parsed_value(args, name)) for name in axes)
        if key in seen:
            raise ValueError(f"the sweep points {seen[key]} and {point} are the same setting once parsed; give each "
                             "value once (repeat runs with --seeds).")
        seen[key] = point


def _parsed_value(parsed: tuple, name: str):
    return next(getattr(args, name) for args in parsed if hasattr(args, name))


# ----------------------------------------------------------------------------------------------- outputs
def _number(text: str):
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


def summarize(rows: list[dict], fields: list[str]) -> list[dict]:
    """Mean and std over seeds of each metric, per point of the other fields (order of first appearance)."""
    keys = [f for f in fields if f != "seed"]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    out = []
    for key, members in groups.items():
        entry = {**dict(zip(keys, key, strict=True)), "runs": len(members)}
        for m in METRICS:
            values = np.array([r[m] for r in members if r.get(m) is not None], dtype=float)
            entry[m] = float(values.mean()) if values.size else None
            entry[m + "_std"] = float(values.std()) if values.size else None
        out.append(entry)
    return out


def write_results(rows: list[dict], fields: list[str], out: Path, baseline: dict | None = None) -> None:
    columns = [*fields, *METRICS, "train_loss", "n", "latency_s_per_sample"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    summary = summarize(rows, fields)
    (out / "results.md").write_text(_markdown(summary, [f for f in fields if f != "seed"], baseline))
    _plot(summary, [f for f in fields if f != "seed"], out / "results.png", baseline)


def _cell(entry: dict, metric: str) -> str:
    if entry.get(metric) is None:
        return "-"
    text = f"{entry[metric]:.4g}"
    return text + f" ± {entry[metric + '_std']:.2g}" if entry["runs"] > 1 else text


def _markdown(summary: list[dict], keys: list[str], baseline: dict | None) -> str:
    header = [*keys, "runs", *METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    if baseline:
        lines.append("| " + " | ".join(["initial policy"] + [""] * len(keys) + [
            f"{baseline[m]:.4g}" if m in baseline else "-" for m in METRICS]) + " |")
    for entry in summary:
        lines.append("| " + " | ".join([*(str(entry[k]) for k in keys), str(entry["runs"]),
                                        *(_cell(entry, m) for m in METRICS)]) + " |")
    return "\n".join(lines) + "\n\nmean ± std over seeds; KL against the initial policy with visual thoughts.\n"


def _plot(summary: list[dict], keys: list[str], path: Path, baseline: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    x_key = keys[0] if keys else None
    series: dict[str, list[dict]] = {}
    for entry in summary:
        label = ", ".join(f"{k}={entry[k]}" for k in keys[1:]) or None
        series.setdefault(label, []).append(entry)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.4))
    for ax, metric in zip(axes, METRICS, strict=True):
        for label, entries in series.items():
            xs = [_number(e[x_key]) if x_key else 0 for e in entries]
            ys = [np.nan if e[metric] is None else e[metric] for e in entries]
            errs = [0 if e[metric + "_std"] is None else e[metric + "_std"] for e in entries]
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label)
        if baseline and metric in baseline:
            ax.axhline(baseline[metric], color="grey", linestyle="--", label="initial policy")
        ax.set_xlabel(x_key or "")
        ax.set_title(LABELS[metric])
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if labels:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), frameon=False)
    fig.tight_layout(rect=(0, 0.1 if labels else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- CLI
def _parse_sweep(specs: list[str]) -> dict[str, list[str]]:
    axes = {}
    for spec in specs:
        field, sep, values = spec.partition("=")
        if not sep or not values:
            raise ValueError(f"--sweep takes field=v1,v2,..., got {spec!r}")
        if field in axes:
            raise ValueError(f"--sweep gives {field} twice ({field}={','.join(axes[field])} and {spec}); give its "
                             "values once.")
        axes[field] = values.split(",")
    return axes


def _parse_set(specs: list[str]) -> dict[str, str]:
    fixed = {}
    for spec in specs:
        field, sep, value = spec.partition("=")
        if not sep:
            raise ValueError(f"--set takes field=value, got {spec!r}")
        if field in fixed:
            raise ValueError(f"--set gives {field} twice ({fixed[field]} and {value}); give it once.")
        fixed[field] = value
    return fixed


def run_sweep(args) -> int:
    axes = {}
    if args.beta:
        axes["beta"] = [str(b) for b in args.beta]
    for name, values in _parse_sweep(args.sweep or []).items():
        if name in axes or (name == "seed" and args.seeds):
            raise ValueError(f"{name} is swept twice (--{'beta' if name == 'beta' else 'seeds'} and --sweep "
                             f"{name}=...); give its values once.")
        axes[name] = values
    if args.seeds:
        axes["seed"] = [str(s) for s in args.seeds]
    if not axes:
        raise SystemExit("nothing to sweep: give --beta, --sweep field=v1,v2 and/or --seeds")
    out = args.out or str(Path("sweeps") / Path(args.config).stem)
    Sweep(args.config, axes, out, fixed=_parse_set(args.set or []), launcher=args.launcher).run()
    print(Path(out, "results.md").read_text())
    return 0


def register(sub) -> None:
    p = sub.add_parser("sweep", help="train + evaluate over a grid of recipe fields (beta, seeds, any field)")
    p.add_argument("--config", required=True, help="recipe YAML")
    p.add_argument("--beta", type=float, nargs="+", help="generalized JSD beta values")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (results show mean +- std over them)")
    p.add_argument("--sweep", action="append", metavar="FIELD=V1,V2", help="any recipe field; repeatable")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a recipe field for every point")
    p.add_argument("--out", help="output folder (default sweeps/<recipe name>); finished points in it are reused")
    p.add_argument("--launcher", help='training command prefix, e.g. "accelerate launch --config_file '
                   'accelerate_configs/zero3.yaml" (default: this python)')
    p.set_defaults(func=run_sweep)
