"""The quickstart's smoke mode: every stage runs for a few steps, writes its outputs, and a rerun reuses them."""

import json

import pytest

from opsd_trl.quickstart import run_quickstart
from opsd_trl.quickstart.pipeline import SMOKE, Settings
from opsd_trl.quickstart.report import markers
from opsd_trl.tasks import score

ROWS = ["teacher with VTs", "student before (warm-start)", "| Visual-OPSD |", "noise-VT control", "supervised baseline",
        "KL-gap closure", "output tokens", "paper: accuracy", "moves ("]
MODELS = {"teacher_with_vt", "student_before", "visual_opsd_seed0", "noise_control_seed0", "supervised_seed0"}


@pytest.mark.slow  # ~20 s alone, ~40 s on a busy 2-core machine
def test_smoke_runs_every_stage_resumes_and_writes_the_docs_section(tmp_path):
    results = run_quickstart(tmp_path, smoke=True, progress=False)
    assert set(results) == MODELS
    assert all("kl_gap_closure" in results[m] for m in MODELS - {"teacher_with_vt", "student_before"})
    report = (tmp_path / "results.md").read_text()
    assert all(row in report for row in ROWS), report
    assert "distillation seed 0, one seed; the 3-seed mean and range are in docs/quickstart.md" in report
    assert (tmp_path / "curves.png").stat().st_size > 1000
    for run in ("visual_opsd", "noise_control", "supervised"):
        history = json.loads((tmp_path / run / "seed0" / "history.json").read_text())
        assert [p["step"] for p in history["validation"]] == [0, SMOKE.eval_every]
    # Each evaluated model's predictions re-score to its reported accuracy with the task's own scorer.
    for name in MODELS:
        lines = (tmp_path / "test" / f"{name}.predictions.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert len(records) == SMOKE.n_test
        assert all(score("maze", r["meta"], r["completion"]) == r["correct"] for r in records)
        assert sum(r["correct"] for r in records) / len(records) == results[name]["accuracy"]
    stamp = (tmp_path / "visual_opsd" / "seed0" / "final.safetensors").stat().st_mtime_ns
    page = tmp_path / "page.md"
    start, end = markers("results")
    page.write_text(f"# title\n\nprose\n\n{start}\nold\n{end}\n\nmore prose\n")
    assert run_quickstart(tmp_path, smoke=True, progress=False, docs=page) == results  # every stage reused
    assert (tmp_path / "visual_opsd" / "seed0" / "final.safetensors").stat().st_mtime_ns == stamp
    text = page.read_text()
    assert "old" not in text and text.startswith("# title\n\nprose") and text.endswith("more prose\n")
    assert all(row in text for row in ROWS) and (tmp_path / "quickstart_curves.png").exists()


@pytest.mark.slow
def test_more_seeds_reuse_the_first(tmp_path):
    run_quickstart(tmp_path, smoke=True, progress=False)
    stamp = (tmp_path / "visual_opsd" / "seed0" / "final.safetensors").stat().st_mtime_ns
    results = run_quickstart(tmp_path, smoke=True, progress=False, seeds=2)
    assert {"visual_opsd_seed1", "noise_control_seed1", "supervised_seed1"} <= set(results)
    assert (tmp_path / "visual_opsd" / "seed0" / "final.safetensors").stat().st_mtime_ns == stamp
    assert "2 seeds: mean (min to max)" in (tmp_path / "results.md").read_text()
    assert "mean of distillation seeds 0, 1" in (tmp_path / "results.md").read_text()


def test_warmstart_key_tracks_its_settings():
    assert Settings().warmstart_key() == Settings(opsd_steps=1).warmstart_key()
    assert Settings().warmstart_key() != Settings(sft_steps=1).warmstart_key()


def test_shipped_warmstart_matches_the_defaults():
    from opsd_trl.quickstart.pipeline import _shipped

    assert _shipped(Settings()) is not None  # else every `opsd-trl quickstart` silently retrains the warm-start


def test_shipped_warmstart_is_refused_after_a_task_or_vocabulary_change():
    from opsd_trl.quickstart.model import build_word_tokenizer
    from opsd_trl.quickstart.pipeline import MAZE, _shipped

    vocab = build_word_tokenizer().get_vocab()
    changes = [dict(task={**MAZE, "size": 4}), dict(task={**MAZE, "answer_format": "plain"}),
               dict(task={**MAZE, "prompt": "full"}), dict(vocabulary={**vocab, "left": len(vocab)}),
               dict(vocabulary={**vocab, "L": vocab["R"], "R": vocab["L"]})]  # the same words, other ids
    assert _shipped(Settings(), task=MAZE, vocabulary=vocab) is not None
    for change in changes:
        assert _shipped(Settings(), **change) is None, change


def test_cpu_recipe_follows_the_quickstart_defaults():
    from pathlib import Path

    from opsd_trl.train import parse_args

    s = Settings()
    recipe = Path(__file__).resolve().parents[1] / "recipes/cpu_quickstart.yaml"
    _, t, _ = parse_args(["--config", str(recipe)])
    assert (t.beta, t.jsd_clip, t.teacher_mode, t.learning_rate, t.max_steps, t.per_device_train_batch_size) == (
        s.beta, s.jsd_clip, s.teacher_mode, s.opsd_lr, s.opsd_steps, s.opsd_batch)


def test_teacher_advice_on_the_students_answers():
    """On the shipped warm-start, the teacher with VTs (98% accurate on validation) is right at nearly every decision
    while the student follows the VTs' path; a one-position misalignment of logits and decisions would break this."""
    from opsd_trl.eval import Contexts, evaluate
    from opsd_trl.quickstart.advice import teacher_advice
    from opsd_trl.quickstart.model import TEACHER_INTRO, TEACHER_TRANSITION, load_weights
    from opsd_trl.quickstart.pipeline import _shipped, datasets

    s = Settings(n_validation=48)
    rows = list(datasets(s)["validation"])
    teacher, processor = load_weights(_shipped(s))
    student, _ = load_weights(_shipped(s))
    contexts = Contexts(processor, intro=TEACHER_INTRO, transition=TEACHER_TRANSITION)
    texts = [p["completion"] for p in evaluate(student, processor, rows, contexts=contexts, progress=False)
             ["predictions"]]
    counts = teacher_advice(student, teacher, contexts, rows, texts)
    on, off = counts["on_path"], counts["off_path"]
    assert on["decisions"] >= 48 and off["decisions"] > 0
    assert on["teacher_right"] / on["decisions"] > 0.9
    assert on["student_right"] < on["teacher_right"]  # the student before is weaker than its teacher on its path


def test_the_papers_noise_control_leaks_the_path_length_and_a_fixed_count_does_not():
    """On the shipped warm-start, teacher-forced on reference answers: with as many noise VTs as moves the teacher
    still stops on time (the count is the path length) while its moves are poor; with a fixed count it cannot."""
    from dataclasses import replace

    from opsd_trl.eval import Contexts
    from opsd_trl.quickstart.advice import decision_accuracy
    from opsd_trl.quickstart.model import TEACHER_INTRO, TEACHER_TRANSITION, load_weights
    from opsd_trl.quickstart.pipeline import _shipped, datasets

    s = Settings(n_validation=48)
    rows = list(datasets(replace(s, n_train=8, n_test=8))["validation"])  # the other splits: as small as they go
    teacher, processor = load_weights(_shipped(s))

    def rates(**options):
        contexts = Contexts(processor, intro=TEACHER_INTRO, transition=TEACHER_TRANSITION, **options)
        counts = decision_accuracy(teacher, contexts, rows, teacher=True)
        assert counts["move"]["decisions"] == counts["stop_go"]["decisions"] >= 2 * len(rows)  # one each per move
        return {k: v["right"] / v["decisions"] for k, v in counts.items()}

    real, paper, fixed = rates(), rates(noise_vt=True), rates(noise_vt=True, noise_vt_count=3)
    assert real["move"] > 0.9 and real["stop_go"] > 0.9
    assert paper["move"] < real["move"] - 0.2 and paper["stop_go"] > 0.9  # the leak
    assert fixed["stop_go"] < paper["stop_go"] - 0.1


def test_levers_are_options_on_the_defaults(tmp_path):
    """Each lever changes only `Settings` fields and trains known methods; an unknown name is refused before any
    training; the default lever's runs are the quickstart's own."""
    from dataclasses import replace

    from opsd_trl.quickstart.levers import LEVERS, lever_folder, run_levers
    from opsd_trl.quickstart.pipeline import METHODS

    for name, (methods, overrides) in LEVERS.items():
        assert set(methods) <= set(METHODS) and replace(Settings(), **overrides) != Settings() or not overrides
        assert (lever_folder(tmp_path, name) == tmp_path) == (not overrides)
    with pytest.raises(ValueError, match="unknown lever 'nope'"):
        run_levers(tmp_path, ["nope"])
    assert not any(tmp_path.iterdir())
