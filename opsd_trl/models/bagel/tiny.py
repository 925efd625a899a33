"""A tiny random BAGEL built in code (no downloads), plus save / load of an HF folder.

Sizes: LLM 2 layers x hidden 64 (2 heads of 32, 1 KV head, qk-norm); SigLIP 2 layers x hidden 32, patch 14,
8 x 8 position table; images resized to 28..56 px, so at most 16 tokens per image. Same tokenizer as the other
tiny models (`opsd_trl.models.tiny`), with BAGEL's chat format.
"""

from __future__ import annotations

import os

import torch
from transformers import GenerationConfig

from ..tiny import build_tiny_tokenizer
from .configuration_bagel import BagelConfig
from .modeling_bagel import BagelForConditionalGeneration
from .processing_bagel import CHAT_TEMPLATE, BagelImageProcessor, BagelProcessor


def tiny_bagel_config(tok, **overrides) -> BagelConfig:
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>",
                                                     "<|im_end|>", "<|im_start|>")}
    kwargs = dict(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, rope_theta=10000.0,
                         max_position_embeddings=4096),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=112, patch_size=14),
        vit_max_num_patch_per_side=8,
        image_token_id=ids["<|image_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|im_end|>"],
        bos_token_id=ids["<|im_start|>"],
    )
    kwargs.update(overrides)
    return BagelConfig(**kwargs)


def build_tiny_bagel(seed: int = 0, **overrides) -> tuple[BagelForConditionalGeneration, BagelProcessor]:
    """`(model, processor)`, fp32, eval mode, greedy generation config stopping on `<|im_end|>`."""
    tok = build_tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    config = tiny_bagel_config(tok, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BagelForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id,
        do_sample=False, max_new_tokens=16,
    )
    image_processor = BagelImageProcessor(max_image_size=56, min_image_size=28, patch_size=14, max_pixels=56 * 56)
    return model.float().eval(), BagelProcessor(image_processor, tok, chat_template=CHAT_TEMPLATE)


def save_bagel(model, processor, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def load_bagel(path: str | os.PathLike, **model_kwargs):
    """`(model, processor)` from a folder written by `save_bagel` or `convert_bagel_checkpoint`."""
    model_kwargs.setdefault("dtype", torch.float32)
    model = BagelForConditionalGeneration.from_pretrained(os.fspath(path), **model_kwargs)
    return model.eval(), BagelProcessor.from_pretrained(os.fspath(path))
