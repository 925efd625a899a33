"""Tiny in-code models: tokenizer and chat template, processors without torchvision, generate with an image,
determinism, and the save / load round trip used by launched scripts."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, ProcessorMixin
from trl.data_utils import apply_chat_template as trl_apply_chat_template

from opsd_trl.markers import IMAGE_SKIP_MARKER
from opsd_trl.models.loading import load_pretrained
from opsd_trl.testing.tiny_models import (
    build_tiny_qwen2_5_vl,
    build_tiny_qwen3_vl,
    build_tiny_text_lm,
    build_tiny_tokenizer,
    save_tiny,
)

VL_BUILDERS = pytest.mark.parametrize(
    "builder", [build_tiny_qwen2_5_vl, build_tiny_qwen3_vl], ids=["qwen2_5_vl", "qwen3_vl"]
)
ALL_BUILDERS = pytest.mark.parametrize(
    "builder",
    [build_tiny_text_lm, build_tiny_qwen2_5_vl, build_tiny_qwen3_vl],
    ids=["text_lm", "qwen2_5_vl", "qwen3_vl"],
)
TRICKY_TEXTS = ["héllo  wörld\n\n\tx", "日本語 🙂 123456", f"a{IMAGE_SKIP_MARKER}b <|im_end|> c", "Ａ\u0065\u0301 ﬁ", ""]


def _vl_prompt(processor, text="What colour?", n_images=1):
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


# --- tokenizer -------------------------------------------------------------------------------------------------


def test_tokenizer_special_tokens_and_template():
    tok = build_tiny_tokenizer()
    assert tok.eos_token == tok.pad_token == "<|im_end|>" and tok.eos_token_id == tok.pad_token_id
    assert tok.unk_token is None
    for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|image_pad|>", IMAGE_SKIP_MARKER):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    # The marker is a plain added token: it must survive decoding completions with skip_special_tokens=True.
    ids = tok(f"go {IMAGE_SKIP_MARKER} now<|im_end|>")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == f"go {IMAGE_SKIP_MARKER} now"
    text = tok.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        tokenize=False,
    )
    expected = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    assert text == expected
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_any_text_round_trips(text):
    tok = build_tiny_tokenizer()
    assert tok.decode(tok(text)["input_ids"]) == tok.backend_tokenizer.normalizer.normalize_str(text)


# --- models ----------------------------------------------------------------------------------------------------


@ALL_BUILDERS
def test_builders_are_deterministic_fp32_and_sized_for_vllm(builder):
    model_a, _ = builder(seed=0)
    model_b, _ = builder(seed=0)
    model_c, _ = builder(seed=1)
    sa, sb, sc = model_a.state_dict(), model_b.state_dict(), model_c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].dtype.is_floating_point and sa[k].numel() > 1)
    assert all(p.dtype == torch.float32 for p in model_a.parameters())
    assert sum(p.numel() for p in model_a.parameters()) < 2_000_000
    text = model_a.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    assert head_dim == 32
    rng_state = torch.get_rng_state()
    builder(seed=3)
    assert torch.equal(rng_state, torch.get_rng_state()), "builders must not disturb the caller's RNG"


def test_text_lm_generates(tiny_text_lm):
    model, tok = tiny_text_lm
    assert len(tok) == model.config.vocab_size
    batch = tok.apply_chat_template(
        [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a longer prompt"}]],
        add_generation_prompt=True, return_dict=True, return_tensors="pt", padding=True,
    )  # fmt: skip
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    n = batch["input_ids"].shape[1]
    assert out.shape[0] == 2 and n < out.shape[1] <= n + 5
    assert torch.equal(out[:, :n], batch["input_ids"])


@VL_BUILDERS
def test_processor_without_torchvision(builder, make_tiny_image):
    model, processor = builder()
    assert isinstance(processor, ProcessorMixin)  # what TRL checks to treat the model as a VLM
    assert processor.tokenizer is not None and processor.image_processor is not None
    assert not hasattr(processor, "video_processor")
    assert processor.image_token_id == model.config.image_token_id
    assert len(processor.tokenizer) == model.config.get_text_config().vocab_size
    # Two images of different sizes in a padded batch.
    images = [make_tiny_image(0, (56, 56)), make_tiny_image(1, (100, 60))]
    texts = [_vl_prompt(processor, "a"), _vl_prompt(processor, "a longer question")]
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    merge = processor.image_processor.merge_size**2
    n_expected = (inputs["image_grid_thw"].prod(-1) // merge).tolist()
    n_found = (inputs["input_ids"] == processor.image_token_id).sum(-1).tolist()
    assert n_found == n_expected and all(n >= 4 for n in n_found)
    assert torch.equal(inputs["mm_token_type_ids"], (inputs["input_ids"] == processor.image_token_id).long())
    assert inputs["pixel_values"].shape[0] == int(inputs["image_grid_thw"].prod(-1).sum())
    logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()


@VL_BUILDERS
def test_generate_with_image(builder, tiny_image):
    model, processor = builder()
    inputs = processor(text=[_vl_prompt(processor)], images=[tiny_image], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


@VL_BUILDERS
def test_trl_style_chat_template_calls(builder, tiny_image):
    """The two ways TRL's DistillationTrainer tokenizes VLM prompts with a processor as processing_class."""
    _, processor = builder()
    prompts = [
        [{"role": "user", "content": [{"type": "image", "image": tiny_image}, {"type": "text", "text": "q"}]}],
        [{"role": "user", "content": [{"type": "image", "image": tiny_image}, {"type": "text", "text": "qq"}]}],
    ]
    tokenized = processor.apply_chat_template(
        conversation=prompts, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    first, second = (len(ids) for ids in tokenized["input_ids"])
    assert second == first + 1  # unpadded lists, like TRL expects
    assert {"pixel_values", "image_grid_thw"} <= set(tokenized)
    text = trl_apply_chat_template({"prompt": prompts[0]}, processor)["prompt"]
    assert text.endswith("<|im_start|>assistant\n") and "<|vision_start|><|image_pad|><|vision_end|>" in text


# --- save / load -----------------------------------------------------------------------------------------------


@ALL_BUILDERS
def test_save_load_round_trip(builder, tmp_path, tiny_image):
    model, processing_class = builder()
    save_tiny(model, processing_class, tmp_path / "m")
    loaded, loaded_pc = load_pretrained(tmp_path / "m")
    assert type(loaded) is type(model) and type(loaded_pc) is type(processing_class)
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys() and all(torch.equal(state[k], loaded_state[k]) for k in state)

    tok = getattr(processing_class, "tokenizer", processing_class)
    loaded_tok = getattr(loaded_pc, "tokenizer", loaded_pc)
    # AutoTokenizer is what TRL / users call on a folder; it must tokenize exactly like the builder's tokenizer.
    auto_tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    for text in TRICKY_TEXTS:
        assert loaded_tok(text)["input_ids"] == tok(text)["input_ids"] == auto_tok(text)["input_ids"], text
    assert loaded_tok.chat_template == tok.chat_template and loaded_tok.padding_side == "left"

    if isinstance(processing_class, ProcessorMixin):
        text = _vl_prompt(processing_class)
        inputs = processing_class(text=[text], images=[tiny_image], return_tensors="pt")
        loaded_inputs = loaded_pc(text=[text], images=[tiny_image], return_tensors="pt")
        assert inputs.keys() == loaded_inputs.keys() and all(torch.equal(inputs[k], loaded_inputs[k]) for k in inputs)
    else:
        inputs = tok.apply_chat_template(
            [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
    assert torch.equal(
        model.generate(**inputs, max_new_tokens=4, do_sample=False),
        loaded.generate(**inputs, max_new_tokens=4, do_sample=False),
    )
