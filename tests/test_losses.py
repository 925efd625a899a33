import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from loss_oracles import per_token_divergence

from opsd_trl.losses import divergence_and_grad, generalized_jsd, sampled_token_reverse_kl


def reference_jsd(student, teacher, *, beta, top_k=None, clip=None, temperature=1.0, mask=None):
    """Dense float64 generalized JSD written from the definition with probabilities (not log space), with the
    non-negative per-entry terms (``clip_form="nonnegative"``)."""
    s, t = student.double() / temperature, teacher.double() / temperature
    if top_k is not None:
        idx = t.topk(top_k, dim=-1).indices
        s, t = s.gather(-1, idx), t.gather(-1, idx)
    p_s, p_t = s.softmax(-1), t.softmax(-1)

    def kl(p, q):  # per entry p log(p/q) - p + q: >= 0, sums to KL(p || q) for two distributions
        return torch.xlogy(p, p / q) - p + q

    if beta == 0:
        terms = kl(p_t, p_s)
    elif beta == 1:
        terms = kl(p_s, p_t)
    else:
        m = beta * p_t + (1 - beta) * p_s
        terms = beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
    if clip is not None:
        terms = terms.clamp(max=clip)
    per_token = terms.sum(-1) * temperature**2
    if mask is None:
        mask = torch.ones(per_token.shape, dtype=torch.bool)
    per_token = per_token * mask
    return per_token.sum() / max(int(mask.sum()), 1), per_token


def reference_implementation_jsd(student, teacher, *, beta, top_k, clip, temperature=1.0):
    """The reference implementation's formula, re-stated in float64 for one flat batch of positions ``(N, V)``:
    gather the teacher's top-K, log-softmax both, ``F.kl_div(..., reduction="none", log_target=True)`` entries
    (``exp(target) * (target - input)``), clamp each entry at ``clip``, sum over the entries, times tau^2; returns the
    per-position values."""
    s, t = student.double(), teacher.double()
    if top_k is not None:
        idx = t.topk(top_k, dim=-1).indices
        s, t = s.gather(-1, idx), t.gather(-1, idx)
    s_logp, t_logp = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    if beta == 0.0:
        per_entry = F.kl_div(s_logp, t_logp, reduction="none", log_target=True)
    elif beta == 1.0:
        per_entry = F.kl_div(t_logp, s_logp, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=torch.float64)
        mix = torch.logsumexp(torch.stack([s_logp + torch.log1p(-b), t_logp + torch.log(b)]), dim=0)
        per_entry = beta * F.kl_div(mix, t_logp, reduction="none", log_target=True) + (1 - beta) * F.kl_div(
            mix, s_logp, reduction="none", log_target=True
        )
    if clip is not None:
        per_entry = per_entry.clamp(max=clip)
    return per_entry.sum(-1) * temperature**2


