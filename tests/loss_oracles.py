"""The generalized JSD's per-token definition from log-probabilities, written densely: the oracle the closed-form
gradient (`opsd_trl.losses.divergence_and_grad`) is checked against by autograd."""

from __future__ import annotations

import math

import torch


def _entry_kl(log_p: torch.Tensor, log_q: torch.Tensor, nonnegative: bool) -> torch.Tensor:
    """Per-entry KL term from log-probabilities: ``p (log p - log q)`` (the reference's ``F.kl_div`` entries, which
    can be negative), or with ``nonnegative`` ``p (log p - log q) - p + q`` (never negative). Both sum to
    ``KL(p || q)`` when ``p`` and ``q`` are distributions on the same support (the ``- p + q`` parts cancel in the
    sum); they differ entry by entry, so a per-entry clip gives different sums. Where ``p = 0`` the term is 0
    (resp. ``q``), with finite gradients."""
    absent = log_p == -math.inf
    safe_log_p = log_p.masked_fill(absent, 0.0)
    p = safe_log_p.exp().masked_fill(absent, 0.0)
    terms = p * (safe_log_p - log_q.masked_fill(absent, 0.0))
    return terms - p + log_q.exp() if nonnegative else terms


def per_token_divergence(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    *,
    beta: float,
    clip: float | None,
    clip_form: str = "reference",
) -> torch.Tensor:
    """Generalized JSD per position, summed over the support, from log-probabilities on a shared support.

    With ``S`` the student and ``T`` the teacher distribution and ``M = beta * T + (1 - beta) * S``, the per-entry
    term is ``kl(T_v, S_v)`` for beta = 0, ``kl(S_v, T_v)`` for beta = 1, and
    ``beta * kl(T_v, M_v) + (1 - beta) * kl(S_v, M_v)`` in between. ``clip_form`` picks ``kl``:

    - ``"reference"``: ``kl(p, q) = p log(p / q)``, the entries of ``F.kl_div`` that the reference implementation
      clamps. At beta = 0 and 1 single entries can be negative.
    - ``"nonnegative"``: ``kl(p, q) = p log(p / q) - p + q``, never negative.

    The sums are the usual KL / generalized JSD in both forms (the ``- p + q`` parts cancel over a shared support;
    for 0 < beta < 1 they cancel entry by entry, so the two forms agree there even with a clip). ``clip`` clamps each
    per-entry term to at most ``clip`` before the sum over the support; at beta = 0 and 1 the two forms then differ.

    Args:
        student_log_probs (torch.Tensor): shape ``(N, K)``.
        teacher_log_probs (torch.Tensor): shape ``(N, K)``.
        beta (float): in ``[0, 1]``.
        clip (float | None): upper bound on each per-entry term, or None.
        clip_form (str): ``"reference"`` or ``"nonnegative"``.

    Returns:
        torch.Tensor: shape ``(N,)``.
    """
    nonnegative = clip_form == "nonnegative"
    if beta == 0.0:
        terms = _entry_kl(teacher_log_probs, student_log_probs, nonnegative)
    elif beta == 1.0:
        terms = _entry_kl(student_log_probs, teacher_log_probs, nonnegative)
    else:
        # Entries absent from both distributions would make the mixture -inf and its gradient NaN; both of their
        # terms are zero anyway, so give them a finite placeholder.
        both_absent = (student_log_probs == -math.inf) & (teacher_log_probs == -math.inf)
        mixture = torch.logaddexp(
            student_log_probs.masked_fill(both_absent, 0.0) + math.log1p(-beta),
            teacher_log_probs.masked_fill(both_absent, 0.0) + math.log(beta),
        )
        terms = beta * _entry_kl(teacher_log_probs, mixture, nonnegative) + (1.0 - beta) * _entry_kl(
            student_log_probs, mixture, nonnegative
        )
        terms = terms.masked_fill(both_absent, 0.0)
    if clip is not None:
        terms = terms.clamp(max=clip)
    return terms.sum(dim=-1)


