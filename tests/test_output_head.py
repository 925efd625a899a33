"""The output head is defined once (`opsd_trl.models.head.OutputHead`): on a Granite-style head, which divides its
logits by `logits_scaling`, the loss (fused and logits paths), the logged KL and the eval KL equal a dense reference
from the model's own forward logits."""

import pytest
import torch
from trainer_utils import generation_batch, make_trainer, text_dataset
from transformers import GenerationConfig, GraniteConfig, GraniteForCausalLM

from opsd_trl.diagnostics import full_vocab_kl
from opsd_trl.eval import Contexts, completion_logits
from opsd_trl.losses import generalized_jsd
from opsd_trl.models.head import OutputHead, logit_scale
from opsd_trl.testing.tiny_models import build_tiny_tokenizer

SCALING = 0.5  # Granite: logits / logits_scaling (here doubled, for distributions far from uniform)


def _tiny_granite():
    tok = build_tiny_tokenizer()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    config = GraniteConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                           logits_scaling=SCALING, initializer_range=0.2, tie_word_embeddings=True, eos_token_id=eos, pad_token_id=eos,
                           bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"))
    torch.manual_seed(0)
    model = GraniteForCausalLM(config).float().eval()
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos, do_sample=False)
    return model, tok


def _forward_logits(model, prompt_ids, completion):
    """The model's own logits predicting each completion token after `prompt_ids` (one unpadded sequence)."""
    ids = torch.tensor([list(prompt_ids) + completion.tolist()])
    with torch.no_grad():
        return model(input_ids=ids).logits[0, -len(completion) - 1 : -1]


def _dense_kl(teacher_logits, student_logits):
    """Mean over positions of sum_v p_T(v) (log p_T(v) - log p_S(v)), tau = 1."""
    t, s = torch.log_softmax(teacher_logits.double(), -1), torch.log_softmax(student_logits.double(), -1)
    return (t.exp() * (t - s)).sum(-1).mean().item()


def test_logit_scale_follows_trls_fields():
    config = GraniteConfig(logits_scaling=SCALING)
    assert logit_scale(config) == 1 / SCALING
    config.logit_scale = 0.5  # a multiplier takes precedence, as in TRL's `_compute_loss`
    assert logit_scale(config) == 0.5


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "logits"])
def test_scaled_head_loss_logged_and_eval_kl_match_the_models_logits(fused, tmp_path):
    model, tok = _tiny_granite()
    assert OutputHead.of(model).scale == 1 / SCALING
    dataset = text_dataset(n=2)
    trainer = make_trainer(model, tok, dataset, tmp_path, teacher_mode="self", fused_loss=fused, jsd_clip=0.05)
    batch = generation_batch(trainer, dataset)
    trainer.model.eval()  # an eval-mode loss logs the diagnostics too
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    assert trainer._fuse_ok is fused  # the scaled head goes through the fused kernel

    mask = batch["completion_mask"].bool()
    b_size, c = mask.shape
    ref_t = torch.zeros(b_size, c, len(tok))
    ref_s = torch.zeros(b_size, c, len(tok))
    completions = []
    for b in range(b_size):
        comp = batch["completion_ids"][b][mask[b]]
        completions.append(comp.tolist())
        ref_t[b, : len(comp)] = _forward_logits(model, batch["teacher_prompt_ids"][b], comp)
        student_prompt = batch["prompt_ids"][b][batch["prompt_mask"][b].bool()]
        ref_s[b, : len(comp)] = _forward_logits(model, student_prompt.tolist(), comp)
    args = trainer.args
    ref_loss = generalized_jsd(ref_s, ref_t, beta=args.beta, top_k=args.teacher_top_k, clip=args.jsd_clip,
                               clip_form=args.jsd_clip_form, temperature=args.temperature, mask=mask)
    torch.testing.assert_close(loss, ref_loss, atol=1e-9, rtol=1e-5)

    ref_kl = _dense_kl(ref_t[mask], ref_s[mask])
    assert trainer._metrics["eval"]["kl_teacher_student"][-1] == pytest.approx(ref_kl, rel=1e-5, abs=1e-9)

    # eval: the same completions after eval's own teacher and student contexts (the trainer's, tested elsewhere)
    rows = [dataset[list(dataset["id"]).index(i)] for i in batch["sample_ids"]]
    contexts = Contexts(tok, intro=args.teacher_intro, transition=args.teacher_transition)
    t_logits, eval_mask = completion_logits(model, contexts, rows, completions, teacher=True)
    s_logits, _ = completion_logits(model, contexts, rows, completions, teacher=False)  # what `evaluate` uses
    torch.testing.assert_close(t_logits[eval_mask], ref_t[mask], atol=1e-4, rtol=1e-4)
    eval_kl = full_vocab_kl(t_logits[eval_mask], s_logits[eval_mask]).mean().item()
    assert eval_kl == pytest.approx(ref_kl, rel=1e-5, abs=1e-9)
