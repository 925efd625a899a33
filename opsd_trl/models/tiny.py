"""Tiny models built entirely in code (no downloads), the `tiny:` names of `opsd_trl.models.loading`: for the CPU
recipes, tests and benchmarks (the quickstart's own policy, `tiny:quickstart`, is built from these parts by
`opsd_trl.quickstart.policy`).

Every builder returns ``(model, processing_class)`` in fp32, random init, deterministic by ``seed``.
Sizes respect the constraints of the real stack: head_dim 32 (vLLM kernels accept 32/64/...), M-RoPE sections
summing to head_dim / 2, a vision tower with the family's patch size and a 2x2 merge. The Qwen-VL models use the
torchvision-free processors of ``opsd_trl.models.qwen_vl_processors``; a folder written by :func:`save_tiny` loads
with ``opsd_trl.models.loading.load_pretrained``.
"""

from __future__ import annotations

import os

import torch
from tokenizers import AddedToken, pre_tokenizers
from transformers import (
    GenerationConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Tokenizer,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ..markers import IMAGE_SKIP_MARKER
from .qwen_vl_processors import TinyQwen2_5_VLProcessor, TinyQwen3VLProcessor

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "TinyQwen2_5_VLProcessor",
    "TinyQwen3VLProcessor",
    "build_tiny_qwen2_5_vl",
    "build_tiny_qwen3_vl",
    "build_tiny_text_lm",
    "build_tiny_tokenizer",
    "build_tiny_vl",
    "save_tiny",
    "tiny_image_processor",
    "tiny_text_config",
    "tiny_vision_config",
]

# Order fixes the ids (after the 256 byte tokens): <|endoftext|> 256, <|im_start|> 257, <|im_end|> 258, ...
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    IMAGE_SKIP_MARKER,
]

# Qwen2-VL style: an image part becomes <|vision_start|><|image_pad|><|vision_end|>; the processor then expands
# the single <|image_pad|> to one token per merged patch. No default system prompt, to keep sequences short.
CHAT_TEMPLATE = (
    # One line on purpose: no whitespace control needed, so the "\n" after role and <|im_end|> survive.
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer() -> Qwen2Tokenizer:
    """The real ``Qwen2Tokenizer`` class over a tiny vocabulary: 256 byte tokens and no merges (any text encodes,
    one token per byte), then the Qwen specials and :data:`~opsd_trl.markers.IMAGE_SKIP_MARKER` at fixed ids 256...

    Using Qwen2Tokenizer (NFC + Qwen split regex + byte level), not a bare ``PreTrainedTokenizerFast``, matters:
    ``AutoTokenizer`` loads a saved ``qwen2`` folder as Qwen2Tokenizer whatever tokenizer_config says, and a
    different pre-tokenizer would silently change the ids after a save / load round trip.
    eos = pad = ``<|im_end|>``; no unk token (like Qwen). ``<image_start>`` is a single *non-special* added
    token so ``decode(..., skip_special_tokens=True)`` keeps it in completion text.
    """
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 printable stand-ins for raw bytes
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    vocab.update({t: len(byte_chars) + i for i, t in enumerate(SPECIAL_TOKENS)})
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t != IMAGE_SKIP_MARKER],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",  # generation batches pad on the left
        model_max_length=4096,
    )
    tok.add_tokens([AddedToken(IMAGE_SKIP_MARKER, special=False, normalized=False)])  # keeps its vocab id
    return tok


