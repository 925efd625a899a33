"""Inputs that used to end in a silent wrong result or a raw message: two runs in one output_dir, an empty training
set, a resume with changed settings, truncated weights, a full disk during a checkpoint, a killed final save."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed import SCRIPTS, launch, launch_env, load_script

from opsd_trl.cli import main as cli_main
from opsd_trl.run_lock import LOCK_FILE

REPO = Path(__file__).resolve().parents[1]
CPU_RECIPE = REPO / "recipes/cpu_quickstart.yaml"
SHORT = ["--init_weights", "none", "--max_steps", "2", "--per_device_train_batch_size", "4", "--report_to", "none"]


def _script(*args) -> list[str]:
    return [sys.executable, str(SCRIPTS / "train_opsd.py"), *map(str, args)]


def _start_paused(model_dir: str, folder: Path) -> subprocess.Popen:
    """A training run (output_dir `folder/run`) held after its first step; `folder/go` lets it finish."""
    folder.mkdir(parents=True, exist_ok=True)
    run = subprocess.Popen(_script("--out", folder / "a.json", "--model-dir", model_dir, "--steps", "2",
                                   "--pause-at-step", "1"), env=launch_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    while run.poll() is None and not (folder / "paused").exists():
        time.sleep(0.05)
    assert run.poll() is None, run.stderr.read()[-3000:]
    return run


def _finish(run: subprocess.Popen, folder: Path) -> None:
    (folder / "go").touch()
    _, err = run.communicate()
    assert run.returncode == 0, err[-3000:]


@pytest.mark.distributed
@pytest.mark.slow
def test_second_run_in_a_live_output_dir_is_refused_naming_the_first(tiny_model_dirs, tmp_path):
    """While a run holds its output_dir, a second one is refused naming the first: in one process, and on 2 processes
    every rank fails at once (neither waits for the other). Once the first has ended the folder is free."""
    model_dir = tiny_model_dirs["text_lm"]
    first = _start_paused(model_dir, tmp_path)
    try:
        with pytest.raises(RuntimeError, match=rf"output_dir {tmp_path / 'run'} is in use by another training run "
                                               rf"\(pid {first.pid} on .*another output_dir"):
            load_script("train_opsd").run(["--out", str(tmp_path / "b.json"), "--model-dir", model_dir])
        with pytest.raises(RuntimeError, match=r"exit code") as error:
            launch("train_opsd", "cpu_ddp", ["--model-dir", model_dir, "--steps", "2"], tmp_path, timeout=900)
    finally:
        _finish(first, tmp_path)
    output = str(error.value)
    assert f"is in use by another training run (pid {first.pid} on" in output
    assert len(re.findall(r"RuntimeError: output_dir .* is in use", output)) == 2  # both ranks, neither waits
    assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == first.pid
    # Once the first run has ended, the folder is free (its lock file is only a record).
    load_script("train_opsd").run(["--out", str(tmp_path / "b.json"), "--model-dir", model_dir])


def test_fresh_run_over_an_earlier_runs_checkpoints_is_refused(tiny_model_dirs, tmp_path):
    """A fresh run into a folder with another run's checkpoints would write over some of them, and a later
    `resume_from_checkpoint: true` could pick the earlier run's newest one."""
    run = load_script("train_opsd").run
    common = ["--out", str(tmp_path / "r.json"), "--model-dir", tiny_model_dirs["text_lm"], "--save-steps", "1"]
    run([*common, "--steps", "3"])
    with pytest.raises(RuntimeError, match=rf"output_dir {tmp_path / 'run'} already holds checkpoints of an earlier "
                                           r"run \(newest: checkpoint-3\).*resume_from_checkpoint: true"):
        run([*common, "--steps", "2", "--lr", "0.05"])
    with pytest.raises(ValueError, match=rf"{tmp_path / 'run'} is not a complete checkpoint .*resume from "
                                         rf"{tmp_path / 'run' / 'checkpoint-3'} instead"):  # the run's folder itself
        run([*common, "--steps", "4", "--resume", str(tmp_path / "run")])
    assert len(run([*common, "--steps", "4", "--resume", "last"])["runs"]["self"]["loss"]) == 4  # continuing is fine


def test_empty_training_set_is_refused_before_any_step(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"the training dataset has 0 rows, fewer than one generation batch of 4 "
                                         r".*task_n_train"):
        cli_main(["train", "--config", str(CPU_RECIPE), *SHORT, "--task_n_train", "0", "--output_dir", str(out)])
    assert not (out / "model.safetensors").exists()
    with pytest.raises(ValueError, match=r"has 3 rows, fewer than one generation batch of 4"):
        cli_main(["train", "--config", str(CPU_RECIPE), *SHORT, "--task_n_train", "3", "--output_dir", str(out)])
    header_only = tmp_path / "rows.csv"
    header_only.write_text("id,prompt\n")
    empty = tmp_path / "rows.jsonl"
    empty.write_text("")
    for file in (header_only, empty):
        with pytest.raises(ValueError, match=rf"dataset {file} has no rows \(split 'train'\)"):
            cli_main(["train", "--config", str(CPU_RECIPE), *SHORT, "--task", "none", "--dataset_name", str(file),
                      "--output_dir", str(out)])


