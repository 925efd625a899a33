"""Fused hidden-state generalized JSD: the Visual-OPSD loss without materialising ``(B, T, V)`` logits.

Shapes: ``B`` batch, ``T`` completion length, ``H`` hidden size, ``V`` vocabulary, ``K`` teacher top-K, ``N`` counted
positions, ``C`` chunk size. The per-token values are those of :func:`opsd_trl.losses.generalized_jsd` applied to
``hidden @ weight.T`` (same support, clip, temperature and reduction), computed ``C`` counted positions at a time.

Cost. With ``top_k`` set, only the teacher is projected onto the full vocabulary (one ``(C, H) x (H, V)`` matmul per
chunk, no gradient); the student's logits are needed only on the teacher's ``K`` support entries, so they are
``K`` dot products per position with the gathered ``lm_head`` rows, and their gradient (sparse, ``(N, K)``) is formed
during forward. Backward then costs ``O(N K H)``. Without ``top_k`` both models are projected in forward and the
student's chunk is re-projected in backward (no ``(N, V)`` tensor is stored).

What the caller must do (the trainer's side):

- Pass the full ``(V, H)`` ``lm_head`` weight (for tied embeddings, the shared embedding matrix itself: its gradient
  from this loss is added to the embedding gradient by autograd like any other use). Under ZeRO-3 / FSDP the weight
  must be gathered once for the step around both this call and its backward (e.g. run the loss inside the wrapped
  model's forward, as TRL's ``_ForwardRedirection`` does, or ``DTensor.full_tensor()`` once under FSDP2); every chunk
  reads that one tensor, so there is no per-chunk gather.
- Check :func:`unfusable_reason` first: heads with a bias, a logit scale or final-logit softcapping cannot use this
  path; fall back to the logits path of :mod:`opsd_trl.losses` (and log why, once).
- The teacher receives no gradient; pass teacher hidden states computed under ``no_grad``. With a separate teacher
  head (EMA / fixed teacher) pass it as ``teacher_lm_head_weight``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .losses import (
    compute_dtype,
    counted_rows,
    per_token_divergence,
    reduce_per_token,
    teacher_support,
    validate_divergence_args,
    validate_num_items,
)

__all__ = ["fused_generalized_jsd", "unfusable_reason"]

_LOGIT_SCALE_FIELDS = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def unfusable_reason(model: torch.nn.Module) -> str | None:
    """Why the model's output head cannot go through :func:`fused_generalized_jsd`, or None when it can.

    The fused path computes logits as ``hidden @ weight.T``; anything else the head applies is refused.
    """
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return f"output head is {type(head).__name__}, not nn.Linear"
    if head.bias is not None:
        return "output head has a bias"
    config = model.config.get_text_config()
    if getattr(config, "final_logit_softcapping", None) is not None:
        return f"final_logit_softcapping = {config.final_logit_softcapping}"
    for field in _LOGIT_SCALE_FIELDS:
        value = getattr(config, field, None)
        if value is not None and value != 1:
            return f"{field} = {value}"
    return None


def _gather_rows(weight: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Rows of ``weight`` ``(V, H)`` at ``support`` ``(C, K)``, shape ``(C, K, H)`` (index_select: fast on CPU)."""
    return weight.index_select(0, support.reshape(-1)).view(*support.shape, weight.size(1))


class _FusedDivergence(torch.autograd.Function):
    """Per-token generalized JSD from counted hidden rows ``(N, H)`` and ``lm_head`` weights ``(V, H)``."""

    @staticmethod
    def forward(
        ctx, student_hidden, teacher_hidden, weight, teacher_weight, beta, top_k, clip, temperature, chunk, clip_form
    ):
        dtype = compute_dtype(student_hidden.dtype)
        need_grad = any(ctx.needs_input_grad[i] for i in (0, 2))
        values, jacobians, supports = [], [], []
        for start in range(0, student_hidden.size(0), chunk):
            h_s, h_t = student_hidden[start : start + chunk], teacher_hidden[start : start + chunk]
            teacher_log_probs, support = teacher_support((h_t @ teacher_weight.T).to(dtype) / temperature, top_k)
            if support is None:
                student = (h_s @ weight.T).to(dtype)
            else:  # student logits on the K support entries only: row-wise dot products with the gathered rows
                student = torch.einsum("ch,ckh->ck", h_s, _gather_rows(weight, support)).to(dtype)
            student = (student / temperature).requires_grad_(need_grad and support is not None)
            with torch.set_grad_enabled(student.requires_grad):
                value = per_token_divergence(
                    F.log_softmax(student, dim=-1), teacher_log_probs, beta=beta, clip=clip, clip_form=clip_form
                ) * (temperature**2)
            if student.requires_grad:
                (jacobian,) = torch.autograd.grad(value, student, torch.ones_like(value))
                jacobians.append(jacobian / temperature)
                supports.append(support)
            values.append(value.detach())
        ctx.hyper = (beta, top_k, clip, temperature, chunk, clip_form)
        ctx.jacobians, ctx.supports = jacobians, supports
        ctx.save_for_backward(student_hidden, teacher_hidden, weight, teacher_weight)
        return torch.cat(values) if values else student_hidden.new_zeros(0, dtype=dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_values):
        student_hidden, teacher_hidden, weight, teacher_weight = ctx.saved_tensors
        beta, top_k, clip, temperature, chunk, clip_form = ctx.hyper
        dtype = compute_dtype(weight.dtype)
        grad_hidden = torch.zeros_like(student_hidden)
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
        for i, start in enumerate(range(0, student_hidden.size(0), chunk)):
            rows = slice(start, start + chunk)
            h_s, upstream = student_hidden[rows], grad_values[rows, None]
            if top_k is None:  # recompute this chunk's logits and their gradient
                teacher_log_probs, _ = teacher_support(
                    (teacher_hidden[rows] @ teacher_weight.T).to(dtype) / temperature, None
                )
                student = (h_s @ weight.T).to(dtype).detach().requires_grad_()
                with torch.enable_grad():
                    value = per_token_divergence(
                        F.log_softmax(student / temperature, dim=-1), teacher_log_probs, beta=beta, clip=clip,
                        clip_form=clip_form,
                    ) * (temperature**2)
                (grad_logits,) = torch.autograd.grad(value, student, upstream.squeeze(1).to(value.dtype))
                grad_logits = grad_logits.to(weight.dtype)
                grad_hidden[rows] = grad_logits @ weight
                grad_weight.addmm_(grad_logits.T.to(dtype), h_s.to(dtype))
            else:
                support = ctx.supports[i]
                grad_logits = (ctx.jacobians[i] * upstream.to(ctx.jacobians[i].dtype)).to(weight.dtype)
                grad_hidden[rows] = torch.einsum("ck,ckh->ch", grad_logits, _gather_rows(weight, support))
                outer = (grad_logits[:, :, None] * h_s[:, None, :]).to(dtype)
                grad_weight.index_add_(0, support.reshape(-1), outer.reshape(-1, weight.size(1)))
        return grad_hidden, None, grad_weight.to(weight.dtype), None, None, None, None, None, None, None


