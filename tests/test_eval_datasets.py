"""`opsd-trl eval` on any dataset: a text dataset in the standard layout scored by a scorer chosen by name (exact
match, a multiple-choice letter, the user's module:function), on a saved tiny text LM."""

import json

import pytest

from opsd_trl.cli import main
from opsd_trl.tasks.scorers import choice_letter, get_scorer, multiple_choice
from opsd_trl.testing.tiny_models import build_tiny_text_lm, save_tiny

QUESTIONS = ["Capital of France?", "2 + 3 = ?", "Colour of the sky?"]


def not_empty(row, completion):  # a user's scorer, named as test_eval_datasets:not_empty
    return bool(completion.strip()) and row["id"].startswith("q")


def _write(path, answers):
    with open(path, "w") as f:
        for i, (question, answer) in enumerate(zip(QUESTIONS, answers, strict=True)):
            f.write(json.dumps({"id": f"q{i}", "prompt": [{"role": "user", "content": question}], "images": [],
                                "vt_images": [], "vt_text": f"think about {question}", "answer": answer}) + "\n")
    return str(path)


def _eval(capsys, model, data, tmp_path, *extra):
    preds = tmp_path / "preds"
    assert main(["eval", "--model", model, "--baseline", model, "--dataset", data, "--split", "train",  # a file
                 "--max-new-tokens", "4",
                 "--batch-size", "2", "--predictions-dir", str(preds), *extra]) == 0
    printed = json.loads(capsys.readouterr().out)
    records = [json.loads(x) for x in (preds / "model.predictions.jsonl").read_text().splitlines()]
    return printed, records


@pytest.fixture(scope="module")
def text_lm_dir(tmp_path_factory):
    return save_tiny(*build_tiny_text_lm(), tmp_path_factory.mktemp("text_lm"))


def test_eval_cli_scores_a_text_dataset_by_exact_match(text_lm_dir, tmp_path, capsys):
    first, records = _eval(capsys, text_lm_dir, _write(tmp_path / "a.jsonl", ["Paris", "5", "blue"]), tmp_path,
                           "--scorer", "exact_match")
    assert first["model"]["n"] == 3 and first["kl_gap_closure"] == 0.0  # vt_text: the teacher context, the KL
    completions = [r["completion"] for r in records]
    assert all(r["task"] == "exact_match" and r["meta"] is None for r in records)
    # The same greedy completions scored against answers that match the first (up to case and spaces) only.
    answers = [f"  {completions[0].upper()} ", completions[1] + " x", "blue"]
    second, records = _eval(capsys, text_lm_dir, _write(tmp_path / "b.jsonl", answers), tmp_path,
                            "--scorer", "exact_match")
    assert [r["completion"] for r in records] == completions
    assert [r["correct"] for r in records] == [True, False, completions[2].strip().lower() == "blue"]
    assert second["model"]["accuracy"] == sum(r["correct"] for r in records) / 3


def test_eval_cli_user_scorer_and_a_row_without_task(text_lm_dir, tmp_path, capsys):
    data = _write(tmp_path / "a.jsonl", ["Paris", "5", "blue"])
    printed, records = _eval(capsys, text_lm_dir, data, tmp_path, "--scorer", "test_eval_datasets:not_empty")
    assert [r["correct"] for r in records] == [bool(r["completion"].strip()) for r in records]
    with pytest.raises(ValueError, match="sample 'q0' has no task to score it by: choose a scorer"):
        main(["eval", "--model", text_lm_dir, "--dataset", data, "--split", "train", "--max-new-tokens", "2"])
    with pytest.raises(ValueError, match="unknown scorer 'nope'"):
        main(["eval", "--model", text_lm_dir, "--dataset", data, "--split", "train", "--scorer", "nope"])
    with pytest.raises(ValueError, match="scorer 'no_such_module:f' cannot be imported"):
        main(["eval", "--model", text_lm_dir, "--dataset", data, "--split", "train", "--scorer",
              "no_such_module:f"])


@pytest.mark.parametrize("completion, letter", [("B", "B"), ("(C) because", "C"), ("Answer: D.", "D"),
                                                ("I think so", "I"), ("none", None), ("ABC", None)])
def test_choice_letter(completion, letter):
    assert choice_letter(completion) == letter


def test_multiple_choice_and_task_scorers():
    assert multiple_choice({"answer": "b"}, "The answer is (B).") is True  # "T" starts a word: not a letter
    assert multiple_choice({"answer": "(B)"}, "A, not B") is False  # the first standalone letter counts
    maze = get_scorer("maze")
    assert maze.score({"meta": json.dumps({"grid": ["SF", "FG"], "rules": "vsp"})}, "R D")
    assert maze.parse("R D") == "RD"
