"""The reference's options: its context layout, pinned literally (the system prompt in both contexts, the teacher
texts each in its own `<|im_start|>...<|im_end|>` block with `teacher_text_layout="blocks"`, or today's one-turn
layout), and the EMA teacher's start from a release folder's `ema.safetensors`."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from datasets import Dataset

from opsd_trl.config import TEACHER_INTRO, TEACHER_TRANSITION, VLM_THINK_SYSTEM_PROMPT
from opsd_trl.models.loading import load_pretrained
from opsd_trl.teacher_context import TeacherContext
from opsd_trl.testing.tiny_bagel import build_tiny_bagel, save_bagel_release
from opsd_trl.testing.tiny_models import build_tiny_qwen2_5_vl
from tests.trainer_utils import generation_batch, make_trainer, vl_dataset

INTRO, TRANSITION, SYS = "INTRO.", "TRANSITION.", "SYS."
IMG = "<|vision_start|><|image_pad|><|vision_end|>"  # one image, its placeholder run collapsed


def _rendered(processor, ids) -> str:
    text = processor.tokenizer.decode(ids, skip_special_tokens=False)
    return re.sub(r"(<\|image_pad\|>)+", "<|image_pad|>", text)


def _contexts(tmp_path, **overrides):
    """The trainer's own student and teacher prompts of sample s0 (2 VTs), rendered back to text."""
    model, processor = build_tiny_qwen2_5_vl(seed=0)
    data = vl_dataset(n=2, n_vt=2)
    trainer = make_trainer(model, processor, data, tmp_path, teacher_intro=INTRO, teacher_transition=TRANSITION,
                           max_completion_length=2, **overrides)
    batch = generation_batch(trainer, data)
    i = batch["sample_ids"].index("s0")
    student = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()].tolist()
    return _rendered(processor, student), _rendered(processor, batch["teacher_prompt_ids"][i])


def test_blocks_layout_and_system_prompt_render_as_the_reference(tmp_path):
    student, teacher = _contexts(tmp_path, teacher_text_layout="blocks", system_prompt=SYS)
    system = f"<|im_start|>system\n{SYS}<|im_end|>\n"
    question = f"<|im_start|>user\n{IMG}Which way 0?<|im_end|>\n"
    assert student == system + question + "<|im_start|>assistant\n"
    assert teacher == (system + question + f"<|im_start|>user\n{INTRO}<|im_end|>\n"
                       f"<|im_start|>user\n{IMG}{IMG}<|im_end|>\n"
                       f"<|im_start|>user\n{TRANSITION}<|im_end|>\n<|im_start|>assistant\n")


def test_one_turn_layout_is_the_default_and_renders_literally(tmp_path):
    student, teacher = _contexts(tmp_path)
    question = f"<|im_start|>user\n{IMG}Which way 0?"
    assert student == question + "<|im_end|>\n<|im_start|>assistant\n"
    assert teacher == question + f"{INTRO}{IMG}{IMG}{TRANSITION}<|im_end|>\n<|im_start|>assistant\n"


def test_blocks_layout_without_vts_keeps_intro_and_transition():
    _, processor = build_tiny_qwen2_5_vl(seed=0)
    ctx = TeacherContext(processor, intro=INTRO, transition=TRANSITION, uses_images=True, layout="blocks",
                         on_missing_vt="no_vt_teacher")
    x = vl_dataset(n=1, n_vt=0)[0]
    prompt = ctx.teacher_prompt(x, 0, [4], use_vt_text=False)
    assert _rendered(processor, prompt.input_ids) == (
        f"<|im_start|>user\n{IMG}Which way 0?<|im_end|>\n<|im_start|>user\n{INTRO}<|im_end|>\n"
        f"<|im_start|>user\n{TRANSITION}<|im_end|>\n<|im_start|>assistant\n")


def test_bagel_renders_both_layouts_as_the_references_blocks():
    """BAGEL's chat format already puts every text in its own block: both layouts give the reference's sequence
    `[sys] [img] [Q] [INTRO] [VT..] [TRANSITION]` (data/opsd_pack_builder.py)."""
    _, processor = build_tiny_bagel(seed=0)
    x = vl_dataset(n=1, n_vt=2)[0]
    x = {**x, "prompt": [{"role": "system", "content": SYS}, *x["prompt"]]}
    rendered = set()
    for layout in ("one_turn", "blocks"):
        ctx = TeacherContext(processor, intro=INTRO, transition=TRANSITION, uses_images=True, layout=layout)
        rendered.add(_rendered(processor, ctx.teacher_prompt(x, 2, [4, 4, 4], use_vt_text=False).input_ids))
    assert rendered == {f"<|im_start|>{SYS}<|im_end|>{IMG}<|im_start|>Which way 0?<|im_end|><|im_start|>{INTRO}"
                        f"<|im_end|>{IMG}{IMG}<|im_start|>{TRANSITION}<|im_end|><|im_start|>"}


def test_system_prompt_refuses_a_sample_with_its_own_system_message(tmp_path):
    model, processor = build_tiny_qwen2_5_vl(seed=0)
    rows = vl_dataset(n=2).to_list()
    rows[1]["prompt"] = [{"role": "system", "content": [{"type": "text", "text": "mine"}]}, *rows[1]["prompt"]]
    data = Dataset.from_list(rows)
    trainer = make_trainer(model, processor, data, tmp_path, system_prompt=SYS, max_completion_length=2)
    with pytest.raises(ValueError, match="sample 's1' already has a system message and system_prompt is set"):
        generation_batch(trainer, data)