def fused_generalized_jsd(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    *,
    teacher_lm_head_weight: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    beta: float = 0.5,
    top_k: int | None = None,
    clip: float | None = None,
    temperature: float = 1.0,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    return_per_token: bool = False,
    chunk_size: int = 128,
    clip_form: str = "reference",
    normalization: str = "tokens",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`opsd_trl.losses.generalized_jsd` of ``student_hidden @ W.T`` vs ``teacher_hidden @ W_t.T``, fused.

    Same semantics as the logits-in function (beta convention = TRL's, teacher top-K with both distributions
    renormalised on the teacher's support, per-entry clip (``clip_form``) before the support sum, ``temperature**2``,
    reduction by ``normalization`` over ``num_items_in_batch`` or the local count, connected zero for an all-False
    mask). Only counted positions
    are projected. Gradients flow to ``student_hidden`` and ``lm_head_weight`` (not through the teacher's use of
    it); see the module docstring for what the caller must do under ZeRO-3 and with tied embeddings.

    Args:
        student_hidden (torch.Tensor): final hidden states aligned to the completion tokens, shape ``(B, T, H)``.
        teacher_hidden (torch.Tensor): same positions, shape ``(B, T, H_t)``; no gradient is taken.
        lm_head_weight (torch.Tensor): the student's (and by default the teacher's) head, shape ``(V, H)``.
        teacher_lm_head_weight (torch.Tensor | None): a separate teacher head, shape ``(V, H_t)``.
        mask (torch.Tensor | None): bool, shape ``(B, T)``; True marks a counted completion token.
        beta, top_k, clip, temperature, num_items_in_batch, return_per_token, clip_form, normalization: as in
            ``generalized_jsd``.
        chunk_size (int): counted positions projected at once (``C``); a chunk holds a few ``(C, V)`` fp32 tiles.

    Returns:
        torch.Tensor | tuple[torch.Tensor, torch.Tensor]: the scalar loss, and with ``return_per_token`` the
        per-token values of shape ``(B, T)``.
    """
    teacher_weight = lm_head_weight if teacher_lm_head_weight is None else teacher_lm_head_weight
    if student_hidden.dim() != 3 or teacher_hidden.shape[:2] != student_hidden.shape[:2]:
        raise ValueError(
            "student_hidden and teacher_hidden must have shapes (B, T, H) with equal (B, T), got "
            f"{tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}"
        )
    if lm_head_weight.dim() != 2 or lm_head_weight.size(1) != student_hidden.size(-1):
        raise ValueError(
            f"lm_head_weight must have shape (V, H={student_hidden.size(-1)}), got {tuple(lm_head_weight.shape)}"
        )
    if teacher_weight.shape != (lm_head_weight.size(0), teacher_hidden.size(-1)):
        raise ValueError(
            f"teacher_lm_head_weight must have shape (V={lm_head_weight.size(0)}, H_t={teacher_hidden.size(-1)}), "
            f"got {tuple(teacher_weight.shape)}"
        )
    batch, length, _ = student_hidden.shape
    validate_divergence_args(
        beta=beta,
        top_k=top_k,
        clip=clip,
        temperature=temperature,
        vocab_size=lm_head_weight.size(0),
        chunk_size=chunk_size,
        clip_form=clip_form,
        normalization=normalization,
    )
    validate_num_items(num_items_in_batch)
    rows = counted_rows(mask, batch, length, student_hidden.device)
    per_token = _FusedDivergence.apply(
        student_hidden.reshape(batch * length, -1)[rows],
        teacher_hidden.detach().reshape(batch * length, -1)[rows],
        lm_head_weight,
        teacher_weight.detach(),
        float(beta),
        top_k,
        clip,
        float(temperature),
        chunk_size,
        clip_form,
    )
    return reduce_per_token(per_token, rows, (batch, length), num_items_in_batch, return_per_token, normalization)
