"""`loss_normalization="samples"` against the reference's formula, absolutely: the loss the trainer back-propagates
over one gradient-accumulation window whose completions have different lengths equals, computed densely here from
the initial weights, the reference's `generalized_jsd_loss` (scripts/visual_opsd/opsd_loss.py: top-K of the teacher,
renormalised, beta mixture, `F.kl_div` entries clamped at the clip, vocabulary sum, mean over each completion,
x tau^2) averaged over the window's samples (its loop: batch 1, / grad_accum)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from opsd_trl.testing.tiny_models import build_tiny_text_lm
from tests.scripts.train_opsd import stop_after_prompt_digit
from tests.trainer_utils import make_trainer


def reference_sample_loss(s: torch.Tensor, t: torch.Tensor, beta: float, top_k: int, clip: float, tau: float):
    """The reference's per-sample loss, restated in float64 on `(N, V)` logits."""
    s, t = s.double(), t.double()
    idx = torch.topk(t, k=top_k, dim=-1).indices
    s_logp = F.log_softmax(torch.gather(s, -1, idx) / tau, dim=-1)
    t_logp = F.log_softmax(torch.gather(t, -1, idx) / tau, dim=-1)
    mix = torch.logaddexp(s_logp + torch.log1p(torch.tensor(-beta)), t_logp + torch.log(torch.tensor(beta)))
    per = beta * t_logp.exp() * (t_logp - mix) + (1 - beta) * s_logp.exp() * (s_logp - mix)
    return per.clamp(max=clip).sum(-1).mean() * tau**2


@pytest.mark.parametrize("fused", [True, False])
def test_uneven_window_loss_equals_the_references_formula(tmp_path, fused):
    model, tok = build_tiny_text_lm(seed=0)
    initial = copy.deepcopy(model)
    # Visual thoughts of very different lengths: the samples' losses differ, so weightings can be told apart.
    data = Dataset.from_list([dict(id=f"t{i}", prompt=[{"role": "user", "content": f"Solve {i}+1."}],
                                   vt_text="abcdefgh"[: 1 + 3 * i] * (1 + 4 * i), answer=str(i)) for i in range(4)])
    trainer = make_trainer(model, tok, data, tmp_path, teacher_mode="self", loss_normalization="samples",
                           per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
                           fused_loss=fused, teacher_top_k=16, jsd_clip=0.05, beta=0.5)
    trainer.generator.settings.temperature = 0.0
    trainer.generator.logits_processor = stop_after_prompt_digit(tok)  # completions of 2, 3 and 4 tokens
    micro = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        micro.append((inputs, loss.detach()))
        return loss

    trainer.compute_loss = recording
    trainer.train()
    assert len(micro) == 2
    args, per_sample, lengths = trainer.args, [], []
    for inputs, _ in micro:
        for b in range(inputs["completion_ids"].size(0)):
            prompt = inputs["prompt_ids"][b][inputs["prompt_mask"][b].bool()]
            completion = inputs["completion_ids"][b][inputs["completion_mask"][b].bool()]
            teacher_prompt = torch.tensor(inputs["teacher_prompt_ids"][b])
            with torch.no_grad():
                s = initial(torch.cat([prompt, completion])[None]).logits[0, len(prompt) - 1 : -1]
                t = initial(torch.cat([teacher_prompt, completion])[None]).logits[0, len(teacher_prompt) - 1 : -1]
            per_sample.append(reference_sample_loss(s, t, args.beta, args.teacher_top_k, args.jsd_clip,
                                                    args.temperature))
            lengths.append(len(completion))
    assert len(per_sample) == 4 and len(set(lengths)) > 1, lengths  # an uneven window
    reference = torch.stack(per_sample).mean().item()
    trained = sum(loss.item() for _, loss in micro)
    assert trained == pytest.approx(reference, rel=1e-4, abs=0)  # fp32 forwards, padded vs alone
    # The token-weighted mean of the same window differs, so the test tells the two weightings apart.
    tokens = sum(p.item() * n for p, n in zip(per_sample, lengths, strict=True)) / sum(lengths)
    assert abs(tokens - reference) > 1e-3 * reference, (tokens, reference)  # 10x the tolerance above
