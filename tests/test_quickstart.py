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

    from opsd_trl.models.loading import init_weights_path
    from opsd_trl.train import parse_args

    s = Settings()
    recipe = Path(__file__).resolve().parents[1] / "recipes/cpu_quickstart.yaml"
    script, t, _ = parse_args(["--config", str(recipe)])
    assert (t.beta, t.jsd_clip, t.teacher_mode, t.learning_rate, t.max_steps, t.per_device_train_batch_size) == (
        s.beta, s.jsd_clip, s.teacher_mode, s.opsd_lr, s.opsd_steps, s.opsd_batch)
    # It starts from the defaults' warm-start (its teacher share included): the shipped one, keyed by them.
    weights = Path(init_weights_path(script.init_weights))
    assert json.loads(Path(f"{weights}.json").read_text())["key"] == s.warmstart_key()


def test_teacher_advice_on_the_students_answers():
    """On the shipped warm-start, the teacher with VTs (far more accurate than its student) is right at nearly every decision
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


def test_warmstart_key_tracks_the_policy_map_options():
    default = Settings().warmstart_key()
    assert Settings(vts="policy_map").warmstart_key() != default
    assert Settings(sft_detour_share=0.5).warmstart_key() not in (default, Settings(vts="policy_map").warmstart_key())


def test_exact_mcnemar_equals_a_full_enumeration_of_the_discordant_pairs():
    """Dense re-statement: under the null each discordant pair is won by either system with probability 1/2; the
    two-sided p-value is the share of all 2^n outcomes at least as far from n/2 as the observed split."""
    import itertools

    from opsd_trl.quickstart.report import mcnemar_exact

    for n in range(13):
        wins = [sum(o) for o in itertools.product((0, 1), repeat=n)]
        for k in range(n + 1):
            extreme = sum(abs(w - n / 2) >= abs(k - n / 2) for w in wins) / len(wins)
            assert mcnemar_exact(k, n - k) == pytest.approx(extreme, rel=1e-12, abs=1e-15), (k, n)
    assert mcnemar_exact(0, 30) < 2e-8 < mcnemar_exact(1, 30)


def test_paired_table_pairs_by_seed_and_maze(tmp_path):
    """Pairs are the same maze under the same distillation seed; the counts equal a direct count."""
    import random

    from opsd_trl.quickstart.report import mcnemar_exact, paired_table

    rng = random.Random(0)
    outcomes = {(m, k): [rng.random() < p for _ in range(40)] for m, p in (("visual_opsd", 0.6), ("supervised", 0.4),
                                                                            ("noise_control", 0.2),
                                                                            ("supervised_plateau", 0.7)) for k in (0, 1)}
    (tmp_path / "test").mkdir()
    for (method, seed), correct in outcomes.items():
        order = list(range(40))
        rng.shuffle(order)  # each file in its own order: pairing must go by id
        lines = [json.dumps({"id": f"m{i}", "correct": correct[i]}) for i in order]
        (tmp_path / "test" / f"{method}_seed{seed}.predictions.jsonl").write_text("\n".join(lines))
    results = {f"{m}_seed{k}": {} for m, k in outcomes}
    table = paired_table(tmp_path, results)
    for other, label in (("supervised", "supervised baseline"),
                         ("supervised_plateau", "supervised baseline to its plateau (900 steps)")):
        pairs = [xy for k in (0, 1) for xy in zip(outcomes["visual_opsd", k], outcomes[other, k], strict=True)]
        a, b = sum(x and not y for x, y in pairs), sum(y and not x for x, y in pairs)
        assert f"| Visual-OPSD vs {label} | 80 | {a} | {b} | {mcnemar_exact(a, b):.2g} |" in table


def test_fresh_splits_are_new_layouts_each_and_the_current_one_is_scored_once(tmp_path):
    """Every fresh split holds only layouts that no data split and no earlier fresh split holds, from the train part
    of the hash space; the first one (test2) is still the draw it was before later splits existed (seed + 1, the
    first unused layouts); a scored split is refused before anything trains, the extra models included."""
    from opsd_trl.quickstart.pipeline import FRESH, FRESH_SPLITS, FRESH_STAMP, datasets, fresh_split, score_fresh
    from opsd_trl.tasks import split_of
    from opsd_trl.tasks.maze import make_rows

    s = Settings(n_train=300, n_validation=40, n_test=40)
    data = datasets(s)
    grids = lambda ds: ["/".join(json.loads(m)["grid"]) for m in ds["meta"]]  # noqa: E731
    seen = {g for name in ("train", "validation", "test") for g in grids(data[name])}
    assert FRESH == FRESH_SPLITS[-1] == "test3"
    for split in FRESH_SPLITS:
        fresh = fresh_split(s, data, split)
        keys = grids(fresh)
        assert len(set(keys)) == len(fresh) == s.n_test and not set(keys) & seen
        assert all(split_of(k) == "train" for k in keys) and fresh[0]["id"].startswith(f"maze3-{split}-")
        seen |= set(keys)
    first = [r for r in make_rows("train", 3 * s.n_test, dedupe=True, **s.maze(), seed=s.seed + 1)
             if "/".join(json.loads(r["meta"])["grid"]) not in {g for n in ("train", "validation", "test")
                                                                for g in grids(data[n])}][: s.n_test]
    assert grids(fresh_split(s, data, "test2")) == ["/".join(json.loads(r["meta"])["grid"]) for r in first]
    (tmp_path / FRESH).mkdir()
    (tmp_path / FRESH / FRESH_STAMP).write_text(json.dumps({"when": "2026-01-01 00:00 UTC", "scorings": []}))

    def extra_runs():
        raise AssertionError("the extra models were asked for before the once-only check")

    with pytest.raises(ValueError, match="already scored .2026-01-01 00:00 UTC.*--force-fresh"):
        score_fresh(tmp_path, progress=False, extra_runs=extra_runs)
    assert sorted(p.name for p in tmp_path.iterdir()) == [FRESH]  # refused before training anything


def test_tuning_seeds_table_is_the_mean_over_seeds_and_pairs_with_its_start(tmp_path):
    """The multi-seed table: the mean and spread of the per-seed final accuracies (a direct re-statement), the
    paired counts by (seed, maze) counted directly: a candidate from another warm-start (the old default) against
    the default, a change on that start against the old default; single-seed candidates left out; an unknown
    candidate is refused before anything is trained or written."""
    import random
    import statistics

    from opsd_trl.quickstart.levers import OLD_SHARE
    from opsd_trl.quickstart.report import mcnemar_exact
    from opsd_trl.quickstart.tuning import DEFAULT, run_tuning, seeds_table

    rng = random.Random(0)
    old, lr = "old default (beta 1, teacher share 0.85)", "teacher share 0.85: beta 1, lr 1e-3"
    overrides = {DEFAULT: {}, old: OLD_SHARE, lr: {**OLD_SHARE, "opsd_lr": 1e-3}}
    outcomes = {name: {str(k): [rng.random() < p for _ in range(50)] for k in range(3)}
                for name, p in ((DEFAULT, 0.4), (old, 0.3), (lr, 0.5))}
    rows = {name: {"method": "visual_opsd", "overrides": overrides[name],
                   "final_by_seed": {k: sum(c) / 50 for k, c in seeds.items()}, "correct_by_seed": seeds}
            for name, seeds in outcomes.items()}
    rows["teacher share 0.85: beta 0 (forward KL)"] = {"method": "visual_opsd", "final_by_seed": {"0": 0.3}}
    table = seeds_table(rows, Settings())
    for name, other in ((old, DEFAULT), (lr, old)):
        acc = [100 * sum(c) / 50 for c in outcomes[name].values()]
        pairs = [(x, y) for k in "012" for x, y in zip(outcomes[name][k], outcomes[other][k], strict=True)]
        a, b = sum(x and not y for x, y in pairs), sum(y and not x for x, y in pairs)
        line = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {statistics.mean(acc):.1f}% | {max(acc) - min(acc):.1f} |" in line
        assert f"| {other} | {a} / {b} of 150 (p = {mcnemar_exact(a, b):.2g}) |" in line
    assert "forward KL" not in table and len(table.splitlines()) == 5  # header, separator, three candidates
    assert table.splitlines()[2].endswith("|  |  |")  # the default is paired with nobody
    with pytest.raises(ValueError, match="unknown tuning candidate 'nope'"):
        run_tuning(tmp_path, ["nope"])
    assert not any(tmp_path.iterdir())


def test_candidates_and_levers_of_one_warmstart_share_it_and_none_repeats_the_defaults(tmp_path):
    """Every tuning candidate and lever that is not the defaults' own changes something (the frozen defaults are not
    listed twice under another name); all those whose warm-start has the same key find it, and its VT cache, in one
    folder (trained once), the defaults' in `out` (the shipped one); the runs of the earlier defaults name their
    warm-start share."""
    from dataclasses import replace

    from opsd_trl.quickstart.levers import LEVERS
    from opsd_trl.quickstart.pipeline import warmstart_home
    from opsd_trl.quickstart.tuning import CANDIDATES

    settings = {**{f"lever {n}": replace(Settings(), **o) for n, (_, o) in LEVERS.items()},
                **{f"candidate {n}": replace(Settings(), **o) for n, (_, o) in CANDIDATES.items()}}
    overrides = [o for _, o in LEVERS.values()] + [o for _, o in CANDIDATES.values()]
    assert all(s != Settings() for s, o in zip(settings.values(), overrides, strict=True) if o)
    homes = {n: warmstart_home(tmp_path, s) for n, s in settings.items()}
    for a, sa in settings.items():
        for b, sb in settings.items():
            assert (homes[a] == homes[b]) == (sa.warmstart_key() == sb.warmstart_key()), (a, b)
        assert (homes[a] == tmp_path) == (sa.warmstart_key() == Settings().warmstart_key()), a
    assert all("0.85" in n for n, s in settings.items() if s.sft_teacher_share == 0.85)
    assert not any(tmp_path.iterdir())


def test_a_new_warmstart_is_trained_into_its_own_new_home(tmp_path):
    """A lever or candidate whose warm-start is not the defaults' trains it into `out/warmstarts/<key>/`, a folder
    that does not exist yet."""
    from dataclasses import replace

    from opsd_trl.quickstart.pipeline import datasets, warmstart_home, warmstart_stage

    s = replace(SMOKE, sft_steps=1, sft_teacher_share=0.25)
    home = warmstart_home(tmp_path, s)
    assert home != tmp_path and not home.exists()
    path = warmstart_stage(s, datasets(s), home, rebuild=False, progress=False)
    assert path == home / "warmstart.safetensors" and path.exists()
    assert json.loads((home / "warmstart.json").read_text())["key"] == s.warmstart_key()


def test_one_seed_headline_quotes_the_docs_mean_of_the_same_settings(tmp_path):
    """A one-seed run prints its seed and, beside it, the docs page's multi-seed headline when that page's results
    were made with the same settings (but seeds); otherwise it only says where the mean is."""
    from dataclasses import asdict, replace

    from opsd_trl.quickstart.report import headline

    results = {"teacher_with_vt": {"accuracy": 0.9}, "student_before": {"accuracy": 0.4},
               **{f"{m}_seed0": {"accuracy": a} for m, a in (("visual_opsd", 0.5), ("supervised", 0.6),
                                                              ("noise_control", 0.2))}}
    one = asdict(Settings())
    docs_line = "Visual-OPSD (mean of distillation seeds 0, 1, 2): student 40.0% -> 45.0% (+5.0 points; ...)"
    start, end = markers("results")
    page = tmp_path / "page.md"
    for made_with, quoted in ((replace(Settings(), seeds=3), True), (replace(Settings(), seeds=3, opsd_lr=1e-3), False),
                              (Settings(), False)):
        page.write_text(f"prose\n{start}\n{docs_line}\n\nSettings: `{json.dumps(asdict(made_with))}`. Wall\n{end}\n")
        text = headline(results, one, page)
        assert text.startswith("Visual-OPSD (distillation seed 0, one seed; ") and "student 40.0% -> 50.0%" in text
        assert (text.splitlines()[-1] == docs_line) == quoted and ("3-seed mean and range are in" in text) != quoted
    # The fresh splits' headlines follow, each only when that split was scored with the same settings.
    fresh = {"test8": replace(Settings(), seeds=3), "test9": replace(Settings(), seeds=3, beta=0.5)}
    sections = "".join(f"{markers(f'fresh {split}')[0]}\nOn {split}, mazes ...: Visual-OPSD 1.0%\n\nscored x, settings "
                       f"`{json.dumps(asdict(s))}`.\n{markers(f'fresh {split}')[1]}\n" for split, s in fresh.items())
    made_with = json.dumps(asdict(replace(Settings(), seeds=3)))
    page.write_text(f"{start}\n{docs_line}\n\nSettings: `{made_with}`. Wall\n{end}\n{sections}")
    assert headline(results, one, page).splitlines()[1:] == [docs_line, "On test8, mazes ...: Visual-OPSD 1.0%"]


def test_a_folder_made_with_other_settings_is_refused_before_anything_runs(tmp_path):
    """Stages are reused by path: a folder whose run had other settings (here an earlier warm-start share) is
    refused, naming the field, before any stage runs; more seeds of the same settings are no change."""
    from dataclasses import asdict, replace

    (tmp_path / "report.json").write_text(json.dumps({"settings": asdict(replace(SMOKE, sft_teacher_share=0.85))}))
    with pytest.raises(ValueError, match=r"other settings \(sft_teacher_share 0.85 there, 0.5 now\).*new --out"):
        run_quickstart(tmp_path, smoke=True, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    from opsd_trl.quickstart.pipeline import check_reuse

    check_reuse(tmp_path, replace(SMOKE, sft_teacher_share=0.85, seeds=3))  # the same run with more seeds


def test_levers_and_tuning_refuse_a_folder_of_other_defaults_before_anything_runs(tmp_path):
    """The levers' and tuning candidates' rows of today's defaults are trained from `out`'s warm-start and runs: a
    folder made under other defaults (here the 600-step warm-start) would lend them its own, so both refuse it."""
    from dataclasses import asdict, replace

    from opsd_trl.quickstart.levers import run_levers
    from opsd_trl.quickstart.tuning import run_tuning

    (tmp_path / "report.json").write_text(json.dumps({"settings": asdict(replace(Settings(), sft_steps=600))}))
    for run in (lambda: run_levers(tmp_path, ["Visual-OPSD for 900 steps"], progress=False),
                lambda: run_tuning(tmp_path, ["beta 1, lr 1e-3"], progress=False)):
        with pytest.raises(ValueError, match=r"other settings \(sft_steps 600 there, 1800 now\)"):
            run()
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_an_interrupted_run_s_folder_is_refused_to_other_settings(tmp_path, monkeypatch):
    """A run stopped before its report (here at its first stage) has left no report.json: its settings, recorded
    before the first stage, still make a run with other settings refuse the folder."""
    from dataclasses import replace

    from opsd_trl.quickstart import pipeline

    class Stopped(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stopped  # the run dies here, as under Ctrl-C or a crash

    monkeypatch.setattr(pipeline, "warmstart_stage", stop)
    with pytest.raises(Stopped):
        run_quickstart(tmp_path, settings=replace(SMOKE, sft_teacher_share=0.85), progress=False)
    assert not (tmp_path / "report.json").exists()
    with pytest.raises(ValueError, match=r"other settings \(sft_teacher_share 0.85 there, 0.5 now\)"):
        run_quickstart(tmp_path, smoke=True, progress=False)