def test_the_reference_texts_are_verbatim():
    """The reference's strings as data/opsd_pack_builder.py writes them (its line breaks kept)."""
    assert VLM_THINK_SYSTEM_PROMPT == (
        "Let's think step by step to answer the question. For text-based "
        "thinking, enclose the process within <think> </think>, e.g. "
        "<think> thinking process here </think>. For visual thinking, "
        "enclose the content within <image_start> </image_end>, e.g. "
        "<image_start> thinking image here </image_end>. Finally conclude "
        "with the final answer wrapped in <answer></answer> tags, i.e. "
        "<answer> answer here </answer>."
    )
    assert TEACHER_INTRO == (
        "The following images are privileged visual references that depict "
        "the intermediate visual thoughts on the path to the correct answer. "
        "Use them silently as grounding context; do not describe or echo "
        "them."
    )
    assert TEACHER_TRANSITION == "Now, using your own independent reasoning, answer the problem above. Think step by step."


@pytest.mark.parametrize("spec", ["auto", "folder", None])
def test_ema_teacher_starts_from_the_release_folders_ema_weights(tmp_path, spec):
    """The reference loads `ema.safetensors` into its EMA teacher when the model folder has one, the student from
    `model.safetensors` (train/fsdp_utils.py `try_load_ckpt`); None keeps the policy's weights."""
    policy, processor = build_tiny_bagel(seed=0)
    ema, _ = build_tiny_bagel(seed=1)
    folder = save_bagel_release(tmp_path / "release", {"model": policy, "ema": ema}, processor)
    model, proc = load_pretrained(folder, bagel_weights="model")
    trainer = make_trainer(model, proc, vl_dataset(n=2), tmp_path,
                           ema_init_weights=folder if spec == "folder" else spec)
    shadow = trainer.teacher_shadow.state_dict()
    expected = (policy if spec is None else ema).state_dict()
    assert len(shadow) == len(list(model.parameters()))
    for name, tensor in shadow.items():
        torch.testing.assert_close(tensor, expected[name].float(), rtol=0, atol=0, msg=name)
    if spec is not None:  # the policy itself still starts from model.safetensors
        torch.testing.assert_close(model.lm_head.weight, policy.lm_head.weight, rtol=0, atol=0)


def test_ema_init_auto_without_an_ema_file_starts_from_the_policy(tmp_path):
    model, processor = build_tiny_qwen2_5_vl(seed=0)
    trainer = make_trainer(model, processor, vl_dataset(n=2), tmp_path, ema_init_weights="auto")
    live = dict(model.named_parameters())
    for name, tensor in trainer.teacher_shadow.state_dict().items():
        torch.testing.assert_close(tensor, live[name].detach(), rtol=0, atol=0)


def test_trainable_tower_encodes_vts_online_with_the_ema_weights(tmp_path):
    """The reference trains the vision tower and connector (`freeze_vit` False), so its EMA teacher encodes the VTs
    (and the problem image) with the EMA'd tower: with a trainable tower and online VTs, the teacher's logits are
    those of the EMA weights' own full forward, tower included (here EMA weights = a perturbed copy, every weight)."""
    from safetensors.torch import save_file

    from tests.trainer_utils import completion_logits, generation_batch, reference_teacher_logits

    model, processor = build_tiny_qwen2_5_vl(seed=0)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp_path / "ema.safetensors"))
    data = vl_dataset(n=2, n_vt=2)
    trainer = make_trainer(model, processor, data, tmp_path, teacher_mode="ema", vt_source="online",
                           ema_init_weights=str(tmp_path / "ema.safetensors"), max_completion_length=3)
    assert all(p.requires_grad for p in model.model.visual.parameters())  # tower and merger (connector) train
    batch = generation_batch(trainer, data)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():
        out = trainer._teacher_pass(unwrapped, batch)
    logits = out["teacher_hidden"] @ out["teacher_head"].t()
    expected = reference_teacher_logits(ema, processor, data, batch, trainer.args)
    live = completion_logits(trainer, batch, teacher=True)  # the same context under the live weights
    for b, ref in enumerate(expected):
        n = len(ref)
        torch.testing.assert_close(logits[b, -n:], ref, rtol=1e-4, atol=1e-4)
        assert (live[b, -n:] - ref).abs().max() > 1e-2  # the live tower would give other logits


def test_eval_renders_the_reference_layout_as_the_trainer(tmp_path):
    """Eval's contexts (`opsd_trl.eval.Contexts`, used by sweeps) with the run's layout and system prompt: the same
    student and teacher prompts as the trainer's."""
    from opsd_trl.eval import Contexts

    model, processor = build_tiny_qwen2_5_vl(seed=0)
    data = vl_dataset(n=2, n_vt=2)
    trainer = make_trainer(model, processor, data, tmp_path, teacher_intro=INTRO, teacher_transition=TRANSITION,
                           teacher_text_layout="blocks", system_prompt=SYS, max_completion_length=2)
    batch = generation_batch(trainer, data)
    contexts = Contexts(processor, intro=INTRO, transition=TRANSITION, layout="blocks", system_prompt=SYS)
    for b, sample_id in enumerate(batch["sample_ids"]):
        row = data[list(data["id"]).index(sample_id)]
        for teacher in (True, False):
            ids, _ = contexts.prompt_ids(row, teacher, contexts.pixels(contexts.images(row, teacher))["image_grid_thw"])
            expected = (batch["teacher_prompt_ids"][b] if teacher
                        else batch["prompt_ids"][b][batch["prompt_mask"][b].bool()].tolist())
            assert ids == expected