def test_resume_with_changed_settings_is_refused_by_name(tiny_model_dirs, tmp_path):
    run = load_script("train_opsd").run
    common = ["--model-dir", tiny_model_dirs["text_lm"], "--steps", "2", "--save-steps", "1"]
    run(["--out", str(tmp_path / "a" / "r.json"), *common, "--mode", "ema"])
    checkpoint = str(tmp_path / "a" / "run" / "checkpoint-1")
    # An EMA checkpoint's shadow would be served as the "fixed" teacher; a new learning rate would be ignored.
    with pytest.raises(ValueError, match=r"written with other settings \(teacher_mode: 'ema' -> 'fixed'\)"):
        run(["--out", str(tmp_path / "b" / "r.json"), *common, "--mode", "fixed", "--resume", checkpoint])
    with pytest.raises(ValueError, match=r"\(learning_rate: 0\.1 -> 0\.05\).*model_name_or_path set to the "
                                         r"checkpoint folder"):
        run(["--out", str(tmp_path / "c" / "r.json"), *common, "--mode", "ema", "--lr", "0.05", "--resume",
             checkpoint])
    assert not list(tmp_path.glob("[bc]/run/checkpoint-*"))  # refused before any step


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def test_truncated_weights_name_the_file(tiny_model_dirs, bagel_release_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dirs["text_lm"], model)
    _truncate(model / "model.safetensors")
    with pytest.raises(ValueError, match=rf"{model / 'model.safetensors'} is truncated .*Copy or download it again"):
        cli_main(["train", "--config", str(CPU_RECIPE), *SHORT, "--model_name_or_path", str(model), "--output_dir",
                  str(tmp_path / "run")])
    release = tmp_path / "release"
    shutil.copytree(bagel_release_dir, release)
    _truncate(release / "ema.safetensors")
    assert cli_main(["train", "--config", str(CPU_RECIPE), *SHORT, "--model_name_or_path", str(release),
                     "--bagel_weights", "ema", "--output_dir", str(tmp_path / "run")]) == 2  # a start-up check
    assert f"opsd-trl train: {release / 'ema.safetensors'} is truncated" in capsys.readouterr().err
    # A checkpoint's weights, on resume.
    run = load_script("train_opsd").run
    common = ["--model-dir", tiny_model_dirs["text_lm"], "--steps", "2", "--save-steps", "1"]
    run(["--out", str(tmp_path / "a" / "r.json"), *common])
    checkpoint = tmp_path / "a" / "run" / "checkpoint-1"
    _truncate(checkpoint / "model.safetensors")
    with pytest.raises(ValueError, match=rf"{checkpoint / 'model.safetensors'} is truncated"):
        run(["--out", str(tmp_path / "b" / "r.json"), *common, "--resume", str(checkpoint)])


def _limit_file_size():
    limit = 16 * 1024  # bytes per file: the first checkpoint's weights do not fit (the model is ~100 KiB)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_full_disk_during_a_checkpoint_says_no_space(tiny_model_dirs, tmp_path):
    """A write that fails for room (here a file-size limit, EFBIG, as a full disk fails with ENOSPC) names the
    checkpoint and says how to continue, not torch's `unexpected pos`."""
    proc = subprocess.run(_script("--out", tmp_path / "r.json", "--model-dir", tiny_model_dirs["text_lm"], "--steps",
                                  "2", "--save-steps", "1"), env=launch_env(), capture_output=True, text=True,
                          preexec_fn=_limit_file_size)
    assert proc.returncode != 0
    checkpoint = tmp_path / "run" / "checkpoint-1"
    assert f"OSError: writing checkpoint {checkpoint} failed: no space left on its disk" in proc.stderr, \
        proc.stderr[-3000:]
    assert "resume_from_checkpoint: true" in proc.stderr


def test_killed_final_save_is_named_on_load(tiny_model_dirs, tmp_path):
    proc = subprocess.run(_script("--out", tmp_path / "r.json", "--model-dir", tiny_model_dirs["text_lm"],
                                  "--kill-during-final-save", "1"), env=launch_env(), capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-3000:]
    final = tmp_path / "run"
    assert (final / "model.safetensors").exists() and not (final / "tokenizer_config.json").exists()
    with pytest.raises(ValueError, match=rf"model folder {final} is an incomplete save .*resume the run"):
        cli_main(["train", "--config", str(CPU_RECIPE), *SHORT, "--model_name_or_path", str(final), "--output_dir",
                  str(tmp_path / "next")])
    os.remove(final / ".incomplete")  # a folder cut short before the marker existed: still named, not a hub look-up
    with pytest.raises(ValueError, match=rf"model folder {final} has weights but no tokenizer / processor files"):
        cli_main(["train", "--config", str(CPU_RECIPE), *SHORT, "--model_name_or_path", str(final), "--output_dir",
                  str(tmp_path / "next")])
