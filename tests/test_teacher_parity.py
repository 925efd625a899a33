"""The teacher pass (spliced inputs_embeds + explicit positions) equals a plain forward of the full teacher sequence.

The reference builds the teacher sequence independently: the processor expands the image placeholders of the
rendered teacher prompt and encodes *all* images (problem + VTs) itself, and the model's own forward does the
splice and the M-RoPE positions.
"""

import pytest
import torch
from trainer_utils import (
    completion_logits,
    entry,
    generation_batch,
    make_trainer,
    reference_teacher_logits,
    text_dataset,
    vl_dataset,
)

from opsd_trl.models.adapters import SlotFeatures
from opsd_trl.teacher_context import teacher_messages
from opsd_trl.testing.tiny_models import build_tiny_qwen2_5_vl, build_tiny_qwen3_vl, build_tiny_text_lm
from opsd_trl.vt_cache import VisionEncoder, VTCacheError, build_vt_cache

ATOL = 1e-4


@pytest.mark.parametrize("builder", [build_tiny_qwen2_5_vl, build_tiny_qwen3_vl], ids=["qwen2.5-vl", "qwen3-vl"])
def test_vl_teacher_matches_full_forward(builder, tmp_path):
    model, processor = builder()
    dataset = vl_dataset(n=2, n_vt=2)
    trainer = make_trainer(model, processor, dataset, tmp_path, teacher_mode="self", max_completion_length=5)
    batch = generation_batch(trainer, dataset)
    ours = completion_logits(trainer, batch)
    model.eval()
    ref = reference_teacher_logits(model, processor, dataset, batch, trainer.args)
    for b, ref_rows in enumerate(ref):
        n = ref_rows.shape[0]
        torch.testing.assert_close(ours[b, :n], ref_rows, atol=ATOL, rtol=1e-4)
    # The privileged context must matter, or the comparison proves little.
    student = completion_logits(trainer, batch, teacher=False)
    assert (student - ours).abs().max() > 1e-3


@pytest.mark.parametrize("builder", [build_tiny_qwen2_5_vl, build_tiny_qwen3_vl], ids=["qwen2.5-vl", "qwen3-vl"])
def test_vl_cached_features_equal_online(builder, tmp_path):
    """VT features from a real VT cache folder give the same teacher logits as encoding the VT images online."""
    model, processor = builder()
    dataset = vl_dataset(n=2, n_vt=2)
    online = make_trainer(model, processor, dataset, tmp_path, teacher_mode="self")
    batch = generation_batch(online, dataset)
    logits_online = completion_logits(online, batch)
    cache_dir = build_vt_cache(dataset, VisionEncoder(model, processor), tmp_path / "cache", progress=False)
    with pytest.raises(VTCacheError, match="trainable"):  # a training vision tower makes the cache stale
        make_trainer(model, processor, dataset, tmp_path, vt_cache_dir=str(cache_dir))
    model.model.visual.requires_grad_(False)
    cached = make_trainer(model, processor, dataset, tmp_path, teacher_mode="self", vt_cache_dir=str(cache_dir))
    assert cached.args.vt_source == "cache"
    for key in ("vt_slots", "vt_pixels", "teacher_prompt_ids", "teacher_slot_mask"):
        batch.pop(key)
    rows = [dataset[i] for i in range(2)]
    ordered = [rows[[r["id"] for r in rows].index(s)] for s in batch["sample_ids"]]
    output = {"num_images": batch.get("num_images"), "image_grid_thw": batch.get("image_grid_thw"),
              "prompt_mask": batch["prompt_mask"]}
    batch.update(cached._teacher_batch(ordered, output))
    assert all(p is None for p in batch["vt_pixels"])
    torch.testing.assert_close(completion_logits(cached, batch), logits_online, atol=ATOL, rtol=1e-4)


