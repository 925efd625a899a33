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
- Check :func:`unfusable_reason` first: heads with a bias or final-logit softcapping cannot use this path (pass a
  logit scale as ``logit_scale``); fall back to the logits path of :mod:`opsd_trl.losses` (and log why, once).
- The teacher receives no gradient; pass teacher hidden states computed under ``no_grad``. With a separate teacher
  head (EMA / fixed teacher) pass it as ``teacher_lm_head_weight``.
"""

from __future__ import annotations

import torch

from .losses import (
    compute_dtype,
    counted_rows,
    divergence_and_grad,
    row_weights,
    scatter_counted,
    teacher_support,
    validate_divergence_args,
    validate_num_items,
)
from .models.head import OutputHead

__all__ = ["fused_generalized_jsd", "unfusable_reason"]

_OUTER_ELEMENTS = 1 << 22  # per slice of the top-K weight gradient's outer products (16 MB in fp32)


def unfusable_reason(model: torch.nn.Module) -> str | None:
    """Why the model's output head (:class:`~opsd_trl.models.head.OutputHead`) cannot go through
    :func:`fused_generalized_jsd`, or None when it can.

    The fused path computes logits as ``logit_scale * (hidden @ weight.T)``; a bias or final-logit softcapping is
    refused.
    """
    head = OutputHead.of(model)
    if not isinstance(head.module, torch.nn.Linear):
        return f"output head is {type(head.module).__name__}, not nn.Linear"
    if head.bias is not None:
        return "output head has a bias"
    if head.softcap is not None:
        return f"final_logit_softcapping = {head.softcap}"
    return None


def _project(hidden: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``hidden @ weight.T`` ``(C, V)`` written into ``out`` (compute dtype)."""
    if hidden.dtype == weight.dtype == out.dtype:
        return torch.mm(hidden, weight.T, out=out)
    return out.copy_(hidden @ weight.T)


