"""The `thinkmorph` dataset preset: the reference's row selection (data/opsd_paired_dataset.py) on a small synthetic
dataset in the ThinkMorph layout, and its use from a recipe's `dataset_preset`."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
from datasets import Dataset, Features, Image, Value

from opsd_trl.data import DATASET_PRESETS, load_preset, reference_selection
from opsd_trl.testing.tiny_models import build_tiny_qwen2_5_vl
from opsd_trl.train import ScriptArguments, load_train_dataset
from tests.trainer_utils import make_trainer, square

BAD = {"bytes": b"not an image", "path": None}


def png(color) -> dict:
    buf = io.BytesIO()
    square(color, size=28).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def row(i, question="Which way?", answer="R", thought="go right", problem="good", vts=2, bad_vt=False):
    images = {f"reasoning_image_{k}": png((10 * k, 20, 30)) if k < vts else None for k in range(9)}
    if bad_vt:
        images["reasoning_image_0"] = BAD
    return {"pid": str(100 + i), "question": question, "answer": answer,
            "problem_image_0": png((i, 0, 0)) if problem == "good" else BAD if problem == "bad" else None,
            "problem_image_1": png((0, i, 0)),  # never read: the reference reads problem_image_0 only
            "resoning_thought_0": thought, "resoning_thought_1": None, **images}


# Rows 0-6 are read (num_rows 7); the expected outcome of each is the reference's rule named beside it.
ROWS = [
    (row(0), 2),                    # kept, 2 VTs (the 9th VT column, reasoning_image_8, is never set here)
    (row(1, question=""), None),    # empty question: skipped
    (row(2, answer=""), None),      # empty answer: skipped
    (row(3, thought=None), None),   # no thought text: skipped
    (row(4, problem="bad"), None),  # problem image does not decode: skipped
    (row(5, vts=0), 0),             # kept without VTs (teacher: intro + transition)
    (row(6, vts=3, bad_vt=True), 2),  # kept, the undecodable VT dropped
    (row(7), 2),                    # beyond the first 7 rows: not read
]


def thinkmorph_set() -> Dataset:
    features = Features({"pid": Value("string"), "question": Value("string"), "answer": Value("string"),
                         "problem_image_0": Image(), "problem_image_1": Image(),
                         "resoning_thought_0": Value("string"), "resoning_thought_1": Value("string"),
                         **{f"reasoning_image_{k}": Image() for k in range(9)}})
    return Dataset.from_list([r for r, _ in ROWS], features=features)


def test_reference_selection_follows_the_reference_rules():
    selected = reference_selection(thinkmorph_set(), 7, "ThinkMorph/Visual_Search")
    kept = {i: n for i, (_, n) in enumerate(ROWS[:7]) if n is not None}
    assert selected["id"] == [f"Visual_Search-{i}" for i in kept]
    assert [len(v) for v in selected["vt_images"]] == list(kept.values())
    assert [len(v) for v in selected["images"]] == [1] * len(kept)
    assert selected[0]["images"][0]["bytes"] == ROWS[0][0]["problem_image_0"]["bytes"]
    assert selected[2]["vt_images"][0]["bytes"] == ROWS[6][0]["reasoning_image_1"]["bytes"]
    assert selected["prompt"][0] == [{"role": "user", "content": [{"type": "image"},
                                                                  {"type": "text", "text": "Which way?"}]}]


def test_the_preset_is_the_references_four_sets_and_row_counts():
    assert DATASET_PRESETS["thinkmorph"] == {"ThinkMorph/Visual_Search": 6990, "ThinkMorph/Spatial_Navigation": 6000,
                                            "ThinkMorph/Jigsaw_Assembly": 6000, "ThinkMorph/Chart_Refocus": 6000}
    with pytest.raises(ValueError, match="dataset_preset 'thinkmorph' reads 4 sets"):
        load_preset("thinkmorph", sources=["a", "b"])


def test_recipe_preset_reads_local_copies_and_trains(tmp_path):
    folders = []
    for k in range(4):
        folders.append(str(tmp_path / f"set{k}"))
        thinkmorph_set().save_to_disk(folders[-1])
    args = ScriptArguments(dataset_preset="thinkmorph", dataset_name=folders)
    dataset = load_train_dataset(args, SimpleNamespace(seed=0))
    kept = [i for i, (_, n) in enumerate(ROWS) if n is not None]  # every row: the sets are shorter than the counts
    names = [n.split("/")[-1] for n in DATASET_PRESETS["thinkmorph"]]
    assert dataset["id"] == [f"{name}-{i}" for name in names for i in kept]
    model, processor = build_tiny_qwen2_5_vl(seed=0)
    trainer = make_trainer(model, processor, dataset, tmp_path, on_missing_vt="no_vt_teacher",
                           max_completion_length=2, per_device_train_batch_size=2)
    rows = [dataset[1], dataset[2]]  # rows 5 (no VT) and 6 (2 VTs)
    batch = trainer._generate_and_score_completions(rows)
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    starts = [sum(1 for j, t in enumerate(ids) if t == image_token and ids[j - 1] != image_token)
              for ids in batch["teacher_prompt_ids"]]
    assert starts == [1, 3]  # problem image + the VTs that decode


def test_build_vt_cache_with_the_preset_keys_the_trainings_ids(tmp_path):
    from opsd_trl.cli import main as cli_main
    from opsd_trl.vt_cache import VTCache

    folders = []
    for k in range(4):
        folders.append(str(tmp_path / f"set{k}"))
        thinkmorph_set().save_to_disk(folders[-1])
    out = tmp_path / "cache"
    assert cli_main(["build-vt-cache", "--model", "tiny:qwen2_5_vl", "--preset", "thinkmorph", "--preset-sources",
                     *folders, "--output", str(out), "--dtype", "float32", "--device", "cpu", "--no-progress"]) == 0
    dataset = load_preset("thinkmorph", sources=folders)
    cache = VTCache(str(out))
    assert all(sid in cache for sid in dataset["id"])
    assert [cache.num_images(sid) for sid in dataset["id"]] == [len(v) for v in dataset["vt_images"]]
