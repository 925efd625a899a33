"""Per-token teacher-vs-student diagnostics computed from hidden states, chunk by chunk (no `(B, T, V)` logits)."""

from __future__ import annotations

import torch


@torch.no_grad()
def token_diagnostics(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_weight: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 256,
) -> dict[str, float]:
    """Mean over counted tokens of the full-vocabulary KL(T||S), student entropy and teacher entropy (nats).

    Shapes: hidden `(B, T, H)`, weights `(V, H)`, mask `(B, T)` bool. Returns {} when no token counts.
    """
    hs, ht = student_hidden[mask], teacher_hidden[mask]
    if hs.shape[0] == 0:
        return {}
    totals = torch.zeros(3, dtype=torch.float64)
    for start in range(0, hs.shape[0], chunk_size):
        s = torch.log_softmax((hs[start : start + chunk_size].float() @ student_weight.float().t()) / temperature, -1)
        t = torch.log_softmax((ht[start : start + chunk_size].float() @ teacher_weight.float().t()) / temperature, -1)
        pt = t.exp()
        totals += torch.stack(
            [(pt * (t - s)).sum(), -(s.exp() * s).sum(), -(pt * t).sum()]
        ).double().cpu()
    mean = totals / hs.shape[0]
    return {"kl_teacher_student": mean[0].item(), "entropy/student": mean[1].item(), "entropy/teacher": mean[2].item()}
