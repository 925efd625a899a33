import itertools

import pytest
import torch

from opsd_trl.fused_loss import fused_generalized_jsd, unfusable_reason
from opsd_trl.losses import generalized_jsd


def _randn(*shape, seed, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _case(dtype, *, b=2, t=5, h=8, v=29, untied=False, seed=0):
    hs = _randn(b, t, h, seed=seed, dtype=dtype, scale=1.5)
    ht = _randn(b, t, h + 2 if untied else h, seed=seed + 1, dtype=dtype, scale=1.5)
    w = _randn(v, h, seed=seed + 2, dtype=dtype)
    wt = _randn(v, h + 2, seed=seed + 3, dtype=dtype) if untied else None
    g = torch.Generator().manual_seed(seed + 4)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[0, 0] = True
    weights = _randn(b, t, seed=seed + 5, dtype=dtype)  # non-uniform upstream gradient on per-token values
    return hs, ht, w, wt, mask, weights


def _run(fused, hs, ht, w, wt, mask, weights, per_token_grad=True, **kw):
    hs, w = hs.clone().requires_grad_(), w.clone().requires_grad_()
    if fused:
        loss, per_token = fused_generalized_jsd(
            hs, ht, w, teacher_lm_head_weight=wt, mask=mask, return_per_token=True, chunk_size=3, **kw
        )
    else:
        teacher_logits = ht @ (w if wt is None else wt).detach().T
        loss, per_token = generalized_jsd(hs @ w.T, teacher_logits, mask=mask, return_per_token=True, **kw)
    # The loss alone takes the gradient formed during forward; weighting the per-token values too takes the recompute.
    (loss + (per_token * weights).sum() if per_token_grad else loss).backward()
    return loss.detach(), per_token.detach(), hs.grad, w.grad


SETTINGS = [
    dict(beta=beta, top_k=top_k, clip=clip, temperature=tau)
    for beta, top_k, clip, tau in itertools.product([0.0, 0.5, 1.0], [None, 5], [None, 0.05], [1.0])
] + [
    dict(beta=0.25, top_k=7, clip=0.02, temperature=1.7),
    dict(beta=0.75, top_k=None, clip=None, temperature=0.6),
    *[dict(beta=beta, top_k=top_k, clip=0.05, temperature=1.0, clip_form="nonnegative")
      for beta, top_k in itertools.product([0.0, 1.0], [None, 5])],
    dict(beta=0.0, top_k=5, clip=0.05, temperature=1.0, normalization="samples"),
    dict(beta=0.5, top_k=None, clip=None, temperature=1.0, normalization="samples", clip_form="nonnegative"),
]


@pytest.mark.parametrize("per_token_grad", [False, True], ids=["loss", "loss+per_token"])
@pytest.mark.parametrize("untied", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("kw", SETTINGS, ids=str)
def test_matches_logits_path_values_and_grads(kw, dtype, tol, untied, per_token_grad):
    case = _case(dtype, untied=untied, seed=3)
    fused = _run(True, *case, per_token_grad=per_token_grad, **kw)
    reference = _run(False, *case, per_token_grad=per_token_grad, **kw)
    for got, want in zip(fused, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert bool((fused[2][~case[4]] == 0).all())  # uncounted positions get no gradient


def test_num_items_in_batch_and_all_false_mask():
    hs, ht, w, _, mask, _ = _case(torch.float64, seed=5)
    kw = dict(beta=0.5, top_k=4, clip=0.05)
    torch.testing.assert_close(
        fused_generalized_jsd(hs, ht, w, mask=mask, num_items_in_batch=11, **kw),
        generalized_jsd(hs @ w.T, ht @ w.T, mask=mask, num_items_in_batch=11, **kw),
    )
    for top_k in (None, 4):
        hs_, w_ = hs.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fused_generalized_jsd(hs_, ht, w_, mask=torch.zeros_like(mask), top_k=top_k)
        loss.backward()
        assert loss.item() == 0.0 and bool((hs_.grad == 0).all()) and bool((w_.grad == 0).all())


@pytest.mark.parametrize("top_k", [None, 4])
def test_second_backward_and_frozen_head(top_k):
    """retain_graph: a second backward gives the same gradients (the first one consumed the forward's buffers);
    a frozen head gets no gradient and the hidden-state gradient is unchanged."""
    hs, ht, w, _, mask, _ = _case(torch.float64, seed=8)
    hs, w = hs.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fused_generalized_jsd(hs, ht, w, mask=mask, top_k=top_k, clip=0.05, normalization="samples", chunk_size=3)
    loss.backward(retain_graph=True)
    first = hs.grad.clone(), w.grad.clone()
    hs.grad, w.grad = None, None
    (2 * loss).backward()
    torch.testing.assert_close((hs.grad, w.grad), (2 * first[0], 2 * first[1]), rtol=1e-12, atol=1e-14)
    hs.grad = None
    fused_generalized_jsd(hs, ht, w.detach(), mask=mask, top_k=top_k, clip=0.05, normalization="samples",
                          chunk_size=3).backward()
    torch.testing.assert_close(hs.grad, first[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("top_k", [None, 3])
def test_gradcheck_float64(top_k):
    hs, ht, w, _, mask, weights = _case(torch.float64, b=1, t=4, h=3, v=7, seed=7)
    teacher_weight = w.clone()  # gradcheck perturbs w in place; the teacher's head must stay fixed

    def fn(hs_, w_):
        loss, per_token = fused_generalized_jsd(
            hs_,
            ht,
            w_,
            teacher_lm_head_weight=teacher_weight,
            mask=mask,
            beta=0.5,
            top_k=top_k,
            clip=0.3,
            temperature=1.2,
            return_per_token=True,
            chunk_size=2,
        )
        return loss + (per_token * weights).sum()

    assert torch.autograd.gradcheck(fn, (hs.clone().requires_grad_(), w.clone().requires_grad_()))


@pytest.mark.parametrize("top_k", [None, 6])
def test_tied_embeddings_gradient(top_k):
    """lm_head tied to the input embedding: the loss gradient adds to the embedding's own use, as with logits."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(31, 8).double()
    ids = torch.randint(0, 31, (2, 6))
    mask = torch.rand(2, 6) > 0.2
    mask[0, 0] = True
    teacher_hidden = torch.randn(2, 6, 8, dtype=torch.float64)
    grads = []
    for fused in (True, False):
        emb.zero_grad()
        hidden = torch.tanh(emb(ids))  # stands in for the backbone
        weight = emb.weight
        if fused:
            loss = fused_generalized_jsd(hidden, teacher_hidden, weight, mask=mask, top_k=top_k, clip=0.05)
        else:
            loss = generalized_jsd(
                hidden @ weight.T, teacher_hidden @ weight.detach().T, mask=mask, top_k=top_k, clip=0.05
            )
        loss.backward()
        grads.append(emb.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_teacher_gets_no_gradient():
    hs, ht, w, wt, mask, _ = _case(torch.float64, untied=True, seed=9)
    ht, wt = ht.clone().requires_grad_(), wt.clone().requires_grad_()
    fused_generalized_jsd(hs.requires_grad_(), ht, w, teacher_lm_head_weight=wt, mask=mask, top_k=5).backward()
    assert ht.grad is None and wt.grad is None and hs.grad is not None


def test_bf16_inputs():
    hs, ht, w, _, mask, _ = _case(torch.bfloat16, seed=11, v=64)
    w = w.requires_grad_()
    loss = fused_generalized_jsd(hs, ht, w, mask=mask, top_k=8, clip=0.05)
    loss.backward()
    assert loss.dtype == torch.float32 and w.grad.dtype == torch.bfloat16 and torch.isfinite(w.grad.float()).all()
    ref = generalized_jsd(
        (hs.float() @ w.detach().float().T), ht.float() @ w.detach().float().T, mask=mask, top_k=8, clip=0.05
    )
    torch.testing.assert_close(loss, ref, rtol=0.05, atol=1e-3)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"lm_head_weight": torch.zeros(29, 7)}, r"lm_head_weight must have shape \(V, H=8\)"),
        ({"teacher_hidden": torch.zeros(2, 4, 8)}, "equal \\(B, T\\)"),
        ({"teacher_lm_head_weight": torch.zeros(30, 8)}, "teacher_lm_head_weight"),
        ({"top_k": 30}, "top_k"),
        ({"beta": 2.0}, "beta"),
        ({"clip": -1.0}, "clip"),
        ({"clip_form": "x"}, "clip_form"),
        ({"normalization": "x"}, "normalization"),
        ({"mask": torch.ones(2, 5)}, "mask"),
    ],
)
def test_argument_errors(change, match):
    hs, ht, w, _, _, _ = _case(torch.float32, seed=13)
    args = dict(student_hidden=hs, teacher_hidden=ht, lm_head_weight=w) | change
    positional = [args.pop(k) for k in ("student_hidden", "teacher_hidden", "lm_head_weight")]
    with pytest.raises(ValueError, match=match):
        fused_generalized_jsd(*positional, **args)


def test_unfusable_reason():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    assert unfusable_reason(model) is None
    config.final_logit_softcapping = 30.0
    assert "softcapping" in unfusable_reason(model)
    config.final_logit_softcapping = None
    config.logit_scale = 0.5  # a logit scale goes through the fused path (its `logit_scale`)
    assert unfusable_reason(model) is None
    config.logit_scale = None
    model.lm_head = torch.nn.Linear(16, 32, bias=True)
    assert "bias" in unfusable_reason(model)
