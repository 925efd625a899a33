"""BAGEL's sequence layout over a padded `(B, L)` batch: image blocks, RoPE positions, attention mask.

In BAGEL an image enters the sequence as one *block* `<|vision_start|> patch tokens <|vision_end|>`
(`Bagel.prepare_vit_images`, `PackedDataset.pack_sequence`): every token of the block takes the same RoPE
position (the next free one), the text after the block continues at that position + 1, and attention is full
inside the block (split mode "full") and causal everywhere else. Pure functions: the model, the teacher adapter
and the tests share them.
"""

from __future__ import annotations

import torch


def image_blocks(
    input_ids: torch.Tensor, image_mask: torch.Tensor, vision_start_id: int, vision_end_id: int
) -> torch.Tensor:
    """`(B, L)` block index per token: 0 for text, k >= 1 for the k-th image block of the row.

    A block is a run of image (patch) tokens plus the `<|vision_start|>` right before it and the `<|vision_end|>`
    right after it. A `<|vision_start|>` always opens a new block, so two wrapped images never merge; a marker
    that does not touch image tokens (e.g. sampled in a completion) stays text.
    """
    image_mask = image_mask.bool()
    prev_img = torch.nn.functional.pad(image_mask[:, :-1], (1, 0))
    next_img = torch.nn.functional.pad(image_mask[:, 1:], (0, 1))
    is_start = (input_ids == vision_start_id) & next_img
    is_end = (input_ids == vision_end_id) & prev_img
    member = image_mask | is_start | is_end
    prev_member = torch.nn.functional.pad(member[:, :-1], (1, 0))
    opens = is_start | (image_mask & ~prev_member)
    return torch.cumsum(opens.long(), dim=1) * member.long()


def bagel_position_ids(blocks: torch.Tensor, attention_mask: torch.Tensor | None, shared: bool = True) -> torch.Tensor:
    """`(B, L)` 1D RoPE positions from position 0 at the first attended token.

    `shared=True` (BAGEL): a block's tokens share the position of its first token, the next token gets +1.
    `shared=False` (vLLM's port): plain sequential positions. Padding tokens get position 0.
    """
    valid = torch.ones_like(blocks, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    step = valid
    if shared:
        prev = torch.nn.functional.pad(blocks[:, :-1], (1, 0))
        first_of_block = (blocks > 0) & (blocks != prev)
        step = valid & ((blocks == 0) | first_of_block)
    pos = torch.cumsum(step.long(), dim=1) - 1
    return pos.clamp(min=0).masked_fill(~valid, 0)


class LazyBagelMask:
    """The mask of `bagel_attention_mask` without materializing it: `rows(start, end)` builds the
    `(B, 1, end - start, Lk)` slice for queries `start:end`, so attention can run over query chunks with memory
    linear in the sequence length (`BagelConfig.attention_chunk_size`)."""

    def __init__(self, blocks, key_mask, past_length: int = 0, bidirectional: bool = True):
        self.blocks, self.key_mask, self.past, self.bidirectional = blocks, key_mask, past_length, bidirectional

    def rows(self, start: int, end: int) -> torch.Tensor:
        b, lq = self.blocks.shape
        lk = self.past + lq
        dev = self.blocks.device
        q_idx = torch.arange(self.past + start, self.past + end, device=dev)
        k_idx = torch.arange(lk, device=dev)
        allowed = (k_idx[None, :] <= q_idx[:, None]).expand(b, end - start, lk)
        if self.bidirectional:
            key_blocks = torch.nn.functional.pad(self.blocks, (self.past, 0))
            q_blocks = self.blocks[:, start:end, None]
            allowed = allowed | ((q_blocks == key_blocks[:, None, :]) & (q_blocks > 0))
        if self.key_mask is not None:
            allowed = allowed & self.key_mask.bool()[:, None, :]
        allowed = allowed | (k_idx[None, :] == q_idx[:, None])
        return allowed[:, None]


def bagel_attention_mask(
    blocks: torch.Tensor, key_mask: torch.Tensor | None, past_length: int = 0, bidirectional: bool = True
) -> torch.Tensor:
    """Boolean `(B, 1, Lq, Lk)` mask (True = may attend) for queries `blocks` `(B, Lq)` at absolute offsets
    `past_length ...` over `Lk = past_length + Lq` keys, `key_mask` `(B, Lk)` marking non-padding keys.

    Causal, plus (bidirectional) every pair inside one image block. Cached keys are never in a query's block
    (an image block is always encoded in one forward). The diagonal is always allowed so that padding queries
    get a finite (ignored) output instead of NaN.
    """
    b, lq = blocks.shape
    lk = past_length + lq
    q_idx = torch.arange(past_length, lk, device=blocks.device)
    k_idx = torch.arange(lk, device=blocks.device)
    allowed = (k_idx[None, :] <= q_idx[:, None]).expand(b, lq, lk)
    if bidirectional:
        key_blocks = torch.nn.functional.pad(blocks, (past_length, 0))
        same = (blocks[:, :, None] == key_blocks[:, None, :]) & (blocks[:, :, None] > 0)
        allowed = allowed | same
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, :]
    allowed = allowed | (k_idx[None, :] == q_idx[:, None])
    return allowed[:, None]
