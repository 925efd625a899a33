"""The noise-VT control: the paper's pixel noise (standard Gaussian pixel tensors encoded by the vision tower,
fresh every step, cached VTs included), the embedding-noise option, and text VTs replaced by random tokens."""

import pytest
import torch
from trainer_utils import (
    completion_logits,
    generation_batch,
    image_blocks,
    make_trainer,
    reference_teacher_logits,
    text_dataset,
    vl_dataset,
)

from opsd_trl.testing.tiny_models import build_tiny_qwen2_5_vl, build_tiny_text_lm
from opsd_trl.vt_cache import VisionEncoder, build_vt_cache

ATOL = 1e-4


def _pixel_noise_reference(model, processor, dataset, batch, args, seed):
    """The model's own forward on each full teacher sequence, with the VT rows of `pixel_values` overwritten by
    `torch.randn` drawn in sample order from `seed`."""
    torch.manual_seed(seed)

    def noise_vt_rows(x, enc):
        n_problem = int(enc["image_grid_thw"][: len(x["images"])].prod(-1).sum())
        pixels = enc["pixel_values"].clone()
        pixels[n_problem:] = torch.randn(pixels.shape[0] - n_problem, pixels.shape[1])
        return pixels

    return reference_teacher_logits(model, processor, dataset, batch, args, edit_pixels=noise_vt_rows)


@pytest.mark.parametrize("source", ["online", "cache"])
def test_pixel_noise_is_the_papers_control(source, tmp_path):
    model, processor = build_tiny_qwen2_5_vl()
    model.model.visual.requires_grad_(False)
    dataset = vl_dataset(n=2, n_vt=2)
    kwargs = {}
    if source == "cache":
        kwargs["vt_cache_dir"] = str(build_vt_cache(dataset, VisionEncoder(model, processor), tmp_path / "cache",
                                                    progress=False))
    trainer = make_trainer(model, processor, dataset, tmp_path, teacher_mode="self", noise_vt=True,
                           max_completion_length=5, **kwargs)
    assert trainer.args.noise_vt_space == "pixels"
    batch = generation_batch(trainer, dataset)
    torch.manual_seed(7)
    ours = completion_logits(trainer, batch)
    model.eval()
    reference = _pixel_noise_reference(model, processor, dataset, batch, trainer.args, seed=7)
    for b, ref_rows in enumerate(reference):
        torch.testing.assert_close(ours[b, : ref_rows.shape[0]], ref_rows, atol=ATOL, rtol=1e-4)
    # Fresh noise every step: another draw gives another teacher.
    assert (completion_logits(trainer, batch) - ours).abs().max() > 1e-4
    # And the real VTs are not what the teacher saw.
    real = make_trainer(model, processor, dataset, tmp_path, teacher_mode="self", max_completion_length=5)
    assert (completion_logits(real, batch) - ours).abs().max() > 1e-3


def test_embedding_noise_keeps_each_images_statistics(tmp_path):
    model, processor = build_tiny_qwen2_5_vl()
    dataset = vl_dataset(n=2, n_vt=2)
    trainer = make_trainer(model, processor, dataset, tmp_path, teacher_mode="self", noise_vt=True,
                           noise_vt_space="embeddings", max_completion_length=5)
    batch = generation_batch(trainer, dataset)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    pixels = batch["vt_pixels"][0]
    real = trainer.adapter.encode_images(unwrapped, pixels["pixel_values"], pixels["image_grid_thw"])
    noised = trainer.teacher_context.vt_features(trainer.adapter, unwrapped, [], pixels, trainer.accelerator.device)
    for r, n in zip(real, noised, strict=True):
        assert n.embeds.shape == r.embeds.shape and not torch.allclose(n.embeds, r.embeds)
        assert abs(n.embeds.mean() - r.embeds.mean()) < 0.2 * r.embeds.std()
        assert abs(n.embeds.std() / r.embeds.std() - 1) < 0.2


