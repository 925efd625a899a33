"""Exact resume and atomic checkpoints, through the public trainer (tests/scripts/train_opsd.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from distributed import SCRIPTS, launch, launch_env, load_script
from safetensors.torch import load_file

from opsd_trl.checkpoints import INCOMPLETE_MARKER, last_complete_checkpoint


def _run(out, model_dir, *extra, check=True):
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(SCRIPTS / "train_opsd.py"), "--out", str(out), "--model-dir", model_dir, *extra]
    proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _assert_same_run(a: dict, b: dict) -> None:
    assert a["loss"] == b["loss"]  # bit-identical: same data order, RNG, optimizer, scheduler and teacher shadow
    assert a["grad_norm"] == b["grad_norm"]
    wa, wb = load_file(a["weights"]), load_file(b["weights"])
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.mark.parametrize("mode", ["ema", "fixed"])
def test_resume_is_exact_single_process(mode, tiny_model_dirs, tmp_path):
    run = load_script("train_opsd").run
    common = ["--model-dir", tiny_model_dirs["text_lm"], "--mode", mode, "--steps", "4", "--save-steps", "2",
              "--sample", "1"]
    a = run(["--out", str(tmp_path / "straight" / "r.json"), *common])["runs"][mode]
    checkpoint = tmp_path / "straight" / "run" / "checkpoint-2"
    b = run(["--out", str(tmp_path / "resumed" / "r.json"), *common, "--resume", str(checkpoint)])["runs"][mode]
    assert len(a["loss"]) == 4
    _assert_same_run(a, b)


@pytest.mark.distributed
@pytest.mark.slow
def test_resume_is_exact_under_zero3(tiny_model_dirs, tmp_path):
    common = ["--model-dir", tiny_model_dirs["text_lm"], "--mode", "ema", "--steps", "4", "--save-steps", "2",
              "--sample", "1"]
    a = launch("train_opsd", "cpu_zero3", common, tmp_path / "straight", timeout=900)["runs"]["ema"]
    checkpoint = tmp_path / "straight" / "run" / "checkpoint-2"
    assert {p.name for p in checkpoint.glob("teacher_shadow_rank*.safetensors")} == {
        "teacher_shadow_rank0.safetensors", "teacher_shadow_rank1.safetensors"}
    b = launch("train_opsd", "cpu_zero3", [*common, "--resume", str(checkpoint)], tmp_path / "resumed",
               timeout=900)["runs"]["ema"]
    _assert_same_run(a, b)


def test_killed_save_leaves_the_previous_checkpoint_and_resume_skips_it(tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs["text_lm"]
    common = ["--mode", "ema", "--steps", "4", "--save-steps", "1"]
    out = tmp_path / "run1" / "r.json"
    proc = _run(out, model_dir, *common, "--kill-during-save-at", "2", check=False)
    assert proc.returncode == -9  # SIGKILL while checkpoint-2 was being written
    run = tmp_path / "run1" / "run"
    assert (run / "checkpoint-2" / INCOMPLETE_MARKER).exists()
    assert last_complete_checkpoint(str(run)) == str(run / "checkpoint-1")
    # The previous checkpoint is intact and loadable.
    assert load_file(str(run / "checkpoint-1" / "model.safetensors"))
    assert load_file(str(run / "checkpoint-1" / "teacher_shadow_rank0.safetensors"))
    # Resuming "from the last checkpoint" picks checkpoint-1 and finishes the run.
    _run(out, model_dir, *common, "--resume", "last")
    resumed = json.loads(out.read_text())["runs"]["ema"]
    assert len(resumed["loss"]) == 4
    straight = load_script("train_opsd").run(["--out", str(tmp_path / "straight" / "r.json"), "--model-dir",
                                              model_dir, *common])["runs"]["ema"]
    _assert_same_run(straight, resumed)
