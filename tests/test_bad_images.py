"""Images and ids that used to give a silent wrong result or a raw message, through the trainer and the CLI.

A VT cache refuses VTs that are not those it was built from; 16-bit and float images are scaled, not clipped; an
unusable image (mode, size, aspect ratio, None) is refused before any step naming sample, column and why, and
`build-vt-cache --skip-bad` skips it; duplicate ids, image-marker text in a prompt and bad `image_processor_kwargs`
are clear errors before any step.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from trainer_utils import generation_batch, make_trainer, square, vl_dataset

from opsd_trl.images import BadImageError, decode_image
from opsd_trl.testing.tiny_models import build_tiny_qwen2_5_vl
from opsd_trl.vt_cache import VisionEncoder, VTCache, VTCacheMismatchError, build_vt_cache


@pytest.fixture(scope="module")
def qwen25():
    model, processor = build_tiny_qwen2_5_vl(seed=0)
    model.model.visual.requires_grad_(False)  # as the trainer needs with a cache
    return model, processor


def _cache(dataset, qwen25, out, **kw):
    return str(build_vt_cache(dataset, VisionEncoder(*qwen25), out, progress=False, **kw))


def _with_vts(dataset, change) -> datasets.Dataset:
    rows = dataset.to_list()
    for row in rows:
        row["vt_images"] = change(row["vt_images"])
    return datasets.Dataset.from_list(rows, features=dataset.features)


# ------------------------------------------------------------------------------------------------ stale VT cache
@pytest.mark.parametrize("change,message", [
    (lambda vts: [square((200, 200, 10)) for _ in vts], "not those the VT cache .* was built from"),  # new pixels
    (lambda vts: vts[::-1], "not those the VT cache .* was built from"),  # same images, other order
    (lambda vts: vts[:1], "gives 1 visual-thought image.*built from 2"),  # one fewer
])
def test_cache_refuses_vts_changed_after_the_build(tmp_path, qwen25, change, message):
    dataset = vl_dataset(n=2, n_vt=2)
    cache_dir = _cache(dataset, qwen25, tmp_path / "cache")
    changed = _with_vts(dataset, change)
    trainer = make_trainer(*qwen25, changed, tmp_path, vt_cache_dir=cache_dir, max_steps=1)
    with pytest.raises(VTCacheMismatchError, match=f"sample 's[01]': .*{message}.*opsd-trl build-vt-cache"):
        trainer.train()


def test_cache_of_the_same_vts_trains(tmp_path, qwen25):
    dataset = vl_dataset(n=2, n_vt=2)
    cache_dir = _cache(dataset, qwen25, tmp_path / "cache")
    make_trainer(*qwen25, dataset, tmp_path, vt_cache_dir=cache_dir, max_steps=1).train()


def test_cache_refuses_reordered_problem_images(tmp_path, qwen25):
    rows = vl_dataset(n=2, n_vt=1).to_list()
    for i, row in enumerate(rows):
        row["images"] = [square((30 * i, 10, 200)), square((200, 30 * i, 10))]
        row["prompt"][0]["content"] = [{"type": "image"}, *row["prompt"][0]["content"]]
    dataset = datasets.Dataset.from_list(rows)
    cache_dir = _cache(dataset, qwen25, tmp_path / "cache", problem_columns=["images"])
    for row in rows:
        row["images"] = row["images"][::-1]
    trainer = make_trainer(*qwen25, datasets.Dataset.from_list(rows), tmp_path, vt_cache_dir=cache_dir, max_steps=1)
    with pytest.raises(VTCacheMismatchError, match="sample 's0': the VT cache's problem-image features"):
        trainer.train()


# ------------------------------------------------------------------------------------------------ image modes
def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _gray16() -> tuple[Image.Image, Image.Image]:
    """A 16-bit grayscale ramp (PNG round trip, as a dataset stores it) and its 8-bit equivalent (v * 255 / 65535)."""
    values = np.linspace(0, 65535, 56 * 56).reshape(56, 56).astype(np.uint16)
    image16 = Image.open(io.BytesIO(_png(Image.fromarray(values))))
    assert image16.mode.startswith("I;16")
    eight = np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    return image16, Image.fromarray(eight).convert("RGB")


def test_16_bit_vt_is_scaled_in_training_and_in_the_cache(tmp_path, qwen25):
    image16, reference = _gray16()
    rows = vl_dataset(n=2, n_vt=1).to_list()
    for row in rows:
        row["vt_images"] = [{"bytes": _png(image16), "path": None}]
    features = vl_dataset(n=1).features
    dataset = datasets.Dataset.from_list(rows, features=features)
    expected = qwen25[1].image_processor(images=[reference], return_tensors="pt")["pixel_values"]
    # Training (online VTs): the teacher's VT pixels are the 8-bit equivalent's, not a white image.
    batch = generation_batch(make_trainer(*qwen25, dataset, tmp_path), dataset)
    torch.testing.assert_close(batch["vt_pixels"][0]["pixel_values"], expected, rtol=0, atol=0)
    # Cache: the same features as the 8-bit equivalent's.
    cached = VTCache(_cache(dataset, qwen25, tmp_path / "cache"))["s0"].embeds[0]
    direct = VisionEncoder(*qwen25).encode([reference])[0].embeds
    torch.testing.assert_close(cached, direct, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["I", "F"])
def test_32_bit_images_are_scaled_by_their_range(mode):
    values = np.linspace(1000, 5000, 16 * 16).reshape(16, 16)
    image = Image.fromarray(values.astype(np.int32 if mode == "I" else np.float32))
    assert image.mode == mode
    got = np.asarray(decode_image(image, "x", "vt_images"))[..., 0]
    expected = np.rint((values - 1000) * 255 / 4000).astype(np.uint8)
    assert np.abs(got.astype(int) - expected).max() <= 1 and got.min() == 0 and got.max() == 255


@pytest.mark.parametrize("mode", ["1", "L", "P", "CMYK", "YCbCr"])
def test_modes_pil_converts_faithfully_give_pils_rgb(mode):
    source = square((200, 40, 90)).convert(mode)
    decoded = decode_image(source, "x", "c")
    assert decoded.mode == "RGB" and decoded.tobytes() == source.convert("RGB").tobytes()


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_is_left_to_the_models_processor(mode, qwen25):
    """A transparent VT keeps its alpha: BAGEL's processor composites it on white (as BAGEL does), Qwen-VL's drops it
    (as transformers does); decoding to RGB first made BAGEL's transparent pixels black."""
    from opsd_trl.models.bagel.processing_bagel import to_rgb as bagel_rgb

    source = Image.new("RGBA", (56, 56), (0, 0, 0, 0))
    source.paste((200, 40, 90, 255), (0, 0, 28, 28))
    source = source.convert(mode)
    decoded = decode_image(source, "x", "c")
    assert bagel_rgb(decoded).getpixel((50, 50)) == (255, 255, 255)
    qwen = qwen25[1].image_processor
    torch.testing.assert_close(qwen(images=[decoded], return_tensors="pt")["pixel_values"],
                               qwen(images=[source.convert("RGB")], return_tensors="pt")["pixel_values"], rtol=0, atol=0)


