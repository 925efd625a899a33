"""The backend-independent part of generation: sampling settings, the generator interface, image-skip rounds,
the closing of truncated completions and the ids never to sample."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..markers import IMAGE_SKIP_MARKER


@dataclass
class SamplingSettings:
    """How completions are sampled. `temperature=0` means greedy."""

    max_new_tokens: int = 1024  # total over all rounds, the separators between rounds included
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    image_skip_marker: str | None = IMAGE_SKIP_MARKER  # None disables image-skip rounds
    image_skip_token: str = "<|im_end|>"  # closes the turn before the next round opens
    max_image_skips: int = 1
    eos_token_ids: Sequence[int] | None = None  # None: the model's generation config + the tokenizer's eos
    # Never sampled (e.g. a VLM's image placeholder, which would match no image features in the forward).
    suppress_token_ids: Sequence[int] = ()


@dataclass
class GenerationResult:
    """Per sample: completion ids (rounds concatenated), 1/0 mask of sampled tokens, number of skip rounds."""

    completion_ids: list[list[int]]
    sampled_mask: list[list[int]]  # 1 per token: the separators between rounds are not part of the completion
    num_image_skips: list[int]


Images = list[list[Any] | None] | None  # per sample: list of PIL images, or None


class Generator:
    """The interface the trainer calls. Subclasses implement `_sample` (one round) and `sync_weights`."""

    settings: SamplingSettings
    tokenizer: Any
    eos_token_ids: set[int]

    def generate(self, prompt_ids: list[list[int]], images: Images = None) -> GenerationResult:
        """Sample one completion per student prompt (token ids, image placeholders already expanded)."""
        return run_rounds(
            self._sample, prompt_ids, images, self.settings, self.tokenizer, self.eos_token_ids, self._lockstep
        )

    def sync_weights(self) -> None:
        """Make the generator sample from the policy's current weights (call after each optimizer step)."""

    def _sample(self, prompts: list[list[int]], images: Images, max_new_tokens: int) -> list[list[int]]:
        raise NotImplementedError

    # Returns the max over ranks of the local request count when a round is a collective (every rank must send the
    # same number of requests); None when ranks generate independently.
    _lockstep: Callable[[int], int] | None = None

    def _max_over_ranks(self, n: int) -> int:
        return int(self.accelerator.reduce(torch.tensor([n], device=self.accelerator.device), reduction="max").item())


# --- image-skip rounds (backend independent) ------------------------------------------------------------------


def turn_opening(prompt_ids: Sequence[int], close_id: int) -> list[int]:
    """The tokens after the last `close_id` of a student prompt: how its chat format opens the assistant turn after
    closing the previous one (Qwen: `\\n<|im_start|>assistant\\n`; BAGEL: `<|im_start|>`); empty when the prompt
    never closes a turn (a raw text prompt)."""
    last = max((k for k, t in enumerate(prompt_ids) if t == close_id), default=None)
    return [] if last is None else list(prompt_ids[last + 1 :])


def run_rounds(
    sample: Callable[[list[list[int]], Images, int], list[list[int]]],
    prompt_ids: list[list[int]],
    images: Images,
    settings: SamplingSettings,
    tokenizer,
    eos_token_ids: set[int],
    lockstep: Callable[[int], int] | None = None,
) -> GenerationResult:
    """Drive up to `1 + max_image_skips` rounds of `sample(prompts, images, max_new_tokens) -> token lists`.

    The reference sampler's rule, token for token: a round that ends on EOS, whose text (without that EOS) contains
    `image_skip_marker`, is followed by another round if the budget leaves room for the separator and one sampled
    token. That round's context is the prompt, the text so far, one `image_skip_token` closing the turn, and the
    turn opening of the prompt (`turn_opening`). The completion is the rounds' texts concatenated, without the
    separators and without the EOS of a skipped round: every token of it was sampled. The separators count against
    `max_new_tokens`, as the reference's budget counts its injected `<|im_end|>` and each round's opening token.
    """
    n = len(prompt_ids)
    images = images if images is not None else [None] * n
    completions: list[list[int]] = [[] for _ in range(n)]  # what is scored
    history: list[list[int]] = [[] for _ in range(n)]  # what the policy has seen after the prompt (+ separators)
    skips = [0] * n
    close_id = tokenizer.convert_tokens_to_ids(settings.image_skip_token)
    budget = settings.max_new_tokens
    active = list(range(n))
    for round_idx in range(settings.max_image_skips + 1):
        n_requests = len(active) if lockstep is None else lockstep(len(active))
        if n_requests == 0:
            break  # decided from the global count under lockstep, so all ranks stop together
        # Padding requests keep collective rounds aligned across ranks; their outputs are dropped.
        rows = active + [active[0] if active else 0] * (n_requests - len(active))
        budgets = [budget - len(history[i]) for i in rows]
        outs = sample([list(prompt_ids[i]) + history[i] for i in rows], [images[i] for i in rows], max(budgets))
        next_active = []
        for i, out, room in zip(active, outs, budgets, strict=False):
            out = list(out)[:room]  # one batch-wide max_new_tokens; each sample keeps its own budget
            ends_on_eos = bool(out) and out[-1] in eos_token_ids
            text = out[:-1] if ends_on_eos else out
            separator = [close_id, *turn_opening(prompt_ids[i], close_id)]
            if (
                round_idx < settings.max_image_skips
                and settings.image_skip_marker
                and ends_on_eos
                and room - len(text) - len(separator) >= 1  # the next round can sample at least one token
                and settings.image_skip_marker in tokenizer.decode(text, skip_special_tokens=False)
            ):
                completions[i] += text
                history[i] += text + separator
                skips[i] += 1
                next_active.append(i)
            else:
                completions[i] += out
        active = next_active
    return GenerationResult(completions, [[1] * len(c) for c in completions], skips)


def _eos_ids(settings: SamplingSettings, model, tokenizer) -> set[int]:
    if settings.eos_token_ids is not None:
        return set(settings.eos_token_ids)
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list | tuple) else [gen_eos])
    ids.add(tokenizer.eos_token_id)
    ids.discard(None)
    return ids


def _tokenizer(processing_class):
    return getattr(processing_class, "tokenizer", processing_class)



# --- truncated completions -------------------------------------------------------------------------------------


def closing_token_id(tokenizer, image_skip_token: str, eos_token_ids) -> int:
    """The turn-closing token: `image_skip_token` (`<|im_end|>`) when it is one of the EOS ids, else the EOS."""
    close = tokenizer.convert_tokens_to_ids(image_skip_token)
    return close if close in eos_token_ids else tokenizer.eos_token_id


def close_truncated(completion_ids: list[list[int]], ended: list[bool], close_id: int) -> list[list[int]]:
    """The reference's closing of a completion cut by the budget: its last sampled token gives way to `close_id`,
    scored like a sampled EOS (the reference's sampler drops the last token of a round cut by the budget, and its
    packer ends every completion with `<|im_end|>`). `ended`: per completion, True to keep it as it is."""
    return [ids if e else [*ids[:-1], close_id] for ids, e in zip(completion_ids, ended, strict=True)]


# --- from a TRL config ------------------------------------------------------------------------------------------


def placeholder_token_ids(config) -> list[int]:
    """A VLM config's image / video placeholder ids: never to be sampled (a sampled placeholder would match no
    image features in the student forward)."""
    ids = [getattr(config, k, None) for k in ("image_token_id", "video_token_id")]
    return [i for i in ids if i is not None]
