"""The quickstart's smoke mode: every stage runs for a few steps, writes its outputs, and a rerun reuses them."""

import json

import pytest

from opsd_trl.quickstart import run_quickstart
from opsd_trl.quickstart.pipeline import SMOKE, Settings

ROWS = ["teacher-with-VT accuracy", "student accuracy before", "after Visual-OPSD", "after noise control",
        "KL-gap closure, Visual-OPSD", "KL-gap closure, noise control", "mean output tokens"]


@pytest.mark.slow  # ~20 s alone, ~30 s on a busy 2-core machine
def test_smoke_runs_every_stage_and_resumes(tmp_path):
    results = run_quickstart(tmp_path, smoke=True, progress=False)
    assert set(results) == {"teacher_with_vt", "student_before", "visual_opsd", "noise_control"}
    assert "kl_gap_closure" in results["visual_opsd"] and "kl_gap_closure" in results["noise_control"]
    report = (tmp_path / "results.md").read_text()
    assert all(row in report for row in ROWS)
    assert (tmp_path / "curves.png").stat().st_size > 1000
    for run in ("visual_opsd", "noise_control"):
        history = json.loads((tmp_path / run / "history.json").read_text())
        assert [p["step"] for p in history["validation"]] == [0, SMOKE.eval_every]
    stamp = (tmp_path / "visual_opsd" / "final.safetensors").stat().st_mtime_ns
    assert run_quickstart(tmp_path, smoke=True, progress=False) == results  # every stage reused
    assert (tmp_path / "visual_opsd" / "final.safetensors").stat().st_mtime_ns == stamp


def test_warmstart_key_tracks_its_settings():
    assert Settings().warmstart_key() == Settings(opsd_steps=1).warmstart_key()
    assert Settings().warmstart_key() != Settings(sft_steps=1).warmstart_key()


def test_shipped_warmstart_matches_the_defaults():
    from opsd_trl.quickstart.pipeline import _shipped

    assert _shipped(Settings()) is not None  # else every `opsd-trl quickstart` silently retrains the warm-start


def test_cpu_recipe_follows_the_quickstart_defaults():
    from pathlib import Path

    from opsd_trl.train import parse_args

    s = Settings()
    recipe = Path(__file__).resolve().parents[1] / "recipes/cpu_quickstart.yaml"
    _, t, _ = parse_args(["--config", str(recipe)])
    assert (t.beta, t.jsd_clip, t.teacher_mode, t.learning_rate, t.max_steps, t.per_device_train_batch_size) == (
        s.beta, s.jsd_clip, s.teacher_mode, s.opsd_lr, s.opsd_steps, s.opsd_batch)
