"""opsd_trl.eval on the quickstart's tiny model: context parity with the HF forward, and every metric."""

import copy
import math

import pytest
import torch

from opsd_trl.eval import Contexts, completion_logits, evaluate, evaluate_checkpoints, kl_gap_closure
from opsd_trl.quickstart.model import (
    TEACHER_INTRO,
    TEACHER_TRANSITION,
    build_quickstart_model,
    load_checkpoint,
    save_weights,
)
from opsd_trl.tasks import make_dataset, score
from opsd_trl.tasks.maze import parse_moves

METRICS = {"n", "accuracy", "mean_output_tokens", "latency_s_per_sample", "batch_size", "kl_teacher_student",
           "predictions"}


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    model, processor = build_quickstart_model(seed=0)
    data = make_dataset("maze", "test", 6, seed=0, prompt="short", answer_format="numbered", dedupe=True)
    return model, processor, data, Contexts(processor, intro=TEACHER_INTRO, transition=TEACHER_TRANSITION)


def test_student_context_logits_match_the_hf_forward(setup):
    model, processor, data, contexts = setup
    row = data[0]
    completion = processor.tokenizer(row["answer"], add_special_tokens=False)["input_ids"] + [3]
    logits, mask = completion_logits(model, contexts, [row], [completion], teacher=False)
    text = processor.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=row["images"], return_tensors="pt")
    ids = torch.cat([inputs["input_ids"], torch.tensor([completion])], dim=1)
    mm_types = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, len(completion), dtype=torch.long)], dim=1)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                    image_grid_thw=inputs["image_grid_thw"], mm_token_type_ids=mm_types).logits
    torch.testing.assert_close(logits[0], ref[0, -len(completion) - 1 : -1], atol=1e-4, rtol=1e-4)
    assert mask.all()


def test_evaluate_produces_every_metric(setup):
    model, processor, data, contexts = setup
    student = copy.deepcopy(model)
    with torch.no_grad():  # a student that differs from the reference
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    out = evaluate(student, processor, data, reference=model, contexts=contexts, batch_size=4, progress=False)
    assert set(out) == METRICS and out["n"] == 6
    assert 0.0 <= out["accuracy"] <= 1.0 and 0.0 <= out["mean_output_tokens"] <= 16
    assert out["latency_s_per_sample"] > 0 and out["kl_teacher_student"] > 0
    teacher = evaluate(model, processor, data, teacher_context=True, contexts=contexts, progress=False)
    assert set(teacher) == METRICS - {"kl_teacher_student"}
    # One record per sample, in dataset order, that re-scores to the reported accuracy with the task's scorer.
    records = out["predictions"]
    assert [r["id"] for r in records] == list(data["id"])
    assert all(r["parsed"] == parse_moves(r["completion"]) for r in records)
    assert all(score("maze", r["meta"], r["completion"]) == r["correct"] for r in records)
    assert sum(r["correct"] for r in records) / 6 == out["accuracy"]
    tokens = sum(r["kl_tokens"] for r in records)  # per-sample KLs, token-weighted, give the overall KL
    assert abs(sum(r["kl_teacher_student"] * r["kl_tokens"] for r in records) / tokens - out["kl_teacher_student"]) < 1e-5


def test_kl_gap_closure():
    assert kl_gap_closure(2.0, 0.5) == 0.75
    assert kl_gap_closure(2.0, 2.2) < 0  # a wider gap after training reads as negative closure
    assert math.isclose(kl_gap_closure(1.0, 1.0), 0.0)


def test_evaluate_checkpoints_reports_closure(setup, tmp_path):
    model, _, data, _ = setup
    save_weights(model, tmp_path / "before.safetensors")
    save_weights(model, tmp_path / "after.safetensors")
    out = evaluate_checkpoints(str(tmp_path / "after.safetensors"), data, baseline_path=str(tmp_path /
                               "before.safetensors"), batch_size=8, progress=False, load=load_checkpoint,
                               intro=TEACHER_INTRO, transition=TEACHER_TRANSITION)
    assert set(out) == {"baseline", "model", "kl_gap_closure"}
    assert out["model"]["accuracy"] == out["baseline"]["accuracy"]
    assert abs(out["kl_gap_closure"]) < 1e-6  # same weights: nothing closed


