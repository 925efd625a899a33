"""The quickstart's policy, `tiny:quickstart`: its word-level tokenizer and its fresh model, built in code from the
tiny-model parts of `opsd_trl.models.tiny` (the quickstart owns it; `models.loading` resolves the `tiny:` name here).
"""

from __future__ import annotations

from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tokenizer_models
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from ..models.tiny import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    TinyQwen2_5_VLProcessor,
    build_tiny_vl,
    tiny_image_processor,
    tiny_text_config,
    tiny_vision_config,
)

__all__ = ["QUICKSTART_VOCAB_SIZE", "QUICKSTART_WORDS", "build_quickstart_model", "build_word_tokenizer"]

# A 0.7M-parameter Qwen2.5-VL with a word-level vocabulary, sized by the feasibility probe (docs/quickstart.md):
# text hidden 128 x 3 layers, vision depth 1, and 28 px maze cells, so each cell is exactly one merged image token
# (patch 14, merge 2). A word-level vocabulary (moves, step numbers, the few prompt words) keeps every answer token a
# single, meaningful prediction. Its weights and context words: `opsd_trl.quickstart.model`.

QUICKSTART_VOCAB_SIZE = 64
# Prompt words of the student ("solve maze answer") and teacher ("hint" VTs "answer") contexts, the moves, and
# step numbers for the numbered answer format "1 R 2 D".
QUICKSTART_WORDS = ["user", "assistant", "system", "solve", "maze", "answer", "hint", "L", "D", "R", "U"]
QUICKSTART_WORDS += [str(i) for i in range(1, 17)]


def build_word_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace-split word-level tokenizer with the Qwen chat specials; unknown words map to <unk>."""
    vocab = {w: i for i, w in enumerate(["<unk>", *SPECIAL_TOKENS, *QUICKSTART_WORDS])}
    core = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # no decoder: decode joins tokens with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        extra_special_tokens=list(SPECIAL_TOKENS),
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
    )


def build_quickstart_model(seed: int = 0) -> tuple[Qwen2_5_VLForConditionalGeneration, TinyQwen2_5_VLProcessor]:
    """The quickstart's fresh `(model, processor)`, fp32, deterministic by seed."""
    tok = build_word_tokenizer()
    model = build_tiny_vl(
        Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, tok, seed,
        text_config={**tiny_text_config(tok, [4, 6, 6]), "vocab_size": QUICKSTART_VOCAB_SIZE, "num_hidden_layers": 3,
                     "max_position_embeddings": 1024},
        vision_config={**tiny_vision_config(14, window_size=56, fullatt_block_indexes=[0]), "depth": 1},
    )
    image_processor = tiny_image_processor(14, [0.5] * 3, [0.5] * 3)
    processor = TinyQwen2_5_VLProcessor(image_processor, tok, chat_template=CHAT_TEMPLATE)
    model.generation_config.max_new_tokens = 16
    for config in (model.config, model.generation_config):  # the tokenizer's specials (else a warning per trainer)
        config.pad_token_id = config.eos_token_id = tok.eos_token_id
        config.bos_token_id = None
    return model, processor