def _logits(*shape, scale=3.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _mask(b, t, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    m = torch.rand(b, t, generator=g) > 0.3
    m[0, 0] = True
    return m


BETAS = [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize(
    "beta,top_k,clip,temperature",
    list(itertools.product(BETAS, [None, 5], [None, 0.05], [1.0])) + [(0.5, 5, 0.05, 2.0), (0.25, None, None, 0.7)],
)
def test_matches_dense_reference(beta, top_k, clip, temperature):
    b, t, v = 2, 7, 19
    s, te, m = _logits(b, t, v, seed=1), _logits(b, t, v, seed=2), _mask(b, t)
    loss, per_token = generalized_jsd(
        s, te, beta=beta, top_k=top_k, clip=clip, temperature=temperature, mask=m, return_per_token=True, chunk_size=3,
        clip_form="nonnegative",
    )
    ref_loss, ref_per_token = reference_jsd(s, te, beta=beta, top_k=top_k, clip=clip, temperature=temperature, mask=m)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(per_token, ref_per_token, rtol=1e-10, atol=1e-12)
    assert loss.dtype == torch.float64


@pytest.mark.parametrize("top_k", [None, 5])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
def test_reference_clip_form_matches_the_reference_formula(beta, temperature, top_k):
    """Default clip form, clip on: per-position values equal the reference implementation's formula (float64)."""
    b, t, v = 2, 7, 19
    s, te, m = _logits(b, t, v, seed=31), _logits(b, t, v, seed=32), _mask(b, t, seed=3)
    _, per_token = generalized_jsd(
        s, te, beta=beta, top_k=top_k, clip=0.05, temperature=temperature, mask=m, return_per_token=True, chunk_size=4
    )
    want = reference_implementation_jsd(
        s[m], te[m], beta=beta, top_k=top_k, clip=0.05, temperature=temperature
    )
    torch.testing.assert_close(per_token[m], want, rtol=1e-10, atol=1e-12)
    # The two forms: identical for 0 < beta < 1, different at the endpoints (negative reference entries).
    _, nonneg = generalized_jsd(s, te, beta=beta, top_k=top_k, clip=0.05, temperature=temperature, mask=m,
                                return_per_token=True, clip_form="nonnegative")
    if 0 < beta < 1:
        torch.testing.assert_close(nonneg, per_token, rtol=1e-10, atol=1e-12)
    else:
        assert (nonneg[m] - per_token[m]).abs().max() > 1e-3


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_clip_forms_agree_without_clip(beta):
    s, te = _logits(2, 5, 13, seed=33), _logits(2, 5, 13, seed=34)
    a = generalized_jsd(s, te, beta=beta, top_k=6, clip_form="reference")
    b = generalized_jsd(s, te, beta=beta, top_k=6, clip_form="nonnegative")
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def reference_sample_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reference's weighting, re-stated: per sample the mean over its counted tokens, then the mean over samples
    with at least one counted token."""
    means = [per_token[i][mask[i]].mean() for i in range(mask.shape[0]) if mask[i].any()]
    return torch.stack(means).mean()


def test_samples_normalization_weighs_every_sample_the_same():
    s, te = _logits(3, 6, 17, seed=35), _logits(3, 6, 17, seed=36)
    m = _mask(3, 6)
    m[1, 1:] = False  # one short sample: token and sample weighting differ
    m[2] = False  # a sample with no counted token carries no weight at all
    loss, per_token = generalized_jsd(s, te, top_k=5, clip=0.05, mask=m, return_per_token=True,
                                      normalization="samples")
    torch.testing.assert_close(loss, reference_sample_mean(per_token, m), rtol=1e-12, atol=1e-12)
    tokens = generalized_jsd(s, te, top_k=5, clip=0.05, mask=m)
    assert abs(loss.item() - tokens.item()) > 1e-3
    # Global sample count given: the sum of the per-sample means over it.
    torch.testing.assert_close(
        generalized_jsd(s, te, top_k=5, clip=0.05, mask=m, normalization="samples", num_items_in_batch=5),
        reference_sample_mean(per_token, m) * 2 / 5,
    )


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 6),
    v=st.integers(2, 40),
    beta=st.sampled_from(BETAS) | st.floats(0.01, 0.99),
    use_top_k=st.booleans(),
    clip=st.none() | st.floats(0.001, 0.5),
    temperature=st.floats(0.3, 3.0),
    chunk_size=st.integers(1, 8),
    seed=st.integers(0, 1000),
)
def test_hypothesis_matches_reference(b, t, v, beta, use_top_k, clip, temperature, chunk_size, seed):
    top_k = max(1, v // 3) if use_top_k else None
    s, te, m = _logits(b, t, v, seed=seed), _logits(b, t, v, seed=seed + 7), _mask(b, t, seed)
    loss, per_token = generalized_jsd(
        s,
        te,
        beta=beta,
        top_k=top_k,
        clip=clip,
        temperature=temperature,
        mask=m,
        return_per_token=True,
        chunk_size=chunk_size,
        clip_form="nonnegative",
    )
    ref_loss, ref_per_token = reference_jsd(s, te, beta=beta, top_k=top_k, clip=clip, temperature=temperature, mask=m)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(per_token, ref_per_token, rtol=1e-9, atol=1e-11)
    assert bool((per_token[~m] == 0).all())


def test_beta_endpoints_are_direct_kls():
    s, te = _logits(2, 5, 11, seed=3), _logits(2, 5, 11, seed=4)
    log_s, log_t = s.log_softmax(-1), te.log_softmax(-1)
    kl_t_s = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    kl_s_t = (log_s.exp() * (log_s - log_t)).sum(-1).mean()
    torch.testing.assert_close(generalized_jsd(s, te, beta=0.0), kl_t_s)
    torch.testing.assert_close(generalized_jsd(s, te, beta=1.0), kl_s_t)
    assert not torch.allclose(kl_t_s, kl_s_t)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_matches_trl_generalized_jsd(beta):
    from trl.experimental.gkd import GKDTrainer

    s, te, m = (
        _logits(2, 6, 23, seed=5, dtype=torch.float32),
        _logits(2, 6, 23, seed=6, dtype=torch.float32),
        _mask(2, 6),
    )
    labels = torch.where(m, 1, -100)
    trl_loss = GKDTrainer.generalized_jsd_loss(s, te, labels=labels, beta=beta)
    torch.testing.assert_close(generalized_jsd(s, te, beta=beta, mask=m), trl_loss, rtol=1e-5, atol=1e-6)
    trl_sum = GKDTrainer.generalized_jsd_loss(s, te, labels=labels, beta=beta, num_items_in_batch=17)
    torch.testing.assert_close(generalized_jsd(s, te, beta=beta, mask=m, num_items_in_batch=17), trl_sum)


@pytest.mark.parametrize("top_k,clip", [(None, None), (4, None), (None, 0.02), (4, 0.02)])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gradcheck_float64(beta, top_k, clip):
    s = _logits(2, 3, 9, seed=8, scale=1.0).requires_grad_()
    te, m = _logits(2, 3, 9, seed=9, scale=1.0), _mask(2, 3)
    weights = _logits(2, 3, seed=10)

    def fn(x):
        loss, per_token = generalized_jsd(
            x, te, beta=beta, top_k=top_k, clip=clip, temperature=1.3, mask=m, return_per_token=True, chunk_size=2
        )
        return loss, (per_token * weights).sum()  # a non-uniform upstream gradient on the per-token values

    assert torch.autograd.gradcheck(fn, (s,))


def test_gradient_only_to_student_and_not_to_masked_positions():
    s = _logits(2, 5, 13, seed=11).requires_grad_()
    te = _logits(2, 5, 13, seed=12).requires_grad_()
    m = _mask(2, 5)
    generalized_jsd(s, te, top_k=4, clip=0.05, mask=m).backward()
    assert te.grad is None
    assert bool((s.grad[~m] == 0).all()) and bool((s.grad[m] != 0).any())
    # Garbage (even NaN) at uncounted positions changes nothing.
    s2, te2 = s.detach().clone(), te.detach().clone()
    s2[~m], te2[~m] = math.nan, math.nan
    torch.testing.assert_close(
        generalized_jsd(s2, te2, top_k=4, clip=0.05, mask=m), generalized_jsd(s, te, top_k=4, clip=0.05, mask=m)
    )


@pytest.mark.parametrize("normalization", ["tokens", "samples"])
@pytest.mark.parametrize("fn", ["jsd", "rkl"])
def test_gradient_accumulation_invariance(fn, normalization):
    s, te = _logits(2, 6, 17, seed=13), _logits(2, 6, 17, seed=14)
    ids = torch.randint(0, 17, (2, 6), generator=torch.Generator().manual_seed(0))
    m = _mask(2, 6)
    m[1, :2] = False  # unequal token counts per sample: mean-of-means would differ

    def loss(sl, sel, n=None):
        kw = dict(mask=m[sel], num_items_in_batch=n, normalization=normalization)
        if fn == "jsd":
            return generalized_jsd(sl, te[sel], beta=0.5, top_k=5, clip=0.05, **kw)
        return sampled_token_reverse_kl(sl, te[sel], ids[sel], **kw)

    full = s.clone().requires_grad_()
    loss(full, slice(0, 2)).backward()
    micro = s.clone().requires_grad_()
    n = int(m.sum()) if normalization == "tokens" else 2
    for i in range(2):
        loss(micro[i : i + 1], slice(i, i + 1), n).backward()
    torch.testing.assert_close(micro.grad, full.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("top_k", [None, 6])
def test_no_nan_with_masked_vocab_extreme_logits_single_token(dtype, beta, top_k):
    s, te = _logits(1, 4, 20, seed=15, dtype=torch.float32), _logits(1, 4, 20, seed=16, dtype=torch.float32)
    s[..., :8], te[..., :8] = -math.inf, -math.inf  # masked vocabulary: more masked entries than top-K can avoid
    s[0, 1, 10], te[0, 1, 11] = 1e4, -1e4
    s[0, 2, 12], te[0, 2, 12] = -1e4, 1e4
    for mask in (None, torch.tensor([[False, False, True, False]])):
        x = s.to(dtype).requires_grad_()
        loss = generalized_jsd(x, te.to(dtype), beta=beta, top_k=top_k, clip=0.05, mask=mask)
        loss.backward()
        assert torch.isfinite(loss) and bool(torch.isfinite(x.grad).all())
    top_all_masked = torch.full((1, 1, 20), -math.inf)
    top_all_masked[..., 0] = 0.0
    x = top_all_masked.clone().requires_grad_()
    loss = generalized_jsd(x, top_all_masked, beta=beta, top_k=5)  # 4 of the top-5 entries are -inf
    loss.backward()
    assert loss.item() == 0.0 and bool(torch.isfinite(x.grad).all())


def test_all_false_mask_returns_connected_zero():
    s = _logits(2, 3, 7, seed=17).requires_grad_()
    te, m = _logits(2, 3, 7, seed=18), torch.zeros(2, 3, dtype=torch.bool)
    for loss in (
        generalized_jsd(s, te, top_k=3, mask=m),
        generalized_jsd(s, te, mask=m, num_items_in_batch=4),
        sampled_token_reverse_kl(s, te, torch.zeros(2, 3, dtype=torch.long), mask=m),
    ):
        loss.backward()
        assert loss.item() == 0.0 and bool((s.grad == 0).all())


def test_bf16_upcast_close_to_fp32():
    s, te = _logits(2, 9, 50, seed=19, dtype=torch.float32), _logits(2, 9, 50, seed=20, dtype=torch.float32)
    s16, te16 = s.bfloat16().requires_grad_(), te.bfloat16()
    loss16 = generalized_jsd(s16, te16, top_k=10, clip=0.05)
    loss16.backward()
    assert loss16.dtype == torch.float32 and s16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss16, generalized_jsd(s16.float(), te16.float(), top_k=10, clip=0.05))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"beta": -0.1}, "beta"),
        ({"beta": 1.5}, "beta"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 8}, "top_k"),
        ({"clip": 0.0}, "clip"),
        ({"temperature": 0.0}, "temperature"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"num_items_in_batch": 0}, "num_items_in_batch"),
        ({"clip_form": "positive"}, "clip_form must be one of"),
        ({"normalization": "sequence"}, "normalization must be one of"),
        ({"mask": torch.ones(2, 4, dtype=torch.bool)}, r"mask.*\(2, 3\)"),
        ({"mask": torch.ones(2, 3)}, "mask.*bool"),
    ],
)
def test_argument_errors_name_the_argument(kwargs, match):
    s, te = _logits(2, 3, 7), _logits(2, 3, 7)
    with pytest.raises(ValueError, match=match):
        generalized_jsd(s, te, **kwargs)


def test_shape_mismatch_names_the_dims():
    with pytest.raises(ValueError, match="V: student 7 vs teacher 8"):
        generalized_jsd(_logits(2, 3, 7), _logits(2, 3, 8))
    with pytest.raises(ValueError, match="T: student 3 vs teacher 4"):
        generalized_jsd(_logits(2, 3, 7), _logits(2, 4, 7))
    with pytest.raises(ValueError, match="student_logits must have shape"):
        generalized_jsd(_logits(3, 7), _logits(3, 7))
    with pytest.raises(ValueError, match="completion_ids"):
        sampled_token_reverse_kl(_logits(2, 3, 7), _logits(2, 3, 7), torch.zeros(2, 4, dtype=torch.long))


def test_sampled_token_reverse_kl_value_and_gradient():
    s = _logits(2, 5, 11, seed=21).requires_grad_()
    te, m = _logits(2, 5, 11, seed=22), _mask(2, 5)
    ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    tau = 1.5
    loss, per_token = sampled_token_reverse_kl(s, te, ids, temperature=tau, mask=m, return_per_token=True, chunk_size=3)
    loss.backward()
    lp_s = (s.detach() / tau).log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    lp_t = (te / tau).log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    advantage = (lp_t - lp_s) * m
    torch.testing.assert_close(per_token, -advantage * lp_s)
    # d/ds of -A * log p_S(y) = -A * (onehot(y) - softmax(s / tau)) / tau, averaged over counted tokens
    expected = -advantage[..., None] * (F.one_hot(ids, 11) - (s.detach() / tau).softmax(-1)) / tau / m.sum()
    torch.testing.assert_close(s.grad, expected)


@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("clip_form", ["reference", "nonnegative"])
@pytest.mark.parametrize("clip", [None, 0.05, 0.01])
@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
def test_closed_form_gradient_matches_autograd(beta, clip, clip_form, temperature):
    """divergence_and_grad against autograd through the definition (per_token_divergence), float64, with a masked
    vocabulary entry absent from both and one absent from the student only (its teacher mass is 0 at beta 0)."""
    g = torch.Generator().manual_seed(21)
    student = torch.randn(6, 11, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(6, 11, generator=g, dtype=torch.float64) * 2
    student[0, 3] = teacher[0, 3] = -math.inf
    student[1, 2] = -math.inf if beta > 0 else 0.0
    teacher_log_probs = torch.log_softmax(teacher / temperature, dim=-1)
    weights = torch.randn(6, generator=g, dtype=torch.float64)
    leaf = student.clone().requires_grad_()
    values = per_token_divergence(
        torch.log_softmax(leaf / temperature, dim=-1), teacher_log_probs, beta=beta, clip=clip, clip_form=clip_form
    ) * temperature**2
    (want,) = torch.autograd.grad((values * weights).sum(), leaf)
    got_values, got = divergence_and_grad(
        student.clone(), teacher_log_probs.clone(), beta=beta, clip=clip, temperature=temperature, clip_form=clip_form
    )
    torch.testing.assert_close(got_values, values.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got * weights[:, None], want, rtol=1e-10, atol=1e-12)
