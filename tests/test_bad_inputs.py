"""The bad-input matrix, one case each, through the public trainer (`trainer.train()` or its generation step).

Each case ends in its documented behaviour (docs/troubleshooting.md): an error naming the field and the sample, or
a documented policy with a logged count. Nothing is skipped silently and nothing trains on NaN.
"""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from datasets import Dataset
from trainer_utils import entry, generation_batch, image_blocks, make_trainer, text_dataset, vl_dataset

from opsd_trl.models.adapters import SlotFeatures
from opsd_trl.testing.tiny_models import build_tiny_qwen2_5_vl, build_tiny_text_lm
from opsd_trl.vt_cache import BadImageError, VisionEncoder, VTCacheMismatchError, build_vt_cache


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_no_vt_is_an_error_naming_the_sample(tmp_path):
    model, processor = build_tiny_qwen2_5_vl()
    dataset = vl_dataset(n=2, n_vt=0)
    with pytest.raises(ValueError, match="sample 's0' has no visual thoughts"):
        make_trainer(model, processor, dataset, tmp_path).train()


def test_corrupt_image_bytes_name_the_sample_and_column(tmp_path):
    model, processor = build_tiny_qwen2_5_vl()
    rows = vl_dataset(n=2).to_list()
    good = _png_bytes(vl_dataset(n=1)[0]["vt_images"][0])
    for row in rows:
        row["images"] = [{"bytes": _png_bytes(vl_dataset(n=1)[0]["images"][0]), "path": None}]
        row["vt_images"] = [{"bytes": good, "path": None}]
    rows[1]["vt_images"] = [{"bytes": good[: len(good) // 3], "path": None}]  # truncated PNG
    dataset = Dataset.from_list(rows, features=vl_dataset(n=1).features)
    with pytest.raises(BadImageError, match="sample 's1', column 'vt_images': unreadable image"):
        make_trainer(model, processor, dataset, tmp_path, max_steps=1).train()


def test_vt_id_absent_from_the_cache(tmp_path):
    model, tok = build_tiny_text_lm()
    cache = {"t0": entry([SlotFeatures(torch.randn(3, 64), None, None)])}  # t0 cached with one VT, t1 absent
    with pytest.raises(KeyError, match="sample 't1' is not in the VT cache"):
        make_trainer(model, tok, text_dataset(n=2), tmp_path, vt_cache=cache).train()


def test_cache_built_for_another_model_is_refused_naming_the_field(tmp_path):
    other, processor = build_tiny_qwen2_5_vl(seed=1)
    dataset = vl_dataset(n=2)
    cache_dir = build_vt_cache(dataset, VisionEncoder(other, processor), tmp_path / "cache", progress=False)
    model, processor = build_tiny_qwen2_5_vl(seed=0)
    model.model.visual.requires_grad_(False)
    with pytest.raises(VTCacheMismatchError, match="vision_weights_sha256"):
        make_trainer(model, processor, dataset, tmp_path, vt_cache_dir=str(cache_dir))


def test_more_vts_than_allowed_are_truncated_and_counted(tmp_path):
    model, processor = build_tiny_qwen2_5_vl()
    dataset = vl_dataset(n=2, n_vt=3)
    trainer = make_trainer(model, processor, dataset, tmp_path, max_vt_images=2, max_steps=1)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "vt/truncated" in h]
    assert logged and logged[0]["vt/truncated"] == 2  # both samples
    assert logged[0]["vt/images_per_sample"] == 2
    batch = generation_batch(trainer, dataset)
    assert [image_blocks(processor, ids) for ids in batch["teacher_prompt_ids"]] == [3, 3]  # problem image + 2 VTs


def test_prompt_longer_than_the_limit_names_the_sample(tmp_path):
    model, tok = build_tiny_text_lm()
    rows = text_dataset(n=2).to_list()
    rows[1]["prompt"] = [{"role": "user", "content": "x" * 200}]
    with pytest.raises(ValueError, match="sample 't1': student prompt has .* > max_prompt_length=64"):
        make_trainer(model, tok, Dataset.from_list(rows), tmp_path, max_prompt_length=64).train()


def test_empty_completion_contributes_nothing_and_is_never_nan(tmp_path, monkeypatch):
    model, tok = build_tiny_text_lm()
    dataset = text_dataset(n=2)
    trainer = make_trainer(model, tok, dataset, tmp_path)
    monkeypatch.setattr(trainer.generator, "_sample", lambda prompts, images, n: [[] for _ in prompts])  # no tokens
    batch = generation_batch(trainer, dataset)
    assert batch["completion_mask"].sum() == 0
    loss = trainer.compute_loss(trainer.model, batch)
    assert loss.item() == 0.0
    loss.backward()  # connected zero: every rank can still run backward


def test_completion_without_eos_is_trained_and_counted(tmp_path):
    model, tok = build_tiny_text_lm()
    dataset = text_dataset(n=2)
    # A 3-token budget on a random model: completions end without EOS.
    trainer = make_trainer(model, tok, dataset, tmp_path, max_completion_length=3)
    batch = generation_batch(trainer, dataset)
    assert batch["completion_mask"].sum() == 6
    assert trainer._metrics["train"]["completions/eos_rate"] == [0.0]  # of the sampled completions
    assert trainer._metrics["train"]["completions/clipped_ratio"] == [1.0]
    # Closed as the reference closes them: the last sampled token gives way to <|im_end|>, which is scored.
    assert batch["completion_ids"][:, -1].tolist() == [tok.convert_tokens_to_ids("<|im_end|>")] * 2
    assert trainer.compute_loss(trainer.model, batch) > 0
    unclosed = make_trainer(model, tok, dataset, tmp_path, max_completion_length=3, close_truncated_completions=False)
    torch.manual_seed(0)
    kept = generation_batch(unclosed, dataset)
    assert kept["completion_mask"].sum() == 6 and not (kept["completion_ids"][:, -1] == tok.eos_token_id).any()


@pytest.mark.parametrize("loss_type", ["gjsd", "sampled_reverse_kl"])
def test_the_closing_token_changes_only_the_sampled_loss(loss_type, tmp_path):
    """Why `close_truncated_completions` draws the ignored-options warning under `loss_type='gjsd'`: the divergence
    at a position compares the two distributions there and does not read the token in it, and the closing token is
    the last one, read by no later position. The sampled-token loss reads it."""
    model, tok = build_tiny_text_lm()
    dataset = text_dataset(n=2)
    with pytest.warns(UserWarning) if loss_type == "gjsd" else contextlib.nullcontext():
        trainer = make_trainer(model, tok, dataset, tmp_path, max_completion_length=3, loss_type=loss_type,
                               teacher_mode="self", close_truncated_completions=False)
    batch = generation_batch(trainer, dataset)
    closed = {**batch, "completion_ids": batch["completion_ids"].clone()}
    closed["completion_ids"][:, -1] = tok.convert_tokens_to_ids("<|im_end|>")
    assert not torch.equal(closed["completion_ids"], batch["completion_ids"])
    with torch.no_grad():
        same = trainer.compute_loss(trainer.model, batch) == trainer.compute_loss(trainer.model, closed)
    assert bool(same) == (loss_type == "gjsd")


def test_non_finite_logits_raise_with_step_and_sample_ids(tmp_path):
    model, tok = build_tiny_text_lm()
    dataset = text_dataset(n=2)
    trainer = make_trainer(model, tok, dataset, tmp_path, teacher_mode="self")
    batch = generation_batch(trainer, dataset)
    with torch.no_grad():
        trainer.model.model.norm.weight[0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 0 for samples \['t\d', 't\d'\]"):
        trainer.compute_loss(trainer.model, batch)


def test_batch_mixing_vt_counts(tmp_path):
    model, processor = build_tiny_qwen2_5_vl()
    rows = vl_dataset(n=2, n_vt=3).to_list()
    rows[0]["vt_images"] = rows[0]["vt_images"][:1]
    dataset = Dataset.from_list(rows, features=vl_dataset(n=1).features)
    trainer = make_trainer(model, processor, dataset, tmp_path)
    batch = generation_batch(trainer, dataset)
    blocks = {sid: image_blocks(processor, ids)
              for sid, ids in zip(batch["sample_ids"], batch["teacher_prompt_ids"], strict=True)}
    assert blocks == {"s0": 2, "s1": 4}  # problem image + 1 VT, problem image + 3 VTs
    assert torch.isfinite(trainer.compute_loss(trainer.model, batch))


PROMPT_CASES = {
    "plain string": ("Which way?", "prompt must be a list of chat messages"),
    "empty string": ("", "prompt must be a list of chat messages"),
    "empty list": ([], "prompt must be a list of chat messages"),
    "no user turn": ([{"role": "system", "content": "Be brief."}], "the prompt has no user message"),
    "message without role": ([{"content": "Which way?"}], "prompt message 0 is not a chat message"),
    "missing column": (None, "has no prompt column"),
}


@pytest.mark.parametrize("family", ["text_lm", "qwen2_5_vl"])
@pytest.mark.parametrize("case", list(PROMPT_CASES))
def test_malformed_prompt_names_the_sample_and_the_format(tmp_path, family, case):
    prompt, message = PROMPT_CASES[case]
    if family == "text_lm":
        (model, processing_class), rows, sid = build_tiny_text_lm(), text_dataset(n=2).to_list(), "t0"
    else:
        (model, processing_class), rows, sid = build_tiny_qwen2_5_vl(), vl_dataset(n=2).to_list(), "s0"
    for row in rows:
        if case == "missing column":
            del row["prompt"]
        else:
            row["prompt"] = prompt
    with pytest.raises(ValueError, match=f"sample '{sid}'.*{message}"):
        make_trainer(model, processing_class, Dataset.from_list(rows), tmp_path, max_steps=1).train()


def test_cached_sample_without_vts_is_an_error_as_without_a_cache(tmp_path):
    model, processor = build_tiny_qwen2_5_vl()
    model.model.visual.requires_grad_(False)
    rows = vl_dataset(n=2).to_list()
    rows[1]["vt_images"] = []
    dataset = Dataset.from_list(rows, features=vl_dataset(n=1).features)
    cache_dir = build_vt_cache(dataset, VisionEncoder(model, processor), tmp_path / "cache", progress=False)
    with pytest.raises(ValueError, match="sample 's1' is in the VT cache .* with no visual thoughts"):
        make_trainer(model, processor, dataset, tmp_path, vt_cache_dir=str(cache_dir), max_steps=1).train()
    with pytest.raises(ValueError, match="sample 's1' has no visual thoughts"):  # the same row, no cache
        make_trainer(model, processor, dataset, tmp_path, max_steps=1).train()
    # the policy: with on_missing_vt='no_vt_teacher' it trains, the teacher of s1 gets no VTs
    make_trainer(model, processor, dataset, tmp_path, vt_cache_dir=str(cache_dir), max_steps=1,
                 on_missing_vt="no_vt_teacher").train()


def test_vlm_sample_with_only_vt_text_has_no_visual_thoughts(tmp_path):
    # A vision-language teacher reads VTs from vt_images (or the cache), never from vt_text.
    model, processor = build_tiny_qwen2_5_vl()
    rows = [{**row, "vt_images": [], "vt_text": "go right"} for row in vl_dataset(n=2).to_list()]
    dataset = Dataset.from_list(rows, features=None)
    with pytest.raises(ValueError, match="sample 's0' has no visual thoughts"):
        make_trainer(model, processor, dataset, tmp_path, max_steps=1).train()