def test_empty_image_is_refused():
    with pytest.raises(BadImageError, match="sample 'x', column 'images': image of size 0x0 has no pixels"):
        decode_image(Image.new("RGB", (0, 0)), "x", "images")


def test_thinkmorph_layout_keeps_the_stored_jpeg_bytes():
    """Standardising a ThinkMorph dataset moves the stored bytes (decoding and re-saving a JPEG changed its pixels,
    which then matched neither the source nor a cache built from it)."""
    from opsd_trl.data import standardize

    buf = io.BytesIO()
    square((200, 40, 90)).save(buf, format="JPEG")
    jpeg = {"bytes": buf.getvalue(), "path": None}
    features = datasets.Features({"question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "problem_image": datasets.Image(), "reasoning_image_1": datasets.Image()})
    raw = datasets.Dataset.from_dict({"question": ["q"], "answer": ["a"], "problem_image": [jpeg],
                                      "reasoning_image_1": [jpeg]}, features=features)
    raw_lists = datasets.List(datasets.Image(decode=False))
    row = standardize(raw, "thinkmorph").cast_column("images", raw_lists).cast_column("vt_images", raw_lists)[0]
    assert row["images"][0]["bytes"] == jpeg["bytes"] and row["vt_images"][0]["bytes"] == jpeg["bytes"]


def test_unsupported_mode_is_refused_by_name():
    with pytest.raises(BadImageError, match=r"sample 'x', column 'vt_images': image mode 'HSV' has no faithful"):
        decode_image(square((1, 2, 3)).convert("HSV"), "x", "vt_images")


# ------------------------------------------------------------------------------------------------ unusable images
@pytest.mark.parametrize("column,value,message", [
    ("vt_images", Image.new("RGB", (300, 1)), "image of size 300x1 has an aspect ratio over 200"),
    ("images", Image.new("RGB", (1, 300)), "image of size 1x300 has an aspect ratio over 200"),
    ("vt_images", None, "an entry is None, not an image"),
    ("vt_images", "LAB", "image mode 'LAB' has no faithful conversion"),
    ("images", {"bytes": b"not an image", "path": None}, "unreadable image"),
])
def test_unusable_image_is_refused_before_any_step(tmp_path, qwen25, column, value, message):
    if value == "LAB":  # stored as TIFF bytes (a datasets Image column cannot encode a PIL LAB image itself)
        buf = io.BytesIO()
        square((1, 2, 3)).convert("LAB").save(buf, format="TIFF")
        value = {"bytes": buf.getvalue(), "path": None}
    rows = vl_dataset(n=3).to_list()
    rows[1][column] = [value] + rows[1][column][1:]
    dataset = datasets.Dataset.from_list(rows, features=vl_dataset(n=1).features)
    with pytest.raises(BadImageError, match=f"1 image.* of the training data .*sample 's1', column '{column}': "
                                            f"{message}"):
        make_trainer(*qwen25, dataset, tmp_path)


def test_tiny_image_trains(tmp_path, qwen25):
    rows = vl_dataset(n=2).to_list()
    rows[1]["vt_images"][0] = Image.new("RGB", (1, 1), (200, 0, 0))
    make_trainer(*qwen25, datasets.Dataset.from_list(rows), tmp_path, max_steps=1).train()


def test_cli_build_names_a_thin_vt_and_skip_bad_skips_it(tmp_path, qwen25, capsys):
    from opsd_trl.cli import main
    from opsd_trl.testing.tiny_models import save_tiny

    save_tiny(*qwen25, tmp_path / "model")
    rows = vl_dataset(n=3).to_list()
    rows[1]["vt_images"][1] = Image.new("RGB", (300, 1))
    datasets.Dataset.from_list(rows, features=vl_dataset(n=1).features).save_to_disk(tmp_path / "ds")
    args = ["build-vt-cache", "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "ds"), "--dtype",
            "float32", "--no-progress"]
    with pytest.raises(BadImageError, match="sample 's1', column 'vt_images': image of size 300x1"):
        main([*args, "--output", str(tmp_path / "c1")])
    assert main([*args, "--output", str(tmp_path / "c2"), "--skip-bad"]) == 0
    assert "1 sample(s) skipped" in capsys.readouterr().out
    cache = VTCache(tmp_path / "c2")
    assert sorted(cache.ids()) == ["s0", "s2"] and cache.manifest["num_skipped"] == 1


# ------------------------------------------------------------------------------------------------ ids and prompts
def test_duplicate_ids_are_one_error_with_or_without_a_cache(tmp_path, qwen25):
    dataset = vl_dataset(n=3)
    cache_dir = _cache(dataset, qwen25, tmp_path / "cache")
    rows = dataset.to_list()
    rows[2]["id"] = "s0"
    duplicated = datasets.Dataset.from_list(rows, features=dataset.features)
    for extra in ({}, {"vt_cache_dir": cache_dir}):
        with pytest.raises(ValueError, match=r"duplicate sample ids in training data: \['s0'\]"):
            make_trainer(*qwen25, duplicated, tmp_path, **extra)


@pytest.mark.parametrize("marker", ["<|image_pad|>", "<|vision_start|>"])
def test_image_marker_text_in_a_prompt_names_the_sample(tmp_path, qwen25, marker):
    rows = vl_dataset(n=2).to_list()
    rows[1]["prompt"][0]["content"][1]["text"] = f"look {marker} here"
    trainer = make_trainer(*qwen25, datasets.Dataset.from_list(rows), tmp_path, max_steps=1)
    with pytest.raises(ValueError, match=r"sample 's1': the prompt text contains \['" + re.escape(marker)):
        trainer.train()


def test_the_image_skip_marker_and_the_reference_system_prompt_are_prompt_text():
    """`<image_start>` is text a policy writes (BAGEL's tiny tokenizer has it as an added token): the reference's
    system prompt names it, so it must not be refused as an image slot; the processor's image token still is."""
    from opsd_trl.config import VLM_THINK_SYSTEM_PROMPT
    from opsd_trl.data import check_prompt_text, multimodal_tokens
    from opsd_trl.markers import IMAGE_SKIP_MARKER
    from opsd_trl.testing.tiny_bagel import build_tiny_bagel

    _, processor = build_tiny_bagel()
    reserved = multimodal_tokens(processor)
    assert IMAGE_SKIP_MARKER in processor.tokenizer.get_added_vocab()  # the case the name rule alone would refuse
    assert IMAGE_SKIP_MARKER not in reserved and processor.image_token in reserved
    check_prompt_text({"id": "s0", "prompt": [{"role": "system", "content": VLM_THINK_SYSTEM_PROMPT}]}, reserved)
    with pytest.raises(ValueError, match="sample 's1': the prompt text contains"):
        check_prompt_text({"id": "s1", "prompt": [{"role": "user", "content": f"a {processor.image_token}"}]},
                          reserved)


# ------------------------------------------------------------------------------------------------ image_processor_kwargs
@pytest.mark.parametrize("value,message", [
    ("notjson", "image_processor_kwargs must be a JSON object of image-processor settings"),
    ("[1,2]", r"image_processor_kwargs must be a JSON object \(setting: value\), got \[1, 2\]"),
])
def test_image_processor_kwargs_that_are_not_an_object(value, message):
    from opsd_trl.train import parse_args

    with pytest.raises(ValueError, match=message):
        parse_args(["--model_name_or_path", "tiny:quickstart", "--task", "maze", "--image_processor_kwargs", value])


@pytest.mark.parametrize("value,field", [('{"patch_size": 0}', "patch_size"), ('{"size": "big"}', "size")])
def test_image_processor_kwargs_that_break_the_processor_name_the_field(tmp_path, tiny_model_dirs, value, field):
    from opsd_trl.cli import main

    recipe = str(Path(__file__).resolve().parents[1] / "recipes/cpu_quickstart.yaml")
    with pytest.raises(ValueError, match=f"image_processor_kwargs {{'{field}': .*}} break .*default: {{'{field}'"):
        main(["train", "--config", recipe, "--model_name_or_path", tiny_model_dirs["qwen2_5_vl"], "--init_weights",
              "none", "--task_n_train", "4", "--max_steps", "1", "--output_dir", str(tmp_path / "out"),
              "--image_processor_kwargs", value])


def test_qwen_vl_pixel_limits_as_troubleshooting_advises(qwen25):
    """docs/troubleshooting.md: Qwen-VL's pixel limits are `size` = {shortest_edge, longest_edge}; this transformers
    has no `min_pixels` / `max_pixels` attributes."""
    import copy

    from opsd_trl.models.loading import apply_image_processor_kwargs

    processor = copy.deepcopy(qwen25[1])
    with pytest.raises(ValueError, match=r"\['max_pixels'\] are not settings"):
        apply_image_processor_kwargs(processor, {"max_pixels": 50176})
    apply_image_processor_kwargs(processor, {"size": {"shortest_edge": 3136, "longest_edge": 50176}})
    grid = processor.image_processor(images=[Image.new("RGB", (1000, 1000))], return_tensors="pt")["image_grid_thw"]
    patch = processor.image_processor.patch_size
    assert int(grid.prod()) * patch * patch <= 50176


def test_eval_decodes_images_as_training_does(qwen25):
    """`opsd-trl eval` / sweeps render contexts with `opsd_trl.eval.Contexts`: a 16-bit VT is scaled there too."""
    from opsd_trl.eval import Contexts

    image16, reference = _gray16()
    row = {"id": "e0", "images": [square((1, 2, 3))], "vt_images": [image16]}
    images = Contexts(qwen25[1]).images(row, teacher=True)
    assert images[1].tobytes() == reference.tobytes()
