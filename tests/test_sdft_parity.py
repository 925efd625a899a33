"""Where opsd_trl's objective and TRL's `trl.experimental.sdft` (SDFTTrainer) overlap, they agree: pinned against
TRL's own loss functions, values and gradients in float64 (docs/sdft.md states the mapping and the differences).

Mapping: SDFT `distillation_alpha` = opsd_trl `beta` (0: KL(T||S), 1: KL(S||T), between: mixture alpha T +
(1 - alpha) S, the same interpolation); SDFT `full_logits` = `teacher_top_k=None`; SDFT `topk_logits` without the
tail bucket = `teacher_top_k=K` where both pick the same K entries (SDFT's local teacher takes the *student's* top-K,
its vLLM teacher server the *teacher's*, as opsd_trl always does); `jsd_clip=None`; SDFT's reduction (each sample's
mean, then the mean over samples) = `loss_normalization="samples"`; SDFT scales logits by 1 / temperature with no
tau^2 factor, opsd_trl multiplies the generalized JSD by tau^2.
"""

import pytest
import torch
from trl.experimental.sdft.loss_utils import (
    add_tail_bucket,
    compute_divergence,
    compute_full_logit_self_distillation_loss,
    compute_sampled_token_self_distillation_loss,
    compute_topk_self_distillation_loss,
)

from opsd_trl.losses import generalized_jsd, sampled_token_reverse_kl

ALPHAS = [0.0, 0.1, 0.5, 0.9, 1.0]
B, T, V, K = 3, 6, 23, 5


