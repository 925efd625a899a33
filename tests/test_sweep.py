"""`opsd-trl sweep`: the grid, the three outputs (csv, markdown table, png), and resumability: a finished point is
never retrained or re-evaluated. The slow test runs a real 2-point beta sweep on the tiny quickstart model."""

from __future__ import annotations

import csv
import json

import pytest
from recipe_utils import REPO

from opsd_trl import sweep
from opsd_trl.cli import main as cli_main

RECIPE = str(REPO / "recipes/cpu_quickstart.yaml")
TINY = ["--set", "init_weights=none", "--set", "max_steps=2", "--set", "task_n_train=16", "--set", "eval_n=8",
        "--set", "report_to=none", "--set", "per_device_train_batch_size=4"]


def _metrics(beta: float, seed: int) -> dict:
    return {"n": 8, "accuracy": 0.5 + beta / 4 + seed / 100, "kl_teacher_student": 0.3 - beta / 10,
            "kl_gap_closure": beta / 3, "mean_output_tokens": 4.0, "latency_s_per_sample": 0.01, "train_loss": 0.1}


def test_grid_and_names():
    points = sweep.grid({"beta": ["0", "1"], "seed": ["0", "1", "2"]})
    assert len(points) == 6 and points[1] == {"beta": "0", "seed": "1"}
    assert sweep.point_name(points[1]) == "beta=0__seed=1"


def test_finished_points_are_reused_and_outputs_written(tmp_path, monkeypatch):
    axes = {"beta": ["0.0", "1.0"], "jsd_clip": ["0.02", "0.05"], "seed": ["0", "1"]}
    for point in sweep.grid(axes):
        run = tmp_path / "runs" / sweep.point_name(point)
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps(_metrics(float(point["beta"]), int(point["seed"]))))
    (tmp_path / "baseline.json").write_text(json.dumps(_metrics(0.0, 0)))

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished point was run again")

    monkeypatch.setattr(sweep.Sweep, "_train", forbidden)
    monkeypatch.setattr(sweep.Sweep, "_evaluate", forbidden)
    rows = sweep.Sweep(RECIPE, axes, tmp_path, fixed={"init_weights": "none"}).run()
    assert len(rows) == 8
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 8 and float(table[-1]["accuracy"]) == pytest.approx(0.76)
    md = (tmp_path / "results.md").read_text()
    assert "| 1.0 | 0.05 | 2 |" in md and "±" in md and "initial policy" in md
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_contexts_render_like_the_runs(tmp_path):
    """The sweep's evaluation contexts carry the recipe's teacher words and chat-template arguments."""
    fixed = {"init_weights": "none", "teacher_intro": "hint", "chat_template_kwargs": '{"add_vision_id": true}'}
    runner = sweep.Sweep(RECIPE, {"beta": ["0.5"]}, tmp_path, fixed=fixed)
    _, contexts, _ = runner._eval_setup()
    assert contexts.intro == "hint" and contexts.chat_template_kwargs == {"add_vision_id": True}


def test_bad_sweep_field_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="not_a_field"):
        sweep.Sweep(RECIPE, {"not_a_field": ["1", "2"]}, tmp_path)


