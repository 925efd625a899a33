"""Shared builders for trainer tests: tiny datasets in the standard layout and a trainer factory."""

from __future__ import annotations

import torch
from datasets import Dataset
from PIL import Image

from opsd_trl import VisualOPSDConfig, VisualOPSDTrainer
from opsd_trl.models.adapters import SlotFeatures
from opsd_trl.models.head import OutputHead
from opsd_trl.teacher_context import teacher_messages
from opsd_trl.vt_cache import VTEntry


def square(color, size=56) -> Image.Image:
    img = Image.new("RGB", (size, size), color)
    # A second colour so that images differ in more than their mean.
    img.paste((255 - color[0], color[1], 128), (0, 0, size // 2, size // 2))
    return img


def vl_dataset(n=4, n_vt=2) -> Dataset:
    rows = []
    for i in range(n):
        rows.append(
            dict(
                id=f"s{i}",
                prompt=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Which way {i}?"}]}],
                images=[square((40 * i % 256, 10, 200))],
                vt_images=[square((10, 30 * (i + k) % 256, 90)) for k in range(n_vt)],
                answer="R",
            )
        )
    return Dataset.from_list(rows)


def text_dataset(n=4) -> Dataset:
    return Dataset.from_list(
        [dict(id=f"t{i}", prompt=[{"role": "user", "content": f"Solve {i}+1."}], vt_text=f"think {i}", answer=str(i))
         for i in range(n)]
    )


def entry(slots: list[SlotFeatures]) -> VTEntry:
    """A `VTEntry` (what a VT cache returns for one id) from per-image features."""
    grids = [s.grid_thw for s in slots]
    deep = [s.deepstack for s in slots]
    return VTEntry(
        embeds=[s.embeds for s in slots],
        grid_thw=torch.stack(grids) if slots and grids[0] is not None else None,
        deepstack=deep if slots and deep[0] is not None else None,
        columns=["vt_images"] * len(slots),
    )


def make_config(tmp_path, **overrides) -> VisualOPSDConfig:
    kwargs = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=2, bf16=False,
        gradient_checkpointing=False, max_completion_length=6, logging_steps=1, report_to=[], learning_rate=1e-3,
        teacher_top_k=16, save_strategy="no", seed=0, disable_tqdm=True, dataloader_pin_memory=False,
    )
    kwargs.update(overrides)
    return VisualOPSDConfig(**kwargs)


def make_trainer(model, processing_class, dataset, tmp_path, peft_config=None, vt_cache=None, **overrides):
    return VisualOPSDTrainer(
        model=model, args=make_config(tmp_path, **overrides), train_dataset=dataset,
        processing_class=processing_class, peft_config=peft_config, vt_cache=vt_cache,
    )


def generation_batch(trainer, dataset):
    """Run the trainer's own generation + teacher-context step on the first batch, as training would."""
    trainer.model.train()
    rows = [dataset[i] for i in range(trainer.args.per_device_train_batch_size)]
    return trainer._generate_and_score_completions(rows)


def image_blocks(processor, ids) -> int:
    """Images in a token sequence: runs of the processor's image placeholder token."""
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return sum(1 for i, t in enumerate(ids) if t == image_token and (i == 0 or ids[i - 1] != image_token))


def completion_logits(trainer, batch, teacher=True) -> torch.Tensor:
    model = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():
        if teacher:
            hidden = trainer._teacher_hidden_states(model, batch)
        else:
            input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
            mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
            mm = {k: batch[k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids") if k in batch}
            hidden = trainer._get_last_hidden_state(model, input_ids, mask, batch["completion_ids"].size(1), **mm)
    return OutputHead.of(model).logits(hidden)


def reference_teacher_logits(model, processor, dataset, batch, args, edit_pixels=None):
    """Full teacher sequences as input_ids + pixel_values through the model's own forward, one sample at a time:
    the processor expands the placeholders and encodes every image (problem + VTs), the model splices and positions
    them itself. An independent construction of what the trainer's teacher pass computes. `edit_pixels(x, enc)`,
    if given, returns the pixel_values to use instead of the processor's."""
    rows = []
    for b, sample_id in enumerate(batch["sample_ids"]):
        x = dataset[[r["id"] for r in dataset].index(sample_id)]
        msgs = teacher_messages(x["prompt"], n_vt=len(x["vt_images"]), intro=args.teacher_intro,
                                transition=args.teacher_transition)
        text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        enc = processor(text=[text], images=[x["images"] + x["vt_images"]], return_tensors="pt")
        comp = batch["completion_ids"][b][batch["completion_mask"][b].bool()]
        ids = torch.cat([enc["input_ids"][0], comp]).unsqueeze(0)
        mm = torch.cat([enc["mm_token_type_ids"][0], torch.zeros_like(comp)]).unsqueeze(0)
        with torch.no_grad():
            pixels = enc["pixel_values"] if edit_pixels is None else edit_pixels(x, enc)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                           image_grid_thw=enc["image_grid_thw"], mm_token_type_ids=mm).logits
        rows.append(logits[0, -len(comp) - 1 : -1])
    return rows