def _logits(seed, scale=2.5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale


def _shared_topk_pair(seed, boost=2.0):
    """Student and teacher logits whose K largest entries are the same vocabulary ids at every position (different
    values and order inside and outside: uniform noise in [0, 1) plus `boost` > 1 on the K ids), so SDFT's student
    top-K support equals opsd_trl's teacher top-K support; a quarter or more of the mass stays off it."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * T)]).view(B, T, K)
    lift = torch.zeros(B, T, V, dtype=torch.float64).scatter(-1, ids, boost)
    return (torch.rand(B, T, V, generator=g, dtype=torch.float64) + lift,
            torch.rand(B, T, V, generator=g, dtype=torch.float64) * 3 + lift * 3)


def _mask():
    m = torch.ones(B, T, dtype=torch.bool)
    m[0, 4:] = False  # completions of different lengths: per-sample and per-token weighting differ
    m[1, 2:] = False
    return m


def sdft_reduce(per_token, mask):
    """SDFTTrainer._compute_self_distillation_loss's reduction, verbatim: per-sample mean, then the batch mean."""
    mask = mask.to(per_token.dtype)
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def _value_and_grad(fn, student):
    student = student.clone().requires_grad_(True)
    loss = fn(student)
    (grad,) = torch.autograd.grad(loss, student)
    return loss.detach(), grad


def _ours(teacher, mask, **kw):
    def fn(student):
        return generalized_jsd(student, teacher, mask=mask, normalization="samples", clip=None, **kw)
    return fn


@pytest.mark.parametrize("alpha", ALPHAS)
def test_full_logits_equals_sdft(alpha):
    s, t, m = _logits(0), _logits(1), _mask()
    ref, ref_grad = _value_and_grad(
        lambda x: sdft_reduce(compute_full_logit_self_distillation_loss(x, t, distillation_alpha=alpha), m), s)
    ours, grad = _value_and_grad(_ours(t, m, beta=alpha, top_k=None), s)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    # Per token too (the per-token values SDFT logs as `self_distillation/distillation_loss`).
    _, per_token = generalized_jsd(s, t, beta=alpha, top_k=None, clip=None, mask=m, return_per_token=True)
    torch.testing.assert_close(per_token[m], compute_full_logit_self_distillation_loss(s, t, distillation_alpha=alpha)[m],
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_topk_on_a_shared_support_equals_sdft(alpha):
    s, t = _shared_topk_pair(3)
    m = _mask()
    ref, ref_grad = _value_and_grad(lambda x: sdft_reduce(compute_topk_self_distillation_loss(
        x, t, distillation_topk=K, distillation_alpha=alpha, distillation_add_tail=False), m), s)
    ours, grad = _value_and_grad(_ours(t, m, beta=alpha, top_k=K), s)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_topk_equals_sdft_teacher_server_support(alpha):
    """SDFT's vLLM teacher-server path distils over the *teacher's* top-K (its inline code in
    `_compute_server_distillation_loss`, re-stated with TRL's own `compute_divergence`): opsd_trl's `teacher_top_k`
    is that support on any logits."""
    s, t, m = _logits(4), _logits(5), _mask()

    def server_path(x):
        top_t, ids = torch.log_softmax(t, -1).topk(K, dim=-1)
        top_s = torch.gather(torch.log_softmax(x, -1), -1, ids)
        top_s = top_s - top_s.logsumexp(-1, keepdim=True)
        top_t = top_t - top_t.logsumexp(-1, keepdim=True)
        return sdft_reduce(compute_divergence(top_s, top_t, alpha), m)

    ref, ref_grad = _value_and_grad(server_path, s)
    ours, grad = _value_and_grad(_ours(t, m, beta=alpha, top_k=K), s)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_sampled_token_equals_sdft():
    s, t, m = _logits(6), _logits(7), _mask()
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(8))
    ref, ref_grad = _value_and_grad(lambda x: sdft_reduce(
        compute_sampled_token_self_distillation_loss(x, t, ids, distillation_alpha=1.0), m), s)
    ours, grad = _value_and_grad(
        lambda x: sampled_token_reverse_kl(x, t, ids, mask=m, normalization="samples"), s)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_temperature_mapping(alpha):
    """SDFT divides both logits by tau before its loss (`_forward_logits`) and adds no factor; opsd_trl takes raw
    logits and multiplies by tau^2 (TRL's GKD / Distillation convention), so ours = tau^2 x SDFT's."""
    s, t, m, tau = _logits(9), _logits(10), _mask(), 0.7
    ref = sdft_reduce(compute_full_logit_self_distillation_loss(s / tau, t / tau, distillation_alpha=alpha), m)
    ours = generalized_jsd(s, t, beta=alpha, top_k=None, clip=None, temperature=tau, mask=m, normalization="samples")
    torch.testing.assert_close(ours, tau**2 * ref, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------- where they differ
def test_support_differs_on_generic_logits():
    """SDFT's local teacher takes the student's top-K, opsd_trl the teacher's (the reference's choice: the teacher's
    likely tokens are what the student should learn to cover). On logits whose top-K sets differ, so do the losses."""
    s, t, m = _logits(11), _logits(12), _mask()
    assert not torch.equal(s.topk(K, -1).indices.sort(-1).values, t.topk(K, -1).indices.sort(-1).values)
    sdft = sdft_reduce(compute_topk_self_distillation_loss(
        s, t, distillation_topk=K, distillation_alpha=0.5, distillation_add_tail=False), m)
    ours = generalized_jsd(s, t, beta=0.5, top_k=K, clip=None, mask=m, normalization="samples")
    assert abs(ours.item() - sdft.item()) > 1e-2


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_tail_bucket_differs_from_renormalised_support(alpha):
    """SDFT's `distillation_add_tail` keeps the mass outside the support as one extra category; opsd_trl (like SDFT's
    default `distillation_add_tail=False`) renormalises on the support. With the support = the whole vocabulary
    the tail is empty and both equal the full-vocabulary divergence; on a strict subset they differ."""
    s, t = _shared_topk_pair(13)
    m = _mask()
    tail = sdft_reduce(compute_topk_self_distillation_loss(
        s, t, distillation_topk=K, distillation_alpha=alpha, distillation_add_tail=True), m)
    ours = generalized_jsd(s, t, beta=alpha, top_k=K, clip=None, mask=m, normalization="samples")
    assert abs(ours.item() - tail.item()) > 1e-4
    # The tail bucket's definition, checked on its own: it completes the support's mass to 1.
    lp = torch.log_softmax(s, -1).topk(K, -1).values
    torch.testing.assert_close(add_tail_bucket(lp).exp().sum(-1), torch.ones(B, T, dtype=torch.float64))
    full = sdft_reduce(compute_topk_self_distillation_loss(
        s, t, distillation_topk=V, distillation_alpha=alpha, distillation_add_tail=False), m)
    torch.testing.assert_close(generalized_jsd(s, t, beta=alpha, top_k=V, clip=None, mask=m, normalization="samples"),
                               full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_per_entry_clip_is_opsd_only(alpha):
    """opsd_trl's `jsd_clip` (the reference's per-entry clamp, default 0.05) has no SDFT counterpart: with it the
    loss is below SDFT's unclipped divergence (every clamped entry only shrinks); `jsd_clip=None` is SDFT's."""
    s, t, m = _logits(14), _logits(15), _mask()
    sdft = sdft_reduce(compute_full_logit_self_distillation_loss(s, t, distillation_alpha=alpha), m)
    clipped = generalized_jsd(s, t, beta=alpha, top_k=None, clip=0.05, mask=m, normalization="samples")
    assert clipped.item() < sdft.item() - 1e-2


def test_token_weighting_differs_from_sdft():
    """opsd_trl's default `loss_normalization="tokens"` (TRL's DistillationTrainer: every completion token of the
    accumulation window weighs the same) differs from SDFT's per-sample mean when completion lengths differ; the
    `"samples"` option is SDFT's reduction (pinned above)."""
    s, t, m = _logits(16), _logits(17), _mask()
    per_token = compute_full_logit_self_distillation_loss(s, t, distillation_alpha=0.5)
    tokens = generalized_jsd(s, t, beta=0.5, top_k=None, clip=None, mask=m)
    torch.testing.assert_close(tokens, per_token[m].mean(), rtol=1e-10, atol=1e-12)
    assert abs(tokens.item() - sdft_reduce(per_token, m).item()) > 1e-3


def test_empty_sample_weighting_differs_from_sdft():
    """A sample with no counted token: SDFT's batch mean still counts it (a 0 in the mean, so the others weigh less);
    opsd_trl's `"samples"` mean is over the samples that have tokens (the reference's)."""
    s, t, m = _logits(18), _logits(19), _mask()
    m[2] = False
    per_token = compute_full_logit_self_distillation_loss(s, t, distillation_alpha=0.5)
    ours = generalized_jsd(s, t, beta=0.5, top_k=None, clip=None, mask=m, normalization="samples")
    torch.testing.assert_close(ours * 2 / 3, sdft_reduce(per_token, m), rtol=1e-10, atol=1e-12)