def _gather_rows(weight: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Rows of ``weight`` ``(V, H)`` at ``support`` ``(C, K)``, shape ``(C, K, H)`` (index_select: fast on CPU)."""
    return weight.index_select(0, support.reshape(-1)).view(*support.shape, weight.size(1))


def _accumulate_chunks(student_hidden, teacher_hidden, weight, teacher_weight, row_scale, hyper, grad_hidden,
                       grad_weight) -> torch.Tensor:
    """Per-token values ``(N,)``; adds ``sum_r row_scale[r] * d value_r / d input`` into ``grad_hidden`` ``(N, H)``
    and ``grad_weight`` ``(V, H)`` (either may be None: not needed), ``C`` rows at a time.

    Per chunk: the teacher projection (full vocabulary, to find its support), the student's logits on the support
    (the full projection, or ``K`` dot products with the gathered ``lm_head`` rows), the closed-form gradient of the
    values with respect to those logits (:func:`divergence_and_grad`), then its two products with the weight rows and
    the hidden rows. The full-vocabulary path thus costs four ``(C, H) x (H, V)`` products, the top-K path one.
    """
    beta, top_k, clip, temperature, chunk, clip_form = hyper
    dtype = compute_dtype(student_hidden.dtype)
    values = []
    # Two (C, V) tiles reused by every chunk (a fresh tile per chunk would pay its page faults each time).
    rows_per_tile = min(chunk, student_hidden.size(0))
    tiles = torch.empty(1 if top_k else 2, rows_per_tile, weight.size(0), dtype=dtype, device=weight.device)
    for start in range(0, student_hidden.size(0), chunk):
        rows = slice(start, start + chunk)
        h_s = student_hidden[rows]
        teacher_logits = _project(teacher_hidden[rows], teacher_weight, tiles[0, : h_s.size(0)])
        if temperature != 1.0:
            teacher_logits /= temperature
        teacher_log_probs, support = teacher_support(teacher_logits, top_k)
        if support is None:
            student_logits = _project(h_s, weight, tiles[1, : h_s.size(0)])
        else:
            weight_rows = _gather_rows(weight, support)  # (C, K, H), reused by the hidden-state gradient below
            student_logits = torch.einsum("ch,ckh->ck", h_s, weight_rows).to(dtype)
        value, grad_logits = divergence_and_grad(
            student_logits, teacher_log_probs, beta=beta, clip=clip, temperature=temperature, clip_form=clip_form
        )
        values.append(value)
        if grad_hidden is None and grad_weight is None:
            continue
        grad_logits.mul_(row_scale[rows, None].to(dtype))
        if support is None:
            if grad_hidden is not None:
                grad_hidden[rows] += (grad_logits.to(weight.dtype) @ weight).to(grad_hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, h_s.to(dtype))
        else:
            if grad_hidden is not None:
                grad_hidden[rows] += torch.einsum("ck,ckh->ch", grad_logits.to(weight.dtype), weight_rows).to(
                    grad_hidden.dtype
                )
            del weight_rows  # freed before the outer products, which would be as large: (C, K, H)
            if grad_weight is not None:
                step = max(1, _OUTER_ELEMENTS // (support.size(1) * weight.size(1)))  # rows per slice
                for i in range(0, support.size(0), step):
                    outer = grad_logits[i : i + step, :, None] * h_s[i : i + step, None, :].to(dtype)
                    grad_weight.index_add_(0, support[i : i + step].reshape(-1), outer.reshape(-1, weight.size(1)))
    return torch.cat(values) if values else student_hidden.new_zeros(0, dtype=dtype)


class _FusedDivergence(torch.autograd.Function):
    """Loss ``sum_r w_r v_r`` and per-token values ``v`` ``(N,)`` from counted hidden rows ``(N, H)`` and ``lm_head``
    weights ``(V, H)``, with the row weights ``w`` ``(N,)`` of the reduction.

    The gradient of the loss is formed during forward (the row weights are known then), so backward only scales it
    by the incoming scalar and no logits are recomputed. If the per-token values are differentiated too (a caller
    weighting them itself), backward recomputes the chunks once with the combined row weights.
    """

    @staticmethod
    def forward(ctx, student_hidden, teacher_hidden, weight, teacher_weight, row_weight, hyper):
        ctx.set_materialize_grads(False)
        grad_hidden, grad_weight = _gradient_buffers(ctx, student_hidden, weight)
        values = _accumulate_chunks(
            student_hidden, teacher_hidden, weight, teacher_weight, row_weight, hyper, grad_hidden, grad_weight
        )
        ctx.hyper, ctx.grads = hyper, (grad_hidden, grad_weight)
        ctx.save_for_backward(student_hidden, teacher_hidden, weight, teacher_weight, row_weight)
        return (values * row_weight.to(values.dtype)).sum(), values

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_values):
        student_hidden, teacher_hidden, weight, teacher_weight, row_weight = ctx.saved_tensors
        stored = ctx.grads
        ctx.grads = None  # scaled in place below; a second backward (retain_graph) recomputes
        if grad_values is not None or (stored is None and grad_loss is not None):
            # the per-token values are used too, or this is a second backward: recompute with the combined weights
            scale = torch.zeros_like(row_weight) if grad_values is None else grad_values.to(row_weight.dtype)
            if grad_loss is not None:
                scale = scale + grad_loss.to(row_weight.dtype) * row_weight
            grad_hidden, grad_weight = _gradient_buffers(ctx, student_hidden, weight)
            _accumulate_chunks(
                student_hidden, teacher_hidden, weight, teacher_weight, scale, ctx.hyper, grad_hidden, grad_weight
            )
        elif grad_loss is not None:
            grad_hidden, grad_weight = stored
            for grad in stored:
                if grad is not None:
                    grad.mul_(grad_loss.to(grad.dtype))
        else:
            return (None,) * 6
        return (
            None if grad_hidden is None else grad_hidden.to(student_hidden.dtype),
            None,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None,
            None,
            None,
        )


def _gradient_buffers(ctx, student_hidden, weight):
    """Zeroed compute-dtype accumulators (fp32; fp64 for fp64 inputs) for the student hidden rows and the weight,
    each None when that input needs no gradient."""
    dtype = compute_dtype(student_hidden.dtype)
    return tuple(
        torch.zeros(t.shape, dtype=dtype, device=t.device) if ctx.needs_input_grad[i] else None
        for i, t in ((0, student_hidden), (2, weight))
    )


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
    logit_scale: float = 1.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`opsd_trl.losses.generalized_jsd` of ``s * student_hidden @ W.T`` vs ``s * teacher_hidden @ W_t.T``
    (``s`` = ``logit_scale``), fused.

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
        logit_scale (float): the head's logit scale (:func:`opsd_trl.models.head.logit_scale`), applied to both
            models' hidden states (the same logits as scaling them, and the gradient flows through it).

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
    if logit_scale != 1.0:  # s * (h @ W.T) = (s * h) @ W.T
        student_hidden, teacher_hidden = student_hidden * logit_scale, teacher_hidden * logit_scale
    loss, per_token = _FusedDivergence.apply(
        student_hidden.reshape(batch * length, -1)[rows],
        teacher_hidden.detach().reshape(batch * length, -1)[rows],
        lm_head_weight,
        teacher_weight.detach(),
        row_weights(rows, (batch, length), num_items_in_batch, normalization, compute_dtype(student_hidden.dtype)),
        (float(beta), top_k, clip, float(temperature), chunk_size, clip_form),
    )
    return (loss, scatter_counted(per_token, rows, (batch, length))) if return_per_token else loss
