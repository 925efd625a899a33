"""Dataset adapters: ThinkMorph columns -> standard layout; ids; loading."""

import io

import datasets
import numpy as np
import pytest
from PIL import Image

from opsd_trl.data import (
    STANDARD_COLUMNS,
    defer_image_decoding,
    ensure_ids,
    load_any,
    numbered_columns,
    standardize,
    thinkmorph_to_standard,
    thinkmorph_vt_columns,
    validate_standard,
)


def image(v: int) -> Image.Image:
    return Image.fromarray(np.full((8, 8, 3), v, dtype=np.uint8))


def thinkmorph_rows(n: int = 3) -> list[dict]:
    return [{"question": f"q{i}", "problem_image": image(i), "reasoning_image_2": image(100 + i),
             "reasoning_image_10": image(200 + i), "reasoning_image_1": None, "answer": i} for i in range(n)]


def test_numbered_columns_sort_numerically():
    names = ["reasoning_image_10", "answer", "reasoning_image_2", "reasoning_image", "reasoning_image_x"]
    assert numbered_columns(names, "reasoning_image") == ["reasoning_image", "reasoning_image_2", "reasoning_image_10"]
    assert thinkmorph_vt_columns(["problem_image_0", "reasoning_image_1"]) == ["reasoning_image_1"]


def test_thinkmorph_row_to_standard():
    row = thinkmorph_to_standard({**thinkmorph_rows(1)[0], "id": "a", "thought": "t"}, text_vt_column="thought")
    assert row["id"] == "a" and row["answer"] == "0" and row["vt_text"] == "t"
    assert [im.getpixel((0, 0))[0] for im in row["vt_images"]] == [100, 200]  # None column dropped, 2 before 10
    assert row["prompt"] == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q0"}]}]
    validate_standard(row)


def test_standardize_dataset_adds_ids_and_validates(tmp_path):
    features = datasets.Features({"question": datasets.Value("string"), "problem_image": datasets.Image(),
                                  "reasoning_image_2": datasets.Image(), "reasoning_image_10": datasets.Image(),
                                  "reasoning_image_1": datasets.Image(), "answer": datasets.Value("int64")})
    ds = datasets.Dataset.from_list(thinkmorph_rows(), features=features)
    assert ensure_ids(ds, "val")["id"] == ["val-0", "val-1", "val-2"]
    assert ensure_ids(ds.add_column("pid", [7, 8, 9]))["id"] == ["7", "8", "9"]
    std = standardize(ds, "thinkmorph", split="val")
    assert set(STANDARD_COLUMNS) <= set(std.column_names)
    row = std[1]
    assert row["id"] == "val-1" and len(row["images"]) == 1 and len(row["vt_images"]) == 2
    validate_standard(row)
    std.save_to_disk(tmp_path / "ds")
    assert load_any(str(tmp_path / "ds"))["id"] == std["id"]
    with pytest.raises(ValueError, match="lacks standard columns"):
        standardize(ds)


def test_validate_standard_counts_image_parts():
    row = {"id": "x", "prompt": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
           "images": [image(0)], "vt_images": [], "answer": "a"}
    with pytest.raises(ValueError, match="'x'.*0 image parts but 1 images"):
        validate_standard(row)


def test_deferred_image_decoding_keeps_bytes_and_maps_a_dict_of_datasets_by_name():
    """The image columns stay stored bytes (the trainer decodes them, naming the sample); an `eval_dataset` given
    as a dict of datasets gets the same, per name."""
    ds = datasets.Dataset.from_list([{"id": "a", "images": [image(1)], "vt_images": [image(2)]}])
    assert isinstance(ds[0]["images"][0], Image.Image)
    deferred = defer_image_decoding({"val": ds, "test": ds})
    assert set(deferred) == {"val", "test"}
    for d in deferred.values():
        row = d[0]
        assert isinstance(row["images"][0], dict) and row["images"][0]["bytes"]
        assert Image.open(io.BytesIO(row["vt_images"][0]["bytes"])).getpixel((0, 0)) == (2, 2, 2)
    assert defer_image_decoding(None) is None