def _token_ids(tok) -> dict:
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return {
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|im_end|>"],
        "bos_token_id": ids["<|endoftext|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


def _finish(model, tok):
    """fp32, eval mode, and a greedy generation config that stops on <|im_end|>."""
    ids = _token_ids(tok)
    model.generation_config = GenerationConfig(
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
        bos_token_id=ids["bos_token_id"],
        do_sample=False,
        max_new_tokens=16,
    )
    return model.float().eval()


def build_tiny_text_lm(seed: int = 0) -> tuple[Qwen2ForCausalLM, Qwen2Tokenizer]:
    """A ~100k-parameter Qwen2 causal LM (hidden 64, 2 layers, 2 heads of dim 32) and its chat tokenizer."""
    tok = build_tiny_tokenizer()
    ids = _token_ids(tok)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
        bos_token_id=ids["bos_token_id"],
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return _finish(model, tok), tok


def tiny_image_processor(patch_size: int, mean: list[float], std: list[float]) -> Qwen2VLImageProcessorPil:
    """The slow PIL Qwen-VL image processor, merge 2."""
    # Resize every image to between 2x2 and 4x4 merged tokens: 4..16 image tokens keep sequences tiny.
    factor = patch_size * 2
    return Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=mean,
        image_std=std,
        size={"shortest_edge": (2 * factor) ** 2, "longest_edge": (4 * factor) ** 2},
    )


def tiny_text_config(tok, mrope_section: list[int], **extra) -> dict:
    """Text config fields of the tiny VLMs: 2 layers x hidden 128, 4 heads (2 KV), the tokenizer's ids."""
    ids = _token_ids(tok)
    return dict(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section, **extra},
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
        bos_token_id=ids["bos_token_id"],
    )


def tiny_vision_config(patch_size: int, **extra) -> dict:
    """2 blocks x hidden 64, merge 2, projected to the text width 128."""
    return dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=patch_size,
                spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=128, **extra)


def build_tiny_vl(config_cls, model_cls, tok, seed: int, text_config: dict, vision_config: dict):
    """A Qwen-VL `model_cls` from text / vision config fields and the tokenizer's special ids, fp32, eval mode."""
    ids = _token_ids(tok)
    config = config_cls(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _finish(model_cls(config), tok)


def build_tiny_qwen2_5_vl(seed: int = 0) -> tuple[Qwen2_5_VLForConditionalGeneration, TinyQwen2_5_VLProcessor]:
    """Tiny Qwen2.5-VL: text 2 layers x hidden 128 (4 heads of 32), vision 2 blocks x hidden 64, patch 14."""
    tok = build_tiny_tokenizer()
    model = build_tiny_vl(
        Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, tok, seed,
        # head_dim 32 -> rotary half-dim 16 split over (t, h, w), like the real 128 -> [16, 24, 24].
        text_config=tiny_text_config(tok, [4, 6, 6]),
        vision_config=tiny_vision_config(14, window_size=56, fullatt_block_indexes=[1]),
    )
    clip_mean, clip_std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    processor = TinyQwen2_5_VLProcessor(tiny_image_processor(14, clip_mean, clip_std), tok, chat_template=CHAT_TEMPLATE)
    return model, processor


def build_tiny_qwen3_vl(seed: int = 0) -> tuple[Qwen3VLForConditionalGeneration, TinyQwen3VLProcessor]:
    """Tiny Qwen3-VL: text 2 layers x hidden 128 (head_dim 32), vision 2 blocks x hidden 64, patch 16,
    deepstack features taken after vision block 0."""
    tok = build_tiny_tokenizer()
    model = build_tiny_vl(
        Qwen3VLConfig, Qwen3VLForConditionalGeneration, tok, seed,
        # Real: head_dim 128 -> [24, 20, 20] interleaved; scaled to head_dim 32.
        text_config={**tiny_text_config(tok, [6, 5, 5], mrope_interleaved=True), "head_dim": 32},
        vision_config=tiny_vision_config(16, num_position_embeddings=256, deepstack_visual_indexes=[0]),
    )
    processor = TinyQwen3VLProcessor(tiny_image_processor(16, [0.5] * 3, [0.5] * 3), tok, chat_template=CHAT_TEMPLATE)
    return model, processor


# --- save ---------------------------------------------------------------------------------------------------


def save_tiny(model, processing_class, path: str | os.PathLike) -> str:
    """Save a model and its tokenizer / processor to ``path`` (a folder), loadable with
    ``opsd_trl.models.loading.load_pretrained``."""
    path = os.fspath(path)
    model.save_pretrained(path)
    processing_class.save_pretrained(path)
    return path
