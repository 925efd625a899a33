"""Per-token teacher-vs-student diagnostics computed from hidden states, chunk by chunk (no `(B, T, V)` logits)."""

from __future__ import annotations

import torch

from .models.head import OutputHead


def full_vocab_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(T||S) over the full vocabulary at each position, in fp32: logits `(..., V)` -> `(...)` nats."""
    t = torch.log_softmax(teacher_logits.float() / temperature, -1)
    s = torch.log_softmax(student_logits.float() / temperature, -1)
    return (t.exp() * (t - s)).sum(-1)


def _entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    log_probs = torch.log_softmax(logits / temperature, -1)
    return -(log_probs.exp() * log_probs).sum(-1)


@torch.no_grad()
def token_diagnostics(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: OutputHead,
    teacher_head: OutputHead,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 256,
) -> dict[str, float]:
    """Mean over counted tokens of the full-vocabulary KL(T||S), student entropy and teacher entropy (nats).

    Shapes: hidden `(B, T, H)`, mask `(B, T)` bool; the heads make the logits in fp32. Returns {} when no token
    counts.
    """
    hs, ht = student_hidden[mask], teacher_hidden[mask]
    if hs.shape[0] == 0:
        return {}
    student_head, teacher_head = student_head.to(torch.float32), teacher_head.to(torch.float32)
    totals = torch.zeros(3, dtype=torch.float64)
    for start in range(0, hs.shape[0], chunk_size):
        s_logits = student_head.logits(hs[start : start + chunk_size].float())
        t_logits = teacher_head.logits(ht[start : start + chunk_size].float())
        kl = full_vocab_kl(t_logits, s_logits, temperature)
        totals += torch.stack(
            [kl.sum(), _entropy(s_logits, temperature).sum(), _entropy(t_logits, temperature).sum()]
        ).double().cpu()
    mean = totals / hs.shape[0]
    return {"kl_teacher_student": mean[0].item(), "entropy/student": mean[1].item(), "entropy/teacher": mean[2].item()}
