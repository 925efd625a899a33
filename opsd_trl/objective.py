"""The distillation objective of one micro-batch, from the completion positions' hidden states.

`loss_type="gjsd"` goes through the fused kernel (`fused_loss`: no `(B, C, V)` logits) when the policy's head allows
it, else through logits (`losses`), as `"sampled_reverse_kl"` always does. A non-finite loss is refused, not
trained on. The diagnostics (full-vocabulary KL and entropies) cost two extra vocabulary projections, so the caller
asks for them only on the steps that get logged.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import GJSD
from .diagnostics import token_diagnostics
from .fused_loss import fused_generalized_jsd
from .losses import generalized_jsd, sampled_token_reverse_kl
from .models.head import OutputHead


def completion_loss(
    args,
    model: nn.Module,
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor | None,
    mask: torch.Tensor,
    completion_ids: torch.Tensor,
    num_items_in_batch,
    *,
    fused: bool,
    diagnose: bool,
    step: int,
    sample_ids: list[str],
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss over the accumulation window (`num_items_in_batch`, per `args.loss_normalization`) and, when
    `diagnose`, the token diagnostics ({} otherwise).

    `args`: the config's loss fields (`loss_type`, `beta`, `teacher_top_k`, `jsd_clip`, `jsd_clip_form`,
    `temperature`, `loss_chunk_size`, `loss_normalization`). `model`: the unwrapped policy, whose `OutputHead`
    makes the logits (the teacher's with `teacher_head` as its weight). Hidden states `(B, C, H)`; `teacher_head`: the
    teacher's own head weight `(V, H)`, or None when it is the policy's; `mask`, `completion_ids`: `(B, C)`.
    `fused`: the head can go through the fused kernel. `step`, `sample_ids` name the batch in a non-finite error.
    """
    head = OutputHead.of(model)
    teacher = head if teacher_head is None else head.with_weight(teacher_head)
    if args.loss_type == GJSD and fused:
        loss, per_token = fused_generalized_jsd(
            student_hidden, teacher_hidden, head.weight, teacher_lm_head_weight=teacher_head, mask=mask,
            beta=args.beta, top_k=args.teacher_top_k, clip=args.jsd_clip, temperature=args.temperature,
            num_items_in_batch=num_items_in_batch, return_per_token=True, chunk_size=args.loss_chunk_size,
            clip_form=args.jsd_clip_form, normalization=args.loss_normalization, logit_scale=head.scale,
        )
    else:
        student_logits = head.logits(student_hidden)
        teacher_logits = teacher.logits(teacher_hidden).detach()
        common = dict(temperature=args.temperature, mask=mask, num_items_in_batch=num_items_in_batch,
                      return_per_token=True, chunk_size=args.loss_chunk_size, normalization=args.loss_normalization)
        if args.loss_type == GJSD:
            loss, per_token = generalized_jsd(student_logits, teacher_logits, beta=args.beta,
                                              top_k=args.teacher_top_k, clip=args.jsd_clip,
                                              clip_form=args.jsd_clip_form, **common)
        else:
            loss, per_token = sampled_token_reverse_kl(student_logits, teacher_logits, completion_ids, **common)
    if not torch.isfinite(per_token[mask]).all() or not torch.isfinite(loss):
        raise FloatingPointError(
            f"non-finite loss at step {step} for samples {sample_ids}; not training on it (check the learning rate, "
            "the data and the VT features; see docs/troubleshooting.md)."
        )
    if not diagnose:
        return loss, {}
    return loss, token_diagnostics(
        student_hidden.detach(), teacher_hidden, head, teacher, mask, temperature=args.temperature,
        chunk_size=args.loss_chunk_size,
    )