def test_text_vts_become_random_tokens_of_the_same_count(tmp_path):
    model, tok = build_tiny_text_lm()
    dataset = text_dataset(n=2)
    plain = make_trainer(model, tok, dataset, tmp_path, teacher_mode="self")
    noised = make_trainer(model, tok, dataset, tmp_path, teacher_mode="self", noise_vt=True)
    batch_plain, batch_noise = generation_batch(plain, dataset), generation_batch(noised, dataset)
    for b, sample_id in enumerate(batch_plain["sample_ids"]):
        x = dataset[[r["id"] for r in dataset].index(sample_id)]
        vt_ids = tok(x["vt_text"], add_special_tokens=False)["input_ids"]
        with_vt, with_noise = batch_plain["teacher_prompt_ids"][b], batch_noise["teacher_prompt_ids"][b]
        assert tok.decode(with_vt).count(x["vt_text"]) == 1
        assert x["vt_text"] not in tok.decode(with_noise)
        # Random ids decoded then re-tokenised with the prompt: about as long as the VT text, never empty.
        assert len(with_vt) - len(vt_ids) < len(with_noise) <= len(with_vt) + 2 * len(vt_ids)
        assert with_noise != with_vt


@pytest.mark.parametrize("source", ["online", "cache"])
def test_fixed_count_noise_shows_every_sample_the_same_number_of_vts(source, tmp_path):
    """`noise_vt_count=3`: samples with 1 and 2 VTs each get 3 noise VTs, so the image count says nothing about the
    sample. Reference: the model's own forward on each sample with its VTs cycled to 3, their pixel rows noised in
    sample order; the eval's noised teacher (`Contexts(noise_vt=True)`) must match it too."""
    from datasets import Dataset

    from opsd_trl.eval import Contexts
    from opsd_trl.eval import completion_logits as eval_logits

    model, processor = build_tiny_qwen2_5_vl()
    model.model.visual.requires_grad_(False)
    rows = list(vl_dataset(n=2, n_vt=2))
    rows[0]["vt_images"] = rows[0]["vt_images"][:1]
    dataset = Dataset.from_list(rows)
    kwargs = {}
    if source == "cache":
        kwargs["vt_cache_dir"] = str(build_vt_cache(dataset, VisionEncoder(model, processor), tmp_path / "cache",
                                                    progress=False))
    trainer = make_trainer(model, processor, dataset, tmp_path, teacher_mode="self", noise_vt=True,
                           noise_vt_count=3, max_completion_length=5, **kwargs)
    batch = generation_batch(trainer, dataset)
    assert [image_blocks(processor, ids) for ids in batch["teacher_prompt_ids"]] == [4, 4]  # problem + 3 VTs
    torch.manual_seed(7)
    ours = completion_logits(trainer, batch)
    model.eval()
    cycled = Dataset.from_list([{**r, "vt_images": [r["vt_images"][k % len(r["vt_images"])] for k in range(3)]}
                                for r in rows])
    reference = _pixel_noise_reference(model, processor, cycled, batch, trainer.args, seed=7)
    for b, ref_rows in enumerate(reference):
        torch.testing.assert_close(ours[b, : ref_rows.shape[0]], ref_rows, atol=ATOL, rtol=1e-4)
    contexts = Contexts(processor, intro=trainer.args.teacher_intro, transition=trainer.args.teacher_transition,
                        noise_vt=True, noise_vt_count=3)
    ordered = [rows[[r["id"] for r in rows].index(i)] for i in batch["sample_ids"]]
    completions = [c[m.bool()].tolist() for c, m in zip(batch["completion_ids"], batch["completion_mask"], strict=True)]
    torch.manual_seed(7)
    theirs, _ = eval_logits(model, contexts, ordered, completions, teacher=True)
    for b, ref_rows in enumerate(reference):
        torch.testing.assert_close(theirs[b, : ref_rows.shape[0]], ref_rows, atol=ATOL, rtol=1e-4)
