"""Visual-OPSD objectives as pure functions on logits.

Shapes use ``B`` batch, ``T`` completion length, ``V`` vocabulary, ``K`` teacher top-K, ``N`` number of counted
(mask = True) positions. All functions compute only on counted positions, in chunks of ``chunk_size`` of them, so
masked positions (padding, garbage logits) never reach the arithmetic and peak memory holds at most one fp32
``(B, T, V)``-sized tensor (the gradient) plus per-chunk temporaries. bf16/fp16 inputs are upcast to fp32 per chunk;
fp64 inputs are kept in fp64.

The fused hidden-state variant lives in :mod:`opsd_trl.fused_loss` and reuses :func:`teacher_support` and
:func:`divergence_and_grad` from here, so both paths share one definition of the divergence.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

__all__ = [
    "CLIP_FORMS",
    "NORMALIZATIONS",
    "ClipForm",
    "Normalization",
    "compute_dtype",
    "counted_rows",
    "divergence_and_grad",
    "generalized_jsd",
    "reduce_per_token",
    "row_weights",
    "sampled_token_reverse_kl",
    "teacher_support",
    "validate_divergence_args",
    "validate_num_items",
]


ClipForm = Literal["reference", "nonnegative"]  # which per-entry terms a clip clamps (see `divergence_and_grad`)
Normalization = Literal["tokens", "samples"]  # how per-token terms reduce to the loss (see `reduce_per_token`)
CLIP_FORMS = get_args(ClipForm)
NORMALIZATIONS = get_args(Normalization)


def validate_divergence_args(
    *,
    beta: float,
    top_k: int | None,
    clip: float | None,
    temperature: float,
    vocab_size: int,
    chunk_size: int,
    clip_form: str = "reference",
    normalization: str = "tokens",
) -> None:
    """Raise ``ValueError`` naming the offending argument."""
    if clip_form not in CLIP_FORMS:
        raise ValueError(f"clip_form must be one of {CLIP_FORMS}, got {clip_form!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be in [1, V={vocab_size}] or None, got {top_k}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def validate_num_items(num_items_in_batch: int | float | torch.Tensor | None) -> None:
    """Raise ``ValueError`` for a non-positive Python number (tensors are not synchronised to check)."""
    if isinstance(num_items_in_batch, (int, float)) and not num_items_in_batch > 0:
        raise ValueError(f"num_items_in_batch must be > 0 or None, got {num_items_in_batch}")


def counted_rows(mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """Flat indices ``(N,)`` of the counted positions of a ``(B, T)`` mask (all positions when ``mask`` is None)."""
    if mask is None:
        return torch.arange(batch * length, device=device)
    if mask.shape != (batch, length):
        raise ValueError(f"mask must have shape (B, T) = {(batch, length)}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = counted token), got dtype {mask.dtype}")
    return mask.reshape(-1).nonzero().squeeze(1).to(device)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; everything else (bf16, fp16, fp32) is computed in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def teacher_support(teacher_logits: torch.Tensor, top_k: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher log-probabilities on the support the divergence is taken over.

    Args:
        teacher_logits (torch.Tensor): already temperature-scaled logits, shape ``(N, V)``; overwritten without
            top-K.
        top_k (int | None): keep the teacher's ``top_k`` largest entries per row (None: the full vocabulary).

    Returns:
        tuple[torch.Tensor, torch.Tensor | None]: log-probabilities renormalised over the support, shape ``(N, K)``
        (``K = V`` without top-K), and the vocabulary indices of the support, shape ``(N, K)``, or None for the full
        vocabulary.
    """
    if top_k is None:  # in place: the callers pass a scratch tile, and at K = V a copy costs as much as a pass
        return torch.log_softmax(teacher_logits, dim=-1, out=teacher_logits), None
    values, indices = teacher_logits.topk(top_k, dim=-1)
    return F.log_softmax(values, dim=-1), indices


