"""Building the teacher context: student context + intro + visual thoughts + transition (pure helpers).

The visual thoughts are appended to the last user turn, so the teacher sees
`[system, problem image, question, INTRO, VT_1 .. VT_k, TRANSITION]` and then the assistant header, exactly where
the student sees `[system, problem image, question]` and the assistant header. The completion ids that follow are
the student's, unchanged.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

# Stands for one soft-prefix VT while rendering a text-only chat template; never reaches the tokenizer.
_VT_SENTINEL = "\x00opsd-vt\x00"


@dataclass
class TeacherPrompt:
    """One sample's teacher prompt: token ids and which positions take precomputed embeddings (slots)."""

    input_ids: list[int]
    slot_mask: list[bool]


def _with_content_list(message: dict) -> dict:
    content = message["content"]
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    return {**message, "content": list(content)}


def teacher_messages(messages: list[dict], *, n_vt: int, intro: str, transition: str, vt_text: str | None = None,
                     as_images: bool = True) -> list[dict]:
    """Return a copy of the student `messages` with the privileged context appended to the last user turn.

    `as_images=True` inserts `{"type": "image"}` parts (VLMs); otherwise a sentinel per VT (text LMs, resolved by
    `tokenize_teacher_prompt`). `vt_text` (text LMs) is inserted as plain text instead of slots.
    """
    messages = copy.deepcopy(messages)
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        raise ValueError("the prompt has no user message to attach the visual thoughts to.")
    if as_images:
        msg = _with_content_list(messages[last_user])
        msg["content"] += [{"type": "text", "text": intro}]
        msg["content"] += [{"type": "image"} for _ in range(n_vt)]
        msg["content"] += [{"type": "text", "text": transition}]
    else:
        msg = dict(messages[last_user])
        content = msg["content"]
        if not isinstance(content, str):
            content = "".join(part.get("text", "") for part in content)
        middle = vt_text if vt_text is not None else _VT_SENTINEL * n_vt
        msg["content"] = f"{content}\n\n{intro}\n{middle}\n{transition}"
    messages[last_user] = msg
    return messages


def expand_image_tokens(text: str, image_token: str, tokens_per_image: list[int]) -> str:
    """Repeat the i-th `image_token` in `text` `tokens_per_image[i]` times (what a Qwen-VL processor does)."""
    parts = text.split(image_token)
    if len(parts) - 1 != len(tokens_per_image):
        raise ValueError(
            f"the rendered prompt has {len(parts) - 1} image placeholders but {len(tokens_per_image)} images."
        )
    out = [parts[0]]
    for n, part in zip(tokens_per_image, parts[1:], strict=True):
        out.append(image_token * n + part)
    return "".join(out)


def tokenize_teacher_prompt(
    text: str, tokenizer, *, image_token: str | None = None, tokens_per_slot: list[int], placeholder_id: int
) -> TeacherPrompt:
    """Tokenize a rendered teacher prompt and mark its slots.

    VLMs (`image_token` given): each image placeholder is expanded to its feature count; slots = those tokens.
    Text LMs: each VT sentinel becomes `tokens_per_slot[i]` copies of `placeholder_id`, the text between sentinels is
    tokenized piecewise (the sentinels are where the soft prefix goes, so no merge crosses them).
    """
    if image_token is not None:
        ids = tokenizer(expand_image_tokens(text, image_token, tokens_per_slot), add_special_tokens=False)["input_ids"]
        token_id = tokenizer.convert_tokens_to_ids(image_token)
        return TeacherPrompt(ids, [i == token_id for i in ids])
    pieces = text.split(_VT_SENTINEL)
    if len(pieces) - 1 != len(tokens_per_slot):
        raise ValueError(f"{len(pieces) - 1} VT slots in the prompt but {len(tokens_per_slot)} VT embeddings.")
    ids: list[int] = []
    mask: list[bool] = []
    for i, piece in enumerate(pieces):
        piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
        ids += piece_ids
        mask += [False] * len(piece_ids)
        if i < len(tokens_per_slot):
            ids += [placeholder_id] * tokens_per_slot[i]
            mask += [True] * tokens_per_slot[i]
    return TeacherPrompt(ids, mask)