def test_eval_cli_scores_a_saved_folder_of_each_vl_family(family_model_dirs, capsys):
    import json

    from opsd_trl.cli import main

    for family in ("qwen2_5_vl", "qwen3_vl", "bagel"):
        path = family_model_dirs[family]
        assert main(["eval", "--model", path, "--baseline", path, "--n", "2", "--batch-size", "2"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["model"]["n"] == 2 and out["kl_gap_closure"] == 0.0, family


def test_eval_cli_bad_checkpoints_and_counts(family_model_dirs, setup, tmp_path, capsys):
    from safetensors.torch import save_file

    from opsd_trl.cli import main

    def run(*args):
        return main(["eval", *args, "--n", "2", "--batch-size", "2"])

    with pytest.raises(FileNotFoundError, match=f"checkpoint {tmp_path / 'absent'} not found; give a model folder"):
        run("--model", str(tmp_path / "absent"))
    quickstart = tmp_path / "quickstart.safetensors"
    save_weights(setup[0], quickstart)
    with pytest.raises(ValueError, match="have different vocabularies"):
        run("--model", str(quickstart), "--baseline", family_model_dirs["qwen2_5_vl"])
    other = tmp_path / "other.safetensors"
    from opsd_trl.testing.tiny_models import build_tiny_qwen2_5_vl

    save_file(build_tiny_qwen2_5_vl()[0].state_dict(), str(other))
    with pytest.raises(ValueError, match="is not a quickstart weights file"):
        run("--model", str(other))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt is not a model folder; give the folder"):
        run("--model", str(tmp_path / "notes.txt"))
    for flag in ("--n", "--batch-size", "--max-new-tokens"):
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", "--model", str(quickstart), flag, "0"])
        assert exit_info.value.code == 2 and f"argument {flag}: must be >= 1, got 0" in capsys.readouterr().err


def test_evaluate_checkpoints_refuses_an_empty_dataset(setup, tmp_path):
    save_weights(setup[0], tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="the evaluation dataset is empty"):
        evaluate_checkpoints(str(tmp_path / "m.safetensors"), setup[2].select([]), progress=False,
                             load=load_checkpoint)


@pytest.mark.parametrize("size", ["1", "0", "-2"])
def test_eval_cli_maze_size_below_two_is_refused(size, tmp_path):
    from opsd_trl.cli import main

    save_weights(build_quickstart_model(seed=0)[0], tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=f"maze size must be an integer >= 2 \\(cells per side\\), got {size}"):
        main(["eval", "--model", str(tmp_path / "m.safetensors"), "--n", "2", "--size", size])


def test_eval_cli_folder_without_config(tmp_path):
    from opsd_trl.cli import main

    (tmp_path / "adapter_only").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_only has no config.json: it is not a saved model"):
        main(["eval", "--model", str(tmp_path / "adapter_only"), "--n", "2"])


def test_cli_eval_writes_rescorable_predictions(setup, tmp_path, capsys):
    import json

    from opsd_trl.cli import main

    model, _, _, _ = setup
    save_weights(model, tmp_path / "model.safetensors")
    rc = main(["eval", "--model", str(tmp_path / "model.safetensors"), "--baseline", str(tmp_path / "model.safetensors"),
               "--split", "validation", "--n", "6", "--batch-size", "6", "--predictions-dir", str(tmp_path / "pred")])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert "predictions" not in printed["model"]
    for name in ("model", "baseline"):
        records = [json.loads(x) for x in (tmp_path / "pred" / f"{name}.predictions.jsonl").read_text().splitlines()]
        assert len(records) == 6 and all(set(r["meta"]) >= {"grid", "path"} for r in records)
        assert sum(score("maze", r["meta"], r["completion"]) for r in records) / 6 == printed[name]["accuracy"]


def _kl(capsys, *args) -> float:
    import json

    from opsd_trl.cli import main

    assert main(["eval", *args, "--n", "3", "--batch-size", "3"]) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{\n"):])["model"]["kl_teacher_student"]  # after any library's log line


def test_eval_uses_the_checkpoints_context_words(setup, tmp_path, capsys):
    """`opsd-trl eval` on quickstart weights without --teacher-intro/--teacher-transition used the trainer's default
    intro, which the 64-word vocabulary reads as <unk> after <unk>, and exited 0 with a wrong KL. Now a quickstart
    weights file gets the quickstart's words, a folder saved by the trainer its own, and words the tokenizer cannot
    write are an error naming the field and the fix."""
    from opsd_trl import VisualOPSDConfig
    from opsd_trl.config import TEACHER_INTRO as PAPER_INTRO

    model, processor, _, _ = setup
    weights = str(tmp_path / "m.safetensors")
    save_weights(model, weights)
    right = ["--teacher-intro", TEACHER_INTRO, "--teacher-transition", TEACHER_TRANSITION]
    assert _kl(capsys, "--model", weights, "--reference", weights) == _kl(capsys, "--model", weights, "--reference",
                                                                            weights, *right)
    with pytest.raises(ValueError, match=r"teacher_intro 'The following images .*' cannot be written with this "
                                         r"tokenizer's vocabulary: it reads back as '<unk> <unk>.*--teacher-intro"):
        _kl(capsys, "--model", weights, "--reference", weights, "--teacher-intro", PAPER_INTRO)
    folder = tmp_path / "folder"  # a saved model folder, as the trainer writes it
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    with pytest.raises(ValueError, match="teacher_intro 'The following images"):  # no words saved: the defaults
        _kl(capsys, "--model", str(folder), "--reference", str(folder))
    from opsd_trl.teacher_context import save_context_words

    config = VisualOPSDConfig(output_dir=str(tmp_path), report_to=[], bf16=False, teacher_intro=TEACHER_INTRO,
                              teacher_transition=TEACHER_TRANSITION)
    save_context_words(str(folder), config)
    assert _kl(capsys, "--model", str(folder), "--reference", str(folder)) == _kl(
        capsys, "--model", weights, "--reference", weights, *right)


def test_eval_cli_folder_with_a_config_and_no_weights(family_model_dirs, tmp_path):
    """A folder with a config.json and no weights (an adapter-only or un-gathered DeepSpeed checkpoint) ended in
    transformers' `no file named model.safetensors` error."""
    import shutil

    from opsd_trl.cli import main

    folder = tmp_path / "no_weights"
    folder.mkdir()
    shutil.copy(f"{family_model_dirs['qwen2_5_vl']}/config.json", folder / "config.json")
    with pytest.raises(ValueError, match=f"checkpoint {folder} has a config.json but no model weights .* it holds "
                                         r"\['config.json'\]"):
        main(["eval", "--model", str(folder), "--n", "2"])