@pytest.mark.slow
def test_beta_sweep_end_to_end_and_resume(tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    assert cli_main(["sweep", "--config", RECIPE, "--beta", "0", "1", *TINY, "--out", str(out)]) == 0
    for name in ("results.csv", "results.md", "results.png"):
        assert (out / name).stat().st_size > 0
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["beta=0.0", "beta=1.0"]
    card = (out / "runs/beta=1.0/README.md").read_text()
    assert "## Visual-OPSD" in card and "## Evaluation" in card and "| beta | 1 |" in card
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json")}

    def forbidden(*args, **kwargs):
        raise AssertionError("the second call retrained a finished point")

    monkeypatch.setattr(sweep.subprocess, "run", forbidden)
    assert cli_main(["sweep", "--config", RECIPE, "--beta", "0", "1", *TINY, "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.json")} == stamps


def _sweep(*args):
    return cli_main(["sweep", "--config", RECIPE, *TINY, *args])


def _no_training(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the sweep started training")

    monkeypatch.setattr(sweep.subprocess, "run", forbidden)


@pytest.mark.parametrize("args,message", [
    (["--beta", "0.5", "0.5"], "the sweep lists beta 0.5 0.5: a value twice"),
    (["--sweep", "beta=0.5,0.50"], "the sweep points beta=0.5 and beta=0.50 are the same setting"),
    (["--beta", "0.5", "--sweep", "beta=0.7"], "beta is swept twice"),
    (["--beta", "0.5", "--set", "beta=0.7"], "beta is both swept"),
    (["--beta", "nan"], r"beta must be in \[0.0, 1.0\] \(a finite number\), got nan"),
    (["--beta", "0.5", "--set", "output_dir=x"], "output_dir is set by the sweep"),
])
def test_repeated_or_bad_points_are_refused_before_training(args, message, tmp_path, monkeypatch):
    """`--beta 0.5 0.5` trained once and reported `runs 2` with `± 0`; `--beta nan` failed as a
    CalledProcessError of the training subprocess."""
    _no_training(monkeypatch)
    with pytest.raises(ValueError, match=message):
        _sweep(*args, "--out", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def _maze_folder(path, splits: dict):
    from datasets import DatasetDict

    from opsd_trl.tasks import make_dataset

    kw = dict(size=3, prompt="short", answer_format="numbered")
    data = {name: make_dataset("maze", source, 6, **kw) for name, source in splits.items()}
    (data["train"] if list(data) == ["train"] else DatasetDict(data)).save_to_disk(str(path))
    return str(path)


def test_evaluation_never_scores_training_rows(tmp_path, monkeypatch):
    """A `save_to_disk` folder of one Dataset used to answer any split: the sweep scored its `maze3-train-*` rows.
    Now a missing split, a test split equal to the train split and shared ids are refused, naming them."""
    _no_training(monkeypatch)
    single = _maze_folder(tmp_path / "single", {"train": "train"})
    data = ["--set", "task=none", "--set", f"dataset_name={single}", "--beta", "0.5", "--out", str(tmp_path / "o")]
    with pytest.raises(ValueError, match=rf"dataset {single} holds a single dataset \(split 'train'\), not the split "
                                         "'test'; an evaluation never falls back"):
        _sweep(*data)
    shared = _maze_folder(tmp_path / "shared", {"train": "train", "test": "train"})  # the same rows twice
    with pytest.raises(ValueError, match=r"6 of the 6 evaluation samples .* are training samples .* ids "
                                         r"\['maze3-train-s0-00000'"):
        _sweep(*data[:2], "--set", f"dataset_name={shared}", *data[4:])
    with pytest.raises(ValueError, match="dataset_test_split and dataset_train_split are both 'train'"):
        _sweep(*data, "--set", "dataset_test_split=train")
    assert not (tmp_path / "o").exists()
    held_out = _maze_folder(tmp_path / "held_out", {"train": "train", "test": "test"})
    runner = sweep.Sweep(RECIPE, {"beta": ["0.5"]}, tmp_path / "o",
                         fixed={"init_weights": "none", "task": "none", "dataset_name": held_out, "eval_n": "8"})
    assert all(i.startswith("maze3-test-") for i in runner._eval_data["id"])


def test_a_folder_of_another_sweep_is_refused(tmp_path, monkeypatch):
    """Finished points are reused by folder name: a folder of a sweep with other settings would pass its runs
    and baseline off as this sweep's."""
    _no_training(monkeypatch)
    out = tmp_path / "out"
    sweep.Sweep(RECIPE, {"beta": ["0.5"]}, out, fixed={"init_weights": "none", "eval_n": "8"})._claim_folder()
    with pytest.raises(ValueError, match=rf"sweep folder {out} holds the runs of a sweep with other settings "
                                         r"\(recipe .*cpu_quickstart.yaml; differing: --set max_steps"):
        _sweep("--beta", "0.5", "--out", str(out))
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json"]


def test_a_failed_training_point_is_named(tmp_path):
    """A point whose training fails ended in a bare `subprocess.CalledProcessError`."""
    with pytest.raises(RuntimeError, match=r"sweep point beta=0.5: training failed \(exit status 1; .*finished "
                                           "points in .* are reused"):
        _sweep("--beta", "0.5", "--launcher", "false", "--out", str(tmp_path / "out"))
def test_interrupted_point_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    """A point stopped after a complete checkpoint continues from it (a fresh run over its checkpoints is refused)."""
    point = {"beta": "0.5"}
    run_dir = tmp_path / "runs" / sweep.point_name(point)
    (run_dir / "checkpoint-2").mkdir(parents=True)
    (run_dir / "checkpoint-2" / "trainer_state.json").write_text("{}")
    commands = []
    monkeypatch.setattr(sweep.subprocess, "run", lambda cmd, check: commands.append(cmd))
    sweep.Sweep(RECIPE, {"beta": ["0.5"]}, tmp_path, fixed={"init_weights": "none"})._train(point, run_dir)
    assert commands[0][-2:] == ["--resume_from_checkpoint", "last"]