def divergence_and_grad(
    student_logits: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    *,
    beta: float,
    clip: float | None,
    temperature: float = 1.0,
    clip_form: str = "reference",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token generalized JSD (times ``temperature**2``) and its gradient with respect to the raw student logits
    ``(N, K)``, in closed form (no autograd graph over the ``(N, K)`` tiles).

    The value, summed over the (shared) support: with ``S`` the student and ``T`` the teacher distribution and
    ``M = beta * T + (1 - beta) * S``, the per-entry term is ``kl(T_v, S_v)`` for beta = 0, ``kl(S_v, T_v)`` for
    beta = 1, and ``beta * kl(T_v, M_v) + (1 - beta) * kl(S_v, M_v)`` in between. ``clip_form`` picks ``kl``:
    ``"reference"``, ``kl(p, q) = p log(p / q)`` (the entries of ``F.kl_div`` that the reference implementation
    clamps; at beta = 0 and 1 single entries can be negative), or ``"nonnegative"``, ``p log(p / q) - p + q``. The
    sums are the usual KL / generalized JSD in both forms (the ``- p + q`` parts cancel over a shared support; for
    0 < beta < 1 entry by entry, so the forms agree there even with a clip). ``clip`` clamps each per-entry term to
    at most ``clip`` before the sum. (The tests restate this definition densely and differentiate it by autograd.)

    With ``s = log_softmax(z / temperature)``, ``S = exp(s)``, ``T`` the teacher and ``M`` the mixture, the
    derivative of each per-entry term with respect to ``s_v`` is ``S_v (s_v - t_v + 1)`` (beta = 1, reference form),
    ``S_v (s_v - t_v)`` (beta = 1, non-negative), ``-T_v`` (beta = 0, reference), ``S_v - T_v`` (beta = 0,
    non-negative) and ``(1 - beta) S_v (s_v - m_v)`` in between (both forms: the ``M`` terms cancel). A clipped entry
    (term above ``clip``) contributes nothing, as under ``clamp``. Through the softmax,
    ``d/dz_u = (g_u - S_u sum_v g_v) / temperature``; times ``temperature**2`` for the scaled values.

    Args:
        student_logits (torch.Tensor): raw student logits on the support, shape ``(N, K)``, compute dtype; used as
            scratch (overwritten).
        teacher_log_probs (torch.Tensor): teacher log-probabilities at ``temperature`` on that support, ``(N, K)``;
            used as scratch (overwritten).
        beta, clip, temperature, clip_form: as in :func:`generalized_jsd`.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: values ``(N,)`` and the gradient of their sum, ``(N, K)``.
    """
    nonnegative = clip_form == "nonnegative"
    lowest = torch.finfo(student_logits.dtype).min
    # In place on the caller's (N, K) tiles: at K = V every pass costs a sizeable share of a projection and every new
    # tile its page faults. Absent entries (-inf log-probabilities: a masked vocabulary) are moved to the lowest
    # finite value, where their probability is exactly 0, so each product below is 0 * finite, never 0 * inf.
    s = student_logits.div_(temperature) if temperature != 1.0 else student_logits
    s = torch.log_softmax(s, dim=-1, out=s).clamp_min_(lowest)
    t = teacher_log_probs.clamp_min_(lowest)
    student_probs = s.exp()
    if beta == 1.0:  # kl(S, T) = S (s - t) [- S + T]
        grad = s.sub_(t)
        terms = grad * student_probs
        if nonnegative:
            terms += t.exp_().sub_(student_probs)
        else:
            grad += 1.0
        grad *= student_probs
    elif beta == 0.0:  # kl(T, S) = T (t - s) [- T + S]
        teacher_probs = t.exp()
        terms = t.sub_(s).mul_(teacher_probs)
        if nonnegative:
            grad = student_probs - teacher_probs
            terms += grad
        else:
            grad = teacher_probs.neg_()
    else:  # beta kl(T, M) + (1 - beta) kl(S, M); the M parts of the two forms cancel entry by entry
        teacher_probs = t.exp()
        log_mixture = (teacher_probs * beta).add_(student_probs, alpha=1.0 - beta)
        log_mixture = log_mixture.clamp_min_(torch.finfo(log_mixture.dtype).tiny).log_()
        grad = s.sub_(log_mixture).mul_(student_probs).mul_(1.0 - beta)  # (1 - beta) S (s - m): also its term
        terms = t.sub_(log_mixture).mul_(teacher_probs).mul_(beta).add_(grad)
        del log_mixture, teacher_probs
    if clip is not None:
        grad.masked_fill_(terms > clip, 0.0)
        terms = terms.clamp_(max=clip)
    grad -= student_probs.mul_(grad.sum(dim=-1, keepdim=True))
    return terms.sum(dim=-1) * temperature**2, grad.mul_(temperature)


def row_weights(
    rows: torch.Tensor,
    shape: tuple[int, int],
    num_items_in_batch: int | float | torch.Tensor | None,
    normalization: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Weight of each counted position in the loss, shape ``(N,)``: the loss is ``(per_token * weights).sum()``.

    ``"tokens"``: ``1 / num_items_in_batch`` (or ``1 / N``); ``"samples"``: ``1 / (n_i * num_items_in_batch)`` with
    ``n_i`` the counted tokens of the position's sample (or the local number of samples with a counted token, at
    least 1, in place of ``num_items_in_batch``). See :func:`reduce_per_token`.
    """
    if normalization == "samples":
        sample = torch.div(rows, shape[1], rounding_mode="floor")
        counts = torch.bincount(sample, minlength=shape[0])
        weights, local = 1.0 / counts[sample].to(dtype), max(int((counts > 0).sum()), 1)
    else:
        weights, local = torch.ones(rows.numel(), dtype=dtype, device=rows.device), max(rows.numel(), 1)
    denominator = local if num_items_in_batch is None else num_items_in_batch
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(rows.device, dtype)
    return weights / denominator


def reduce_per_token(
    per_token: torch.Tensor,
    rows: torch.Tensor,
    shape: tuple[int, int],
    num_items_in_batch: int | float | torch.Tensor | None,
    return_per_token: bool,
    normalization: str = "tokens",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reduce the counted per-token values to the loss.

    ``normalization="tokens"`` (TRL's): the sum of the values over ``num_items_in_batch`` (the counted tokens of the
    accumulation window), or over their local count (at least 1). ``"samples"`` (the reference's): each sample's
    values are averaged over its own counted tokens, and these per-sample means are summed over
    ``num_items_in_batch`` (the samples with at least one counted token in the window), or over their local count
    (at least 1): every sample weighs the same, whatever its length.

    Args:
        per_token (torch.Tensor): values on the counted positions, shape ``(N,)``.
        rows (torch.Tensor): their flat indices into ``(B, T)``, shape ``(N,)``.
        shape (tuple[int, int]): ``(B, T)``.
        num_items_in_batch: global number of counted tokens (``"tokens"``) or of samples (``"samples"``) across
            gradient-accumulation micro-batches, or None.
        return_per_token (bool): also return the (unweighted) values scattered to ``(B, T)`` (0 at uncounted
            positions).
        normalization (str): ``"tokens"`` or ``"samples"``.
    """
    loss = (per_token * row_weights(rows, shape, num_items_in_batch, normalization, per_token.dtype)).sum()
    if not return_per_token:
        return loss
    return loss, scatter_counted(per_token, rows, shape)


def scatter_counted(per_token: torch.Tensor, rows: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The counted positions' values ``(N,)`` at their flat indices ``rows`` of a ``(B, T)`` tensor, 0 elsewhere."""
    return per_token.new_zeros(shape[0] * shape[1]).index_put((rows,), per_token).view(shape)


class _LogitsDivergence(torch.autograd.Function):
    """Per-token generalized JSD on counted rows of flat logits; computes its student gradient during forward.

    Each per-token value depends only on its own row of student logits, so the gradient of the sum of a chunk's values
    with respect to that chunk's logits is exactly the per-row Jacobian. It is stored (``(N, K)`` plus indices with
    top-K, ``(N, V)`` without) and backward scales it by the incoming per-token gradient, chunk by chunk.
    """

    @staticmethod
    def forward(ctx, student_flat, teacher_flat, rows, beta, top_k, clip, temperature, chunk_size, clip_form):
        dtype = compute_dtype(student_flat.dtype)
        need_grad = ctx.needs_input_grad[0]
        values, jacobians, supports = [], [], []
        for start in range(0, rows.numel(), chunk_size):
            chunk = rows[start : start + chunk_size]
            teacher_log_probs, support = teacher_support(teacher_flat[chunk].to(dtype) / temperature, top_k)
            student = student_flat[chunk] if support is None else student_flat[chunk[:, None], support]
            value, jacobian = divergence_and_grad(
                student.to(dtype), teacher_log_probs, beta=beta, clip=clip, temperature=temperature,
                clip_form=clip_form,
            )
            if need_grad:
                jacobians.append(jacobian.to(student_flat.dtype))
                supports.append(support)
            values.append(value)
        ctx.chunk_size = chunk_size
        ctx.grad_shape, ctx.grad_dtype = student_flat.shape, student_flat.dtype
        if need_grad:
            ctx.jacobians, ctx.supports = jacobians, supports
            ctx.save_for_backward(rows)
        return torch.cat(values) if values else student_flat.new_zeros(0, dtype=dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_values):
        (rows,) = ctx.saved_tensors
        grad = grad_values.new_zeros(ctx.grad_shape, dtype=ctx.grad_dtype)
        for i, (jacobian, support) in enumerate(zip(ctx.jacobians, ctx.supports, strict=True)):
            chunk = slice(i * ctx.chunk_size, (i + 1) * ctx.chunk_size)
            scaled = jacobian * grad_values[chunk, None].to(jacobian.dtype)
            if support is None:
                grad[rows[chunk]] = scaled
            else:
                grad[rows[chunk, None], support] = scaled
        return grad, None, None, None, None, None, None, None, None


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must have shape (B, T, V), got {tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        names = ("B", "T", "V")
        diff = [
            f"{n}: student {s} vs teacher {t}"
            for n, s, t in zip(names, student_logits.shape, teacher_logits.shape, strict=False)
            if s != t
        ] or [f"teacher_logits has {teacher_logits.dim()} dims"]
        raise ValueError(f"student_logits and teacher_logits differ in shape ({'; '.join(diff)})")


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float = 0.5,
    top_k: int | None = None,
    clip: float | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    return_per_token: bool = False,
    chunk_size: int = 128,
    clip_form: str = "reference",
    normalization: str = "tokens",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Generalized Jensen-Shannon divergence between teacher and student next-token distributions.

    ``beta = 0`` gives ``KL(T || S)`` (forward KL), ``beta = 1`` gives ``KL(S || T)`` (reverse KL), and
    ``0 < beta < 1`` gives ``beta * KL(T || M) + (1 - beta) * KL(S || M)`` with ``M = beta * T + (1 - beta) * S``.
    This is the same convention as TRL's ``GKDTrainer.generalized_jsd_loss`` (same mixture weights, same endpoint
    special cases, no rescaling of interior values), so ``beta`` passes through unchanged; with ``top_k=None`` and
    ``clip=None`` the value equals TRL's with ``labels`` marking the same tokens.

    Teacher top-K: per position, the teacher's ``top_k`` largest logits are kept and the teacher is renormalised over
    them; the student is gathered at the same vocabulary indices and renormalised over them too, so both are proper
    distributions on the same K-entry support (the student gets no gradient outside it).

    Clip: each (position, support entry) term of the divergence is clamped to at most ``clip`` before the sum over the
    support (the reference uses 0.05); the clamp applies before the ``temperature**2`` factor. ``clip_form`` says
    which per-entry terms are clamped (see :func:`divergence_and_grad`): ``"reference"`` (``p log(p / q)``, as the
    reference implementation) or ``"nonnegative"`` (``p log(p / q) - p + q``); they differ only at beta = 0 and 1
    with the clip on.

    Temperature: both logits are divided by ``temperature`` before the softmaxes and the per-token values are
    multiplied by ``temperature**2``.

    Reduction (``normalization="tokens"``, TRL's): the sum over counted positions divided by ``num_items_in_batch``
    when given (the global number of counted tokens across gradient-accumulation micro-batches: accumulating 2
    micro-batches of 1 gives the gradient of one batch of 2), else by the local number of counted positions. With
    ``normalization="samples"`` (the reference's) each sample's values are first averaged over its own counted
    tokens and ``num_items_in_batch`` counts samples instead (see :func:`reduce_per_token`). An all-False mask returns a
    zero that is still connected to ``student_logits``: a rank or micro-batch whose completions were all truncated
    must still run backward (collective gradient sync under DDP/ZeRO), and 0 is its exact contribution to the sum.

    The teacher receives no gradient. Each counted position is computed once, in chunks of ``chunk_size``; the student
    gradient is produced during forward and stored sparsely (``(N, K)``) with top-K or densely (``(N, V)``, student
    dtype) without.

    Args:
        student_logits (torch.Tensor): shape ``(B, T, V)``, any float dtype.
        teacher_logits (torch.Tensor): shape ``(B, T, V)``, no gradient is taken.
        beta (float): in ``[0, 1]``.
        top_k (int | None): teacher top-K support size in ``[1, V]``, or None for the full vocabulary.
        clip (float | None): per-entry upper clamp ``> 0``, or None.
        temperature (float): ``> 0``.
        mask (torch.Tensor | None): bool, shape ``(B, T)``; True marks a counted completion token (EOS included).
        num_items_in_batch (int | float | torch.Tensor | None): global counted-token count, or None.
        return_per_token (bool): also return per-token values.
        chunk_size (int): counted positions per chunk.
        clip_form (str): ``"reference"`` or ``"nonnegative"``.
        normalization (str): ``"tokens"`` or ``"samples"``.

    Returns:
        torch.Tensor | tuple[torch.Tensor, torch.Tensor]: the scalar loss (fp32, or fp64 for fp64 inputs), and with
        ``return_per_token`` the per-token values of shape ``(B, T)`` (0 at uncounted positions, differentiable).
    """
    _check_logits(student_logits, teacher_logits)
    batch, length, vocab = student_logits.shape
    validate_divergence_args(
        beta=beta, top_k=top_k, clip=clip, temperature=temperature, vocab_size=vocab, chunk_size=chunk_size,
        clip_form=clip_form, normalization=normalization,
    )
    validate_num_items(num_items_in_batch)
    rows = counted_rows(mask, batch, length, student_logits.device)
    per_token = _LogitsDivergence.apply(
        student_logits.reshape(-1, vocab),
        teacher_logits.detach().reshape(-1, vocab),
        rows,
        float(beta),
        top_k,
        clip,
        float(temperature),
        chunk_size,
        clip_form,
    )
    return reduce_per_token(per_token, rows, (batch, length), num_items_in_batch, return_per_token, normalization)


def sampled_token_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    completion_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    return_per_token: bool = False,
    chunk_size: int = 128,
    normalization: str = "tokens",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sampled-token reverse-KL policy-gradient loss (the "tinker" alternative objective).

    Per counted token ``y_t`` (sampled from the student): advantage ``A_t = log p_T(y_t) - log p_S(y_t)``, detached,
    and loss term ``-A_t * log p_S(y_t)``. Its gradient is a single-sample estimate of the gradient of
    ``KL(S || T)`` on the student's own samples. Logits are divided by ``temperature`` (the sampling temperature);
    there is no ``temperature**2`` factor. Masking and reduction as in :func:`generalized_jsd`. The teacher receives
    no gradient. Autograd keeps one compute-dtype copy of each chunk of counted student logits (for logsumexp).

    Args:
        student_logits (torch.Tensor): shape ``(B, T, V)``.
        teacher_logits (torch.Tensor): shape ``(B, T, V)``.
        completion_ids (torch.Tensor): sampled token ids, int64, shape ``(B, T)``.
        temperature (float): ``> 0``.
        mask (torch.Tensor | None): bool, shape ``(B, T)``.
        num_items_in_batch (int | float | torch.Tensor | None): global counted-token count, or None.
        return_per_token (bool): also return the per-token loss terms, shape ``(B, T)``.
        chunk_size (int): counted positions per chunk.
        normalization (str): ``"tokens"`` or ``"samples"``, as in :func:`generalized_jsd`.

    Returns:
        torch.Tensor | tuple[torch.Tensor, torch.Tensor]: the scalar loss, and optionally the per-token terms.
    """
    _check_logits(student_logits, teacher_logits)
    batch, length, vocab = student_logits.shape
    if completion_ids.shape != (batch, length):
        raise ValueError(
            f"completion_ids must have shape (B, T) = {(batch, length)}, got {tuple(completion_ids.shape)}"
        )
    validate_divergence_args(
        beta=0.5, top_k=None, clip=None, temperature=temperature, vocab_size=vocab, chunk_size=chunk_size,
        normalization=normalization,
    )
    validate_num_items(num_items_in_batch)
    rows = counted_rows(mask, batch, length, student_logits.device)
    dtype = compute_dtype(student_logits.dtype)
    student_flat = student_logits.reshape(-1, vocab)
    teacher_flat = teacher_logits.detach().reshape(-1, vocab)
    ids = completion_ids.reshape(-1)

    def token_log_prob(flat: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
        logits = flat[chunk].to(dtype) / temperature
        return logits.gather(1, ids[chunk, None]).squeeze(1) - logits.logsumexp(dim=-1)

    terms = []
    for start in range(0, rows.numel(), chunk_size):
        chunk = rows[start : start + chunk_size]
        student_lp = token_log_prob(student_flat, chunk)
        with torch.no_grad():
            advantage = token_log_prob(teacher_flat, chunk) - student_lp
        terms.append(-advantage * student_lp)
    per_token = torch.cat(terms) if terms else student_flat[:0, 0].to(dtype)
    return reduce_per_token(per_token, rows, (batch, length), num_items_in_batch, return_per_token, normalization)