def test_text_lm_soft_prefix_matches_token_forward(tmp_path):
    """Text LM: VT embeddings that are the embeddings of known tokens reproduce a forward over those tokens."""
    model, tok = build_tiny_text_lm()
    dataset = text_dataset(n=2)
    vt_token_ids = {x["id"]: tok(f"<{x['vt_text']}>", add_special_tokens=False)["input_ids"] for x in dataset}
    emb = model.get_input_embeddings().weight.detach()
    cache = {k: entry([SlotFeatures(emb[torch.tensor(v)].clone())]) for k, v in vt_token_ids.items()}
    trainer = make_trainer(model, tok, dataset, tmp_path, teacher_mode="self", vt_cache=cache)
    batch = generation_batch(trainer, dataset)
    ours = completion_logits(trainer, batch)
    model.eval()
    for b, sample_id in enumerate(batch["sample_ids"]):
        prompt = list(batch["teacher_prompt_ids"][b])
        mask = batch["teacher_slot_mask"][b]
        slot_positions = [i for i, m in enumerate(mask) if m]
        for pos, tid in zip(slot_positions, vt_token_ids[sample_id], strict=True):
            prompt[pos] = tid
        comp = batch["completion_ids"][b][batch["completion_mask"][b].bool()]
        ids = torch.cat([torch.tensor(prompt), comp]).unsqueeze(0)
        with torch.no_grad():
            ref = model(input_ids=ids).logits[0, -len(comp) - 1 : -1]
        torch.testing.assert_close(ours[b, : len(comp)], ref, atol=ATOL, rtol=1e-4)


def test_text_lm_vt_text_in_teacher_prompt(tmp_path):
    model, tok = build_tiny_text_lm()
    dataset = text_dataset(n=2)
    trainer = make_trainer(model, tok, dataset, tmp_path, teacher_mode="self")
    batch = generation_batch(trainer, dataset)
    for b, sample_id in enumerate(batch["sample_ids"]):
        text = tok.decode(batch["teacher_prompt_ids"][b])
        assert f"think {sample_id[1:]}" in text and trainer.args.teacher_intro in text
        assert not any(batch["teacher_slot_mask"][b])


@pytest.mark.parametrize("builder", [build_tiny_qwen2_5_vl, build_tiny_text_lm], ids=["qwen2.5-vl", "text-lm"])
def test_eval_renders_the_trainers_teacher_and_student_prompts(builder, tmp_path):
    """`opsd_trl.eval.Contexts` and the trainer build the teacher context with one builder: the same ids and slot
    mask for a VLM (VT images) and a text LM (`vt_text`); eval's student prompt is TRL's."""
    from opsd_trl.eval import Contexts

    model, processing_class = builder()
    vlm = builder is build_tiny_qwen2_5_vl
    dataset = vl_dataset(n=2, n_vt=3) if vlm else text_dataset(n=2)
    trainer = make_trainer(model, processing_class, dataset, tmp_path, teacher_mode="self", max_vt_images=2,
                           teacher_intro="Look:", teacher_transition="Now answer.")
    batch = generation_batch(trainer, dataset)
    contexts = Contexts(processing_class, intro="Look:", transition="Now answer.", max_vt_images=2)
    for b, sample_id in enumerate(batch["sample_ids"]):
        row = dataset[list(dataset["id"]).index(sample_id)]
        for teacher in (True, False):
            grid = contexts.pixels(contexts.images(row, teacher)).get("image_grid_thw")
            ids, slots = contexts.prompt_ids(row, teacher, grid)
            if teacher:
                assert (ids, slots) == (batch["teacher_prompt_ids"][b], batch["teacher_slot_mask"][b])
            else:
                assert ids == batch["prompt_ids"][b][batch["prompt_mask"][b].bool()].tolist()


def test_eval_text_lm_teacher_logits_match_a_plain_forward():
    from opsd_trl.eval import Contexts
    from opsd_trl.eval import completion_logits as eval_logits

    model, tok = build_tiny_text_lm()
    rows = list(text_dataset(n=2))
    contexts = Contexts(tok, intro="Look:", transition="Now answer.")
    completions = [[5, 6, 7], [8]]
    logits, mask = eval_logits(model, contexts, rows, completions, teacher=True)
    assert mask.tolist() == [[True] * 3, [True, False, False]]
    for b, (row, comp) in enumerate(zip(rows, completions, strict=True)):
        text = tok.apply_chat_template(teacher_messages(row["prompt"], n_vt=0, intro="Look:", transition="Now answer.",
                                                        vt_text=row["vt_text"], as_images=False),
                                       tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"] + comp])
        with torch.no_grad():
            ref = model(input_ids=ids).logits[0, -len(comp) - 1 : -1]
        torch.testing.assert_close(logits[b, : len(comp)], ref, atol=ATOL, rtol=1e-4)
