"""The teacher context: student context + intro + visual thoughts + transition. One builder for training and eval.

The visual thoughts are appended to the last user turn, so the teacher sees
`[system, problem image, question, INTRO, VT_1 .. VT_k, TRANSITION]` and then the assistant header, exactly where
the student sees `[system, problem image, question]` and the assistant header. The completion ids that follow are
the student's, unchanged.

- `TeacherContext`: per sample, its VTs (cached features or VT pixels, at most `max_vt_images`) and its teacher
  prompt (rendered with the processing class's chat template and `chat_template_kwargs`, slots marked); at forward
  time, the slot features in row-major order (problem images, then VTs), with the noise-VT control. Used by
  `VisualOPSDTrainer` and `opsd_trl.eval.Contexts`.
- Pure helpers: `teacher_messages` (the message edit), `privileged_messages` (SDFT's template edit, for a sample
  with a `privileged_context` text), `tokenize_teacher_prompt` (ids + slot mask).

A sample with a `privileged_context` (TRL SDFTTrainer's contract) gets it as SDFT's `DemonstrationTeacherContextBuilder`
places it: the text of the last user turn becomes `teacher_prompt_template.format(prompt=..., privileged_context=...)`
(a plain-text prompt: the whole prompt, tokenized without a chat template, as TRL tokenizes it for the student); VTs,
when the sample has them too, follow as above.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from trl.data_utils import prepare_multimodal_messages
from trl.trainer.utils import pad

from .data import (
    PROMPT_FORMAT,
    check_prompt_text,
    multimodal_tokens,
    privileged_text,
    validate_prompt,
    validate_standard,
)
from .models.adapters import SlotFeatures
from .vt_cache.load import check_vts

# Stands for one soft-prefix VT while rendering a text-only chat template; never reaches the tokenizer.
_VT_SENTINEL = "\x00opsd-vt\x00"
# Written beside a saved model by the trainer: the words its teacher context had, read back by `opsd-trl eval`.
CONTEXT_FILE = "teacher_context.json"
CONTEXT_FIELDS = ("teacher_intro", "teacher_transition", "max_vt_images", "chat_template_kwargs", "teacher_text_layout",
                  "system_prompt")


def check_representable(tokenizer, text: str, field: str) -> None:
    """Refuse context words the tokenizer cannot write: unknown tokens, or a round trip that changes the text
    (whitespace aside). The teacher would otherwise silently see other words than the ones asked for (the
    quickstart's 64-word vocabulary reads the paper's intro as `<unk>` after `<unk>`)."""
    if not text:
        return
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.decode(ids)
    unknown = tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids
    if unknown or "".join(decoded.split()) != "".join(text.split()):
        raise ValueError(
            f"{field} {text[:60]!r} cannot be written with this tokenizer's vocabulary: it reads back as "
            f"{decoded[:60]!r}, so the teacher would see other words. Set {field} (opsd-trl eval: "
            f"--{field.replace('_', '-')}) to words the vocabulary has: the run's own (the quickstart model's are "
            "' hint' and 'answer')."
        )


def save_context_words(folder: str, args) -> None:
    """Record the teacher-context settings of `args` (a `VisualOPSDConfig`) in a saved model folder."""
    import json
    import os

    with open(os.path.join(folder, CONTEXT_FILE), "w") as f:
        json.dump({k: getattr(args, k) for k in CONTEXT_FIELDS}, f, indent=1)


def load_context_words(folder: str) -> dict | None:
    """The teacher-context settings a saved model was trained with (`save_context_words`), or None."""
    import json
    import os

    path = os.path.join(folder, CONTEXT_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


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
                     as_images: bool = True, layout: str = "one_turn") -> list[dict]:
    """Return a copy of the student `messages` with the privileged context after the last user turn's content.

    `as_images=True` inserts `{"type": "image"}` parts (VLMs); otherwise a sentinel per VT (text LMs, resolved by
    `tokenize_teacher_prompt`). `vt_text` (text LMs) is inserted as plain text instead of slots.
    `layout="one_turn"` appends intro, VTs and transition to the last user turn; `"blocks"` (the reference's layout)
    puts them in user messages of their own after it, intro / VTs (none when there are none) / transition, so a chat
    template renders each text in its own `<|im_start|>...<|im_end|>` block.
    """
    messages = copy.deepcopy(messages)
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        raise ValueError("the prompt has no user message to attach the visual thoughts to.")
    if as_images:
        vts = [{"type": "image"} for _ in range(n_vt)]
    else:
        middle = vt_text if vt_text is not None else _VT_SENTINEL * n_vt
    if layout == "blocks":
        if as_images:
            parts = [[{"type": "text", "text": intro}], vts, [{"type": "text", "text": transition}]]
        else:
            parts = [intro, middle, transition]
        added = [{"role": "user", "content": part} for part in parts if part]
        messages[last_user + 1 : last_user + 1] = added
        return messages
    if as_images:
        msg = _with_content_list(messages[last_user])
        msg["content"] += [{"type": "text", "text": intro}]
        msg["content"] += vts
        msg["content"] += [{"type": "text", "text": transition}]
    else:
        msg = dict(messages[last_user])
        content = msg["content"]
        if not isinstance(content, str):
            content = "".join(part.get("text", "") for part in content)
        msg["content"] = f"{content}\n\n{intro}\n{middle}\n{transition}"
    messages[last_user] = msg
    return messages


def with_system_prompt(inputs: list[dict], system_prompt: str | None) -> list[dict]:
    """The samples with `system_prompt` as a system message before their prompt (None: unchanged). A sample that
    already has a system message is refused, naming it: two system prompts would be ambiguous."""
    if system_prompt is None:
        return inputs
    out = []
    for x in inputs:
        prompt = x.get("prompt")
        if isinstance(prompt, list | tuple) and any(isinstance(m, dict) and m.get("role") == "system" for m in prompt):
            raise ValueError(f"sample {x.get('id')!r} already has a system message and system_prompt is set; remove "
                             "the system message from the data or set system_prompt: null.")
        if isinstance(prompt, list | tuple):  # anything else is refused, naming the sample, by `validate_prompt`
            prompt = [{"role": "system", "content": system_prompt}, *prompt]
        out.append({**x, "prompt": prompt})
    return out


def privileged_messages(messages: list[dict], privileged: str, template: str) -> list[dict]:
    """Return a copy of `messages` whose last user turn's text is `template` filled with that text (`{prompt}`) and
    `privileged` (`{privileged_context}`), as SDFT builds its teacher prompt: the text parts are joined by spaces
    into one, non-text parts (problem images) stay before it; a turn with text only keeps a string content."""
    messages = copy.deepcopy(messages)
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        raise ValueError("the prompt has no user message to attach the privileged context to.")
    content = messages[last_user]["content"]
    if isinstance(content, str):
        messages[last_user]["content"] = template.format(prompt=content, privileged_context=privileged)
        return messages
    text = " ".join(p.get("text", "") for p in content if p.get("type") == "text")
    filled = template.format(prompt=text, privileged_context=privileged)
    others = [p for p in content if p.get("type") != "text"]
    messages[last_user]["content"] = others + [{"type": "text", "text": filled}] if others else filled
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


def placeholders_per_image(processing_class, grid_thw: torch.Tensor) -> list[int]:
    """Image placeholder tokens per image: its pre-merge patch grid `(n, 3)` over the merge window."""
    merge = getattr(getattr(processing_class, "image_processor", None), "merge_size", 1)
    return (grid_thw.prod(-1) // merge**2).tolist()


@dataclass
class SampleVTs:
    """One sample's visual thoughts as the teacher gets them: cached features (`slots`, None when the VTs are
    encoded online or given as text) or VT pixel inputs, the placeholder count of each kept VT, and how many VTs the
    sample had before `max_vt_images`."""

    slots: list[SlotFeatures] | None
    pixels: dict | None
    tokens: list[int]
    available: int


class TeacherContext:
    """Builds teacher contexts for one processing class (a VLM processor, or a text LM's tokenizer).

    `intro` / `transition` surround the VTs; `chat_template_kwargs` go to every chat-template call. `vt_cache` (a
    `VTCache` or any mapping from sample id to a `VTEntry`) makes the cache the VT source for the ids it holds;
    `on_missing_vt="error"` refuses an id it lacks. `noise_vt` / `noise_vt_space` / `noise_vt_count` are the noise-VT
    control (see `VisualOPSDConfig`). A text LM's VTs are `vt_text` (plain text) or cached embeddings (soft-prefix slots).
    `layout` is `teacher_messages`'s; `system_prompt` is put before every sample's prompt by `with_system_prompt`
    (the trainer, once per batch, so TRL's student prompt has it too).
    `prompt_template` places a sample's `privileged_context` (SDFT's `teacher_prompt_template`).
    """

    def __init__(self, processing_class, *, intro: str, transition: str, uses_images: bool,
                 chat_template_kwargs: dict | None = None, max_vt_images: int = 8,
                 vt_cache: Mapping | None = None, vt_cache_name: str | None = None, on_missing_vt: str = "error",
                 noise_vt: bool = False, noise_vt_space: str = "pixels", layout: str = "one_turn",
                 system_prompt: str | None = None, prompt_template: str = "{prompt}\n\n{privileged_context}",
                 noise_vt_count: int | None = None):
        self.processing_class = processing_class
        self.prompt_template = prompt_template
        self.tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self.intro, self.transition = intro, transition
        check_representable(self.tokenizer, intro, "teacher_intro")
        check_representable(self.tokenizer, transition, "teacher_transition")
        self.uses_images = uses_images
        self.chat_template_kwargs = chat_template_kwargs or {}
        self.max_vt_images = max_vt_images
        self.vt_cache, self.vt_cache_name, self.on_missing_vt = vt_cache, vt_cache_name, on_missing_vt
        self.noise_vt, self.noise_vt_space = noise_vt, noise_vt_space
        self.layout, self.system_prompt = layout, system_prompt
        self.reserved_tokens = multimodal_tokens(processing_class)
        self._vts_checked: set = set()  # ids whose VTs matched the cache's
        # Under the control only: every sample shows this many VTs (its own cycled to the count), so the number of
        # images, which can encode the answer (a maze's VT count is its path length), tells the teacher nothing.
        self.fixed_count = noise_vt_count if noise_vt else None

    @classmethod
    def from_config(cls, args, processing_class, *, uses_images: bool, vt_cache: Mapping | None = None):
        """The contexts a `VisualOPSDConfig` describes: its words, text layout, system prompt, privileged-context
        template, chat-template kwargs, VT limit, VT cache name, missing-VT rule and noise-VT control."""
        return cls(processing_class, intro=args.teacher_intro, transition=args.teacher_transition,
                   uses_images=uses_images, chat_template_kwargs=args.chat_template_kwargs,
                   max_vt_images=args.max_vt_images, vt_cache=vt_cache, vt_cache_name=args.vt_cache_dir,
                   on_missing_vt=args.on_missing_vt, noise_vt=args.noise_vt, noise_vt_space=args.noise_vt_space,
                   layout=args.teacher_text_layout, system_prompt=args.system_prompt,
                   prompt_template=args.teacher_prompt_template, noise_vt_count=args.noise_vt_count)

    # ------------------------------------------------------------------------------------------- per sample (data)
    def with_system_prompt(self, inputs: list[dict]) -> list[dict]:
        return with_system_prompt(inputs, self.system_prompt)

    def check_samples(self, inputs) -> None:
        """Each sample has an id, a valid prompt and (with `on_missing_vt="error"`) visual thoughts."""
        for x in inputs:
            if "id" not in x:
                raise ValueError("every sample needs an `id` column (the VT cache key and the name used in errors).")
            privileged = x.get("privileged_context") is not None
            if isinstance(x.get("prompt"), str) and privileged:  # SDFT's plain-text prompts
                if self.uses_images:
                    raise ValueError(
                        f"sample {x['id']!r}: a plain-text prompt with a privileged_context is taken for a text LM "
                        f"only (images need chat messages); give the prompt as {PROMPT_FORMAT}."
                    )
                continue
            validate_prompt(x)
            check_prompt_text(x, self.reserved_tokens)
            if self.uses_images:
                validate_standard({"images": [], **x})
            if self.on_missing_vt != "error" or privileged:  # a privileged text is privileged information enough
                continue
            if self.vt_cache is not None and x["id"] in self.vt_cache:  # the cache is then the only VT source
                if self._cached_vt_count(x["id"]) == 0:
                    raise ValueError(
                        f"sample {x['id']!r} is in the VT cache {self.vt_cache_name or '(vt_cache=)'} with no visual "
                        "thoughts (its VT columns were empty when the cache was built); fix the data and rebuild the "
                        "cache, or set on_missing_vt='no_vt_teacher'."
                    )
            elif not (x.get("vt_images") if self.uses_images else x.get("vt_text")):  # a VLM never reads vt_text
                raise ValueError(
                    f"sample {x['id']!r} has no visual thoughts (vt_images / vt_text empty, not in the VT cache); "
                    "fix the data or set on_missing_vt='no_vt_teacher'."
                )

    def _cached_vt_count(self, sample_id) -> int:
        counter = getattr(self.vt_cache, "num_images", None)  # a VTCache counts from its index, reading nothing
        return counter(sample_id) if counter is not None else len(self.vt_cache[sample_id].embeds)

    def cached_vts(self, x) -> list[SlotFeatures] | None:
        """This sample's VT features from the cache (None when they are encoded online or given as text)."""
        if self.vt_cache is None:
            return None
        if x["id"] not in self.vt_cache:
            if self.on_missing_vt == "error":
                raise KeyError(
                    f"sample {x['id']!r} is not in the VT cache {self.vt_cache_name}; rebuild the cache over this "
                    "dataset or set on_missing_vt='no_vt_teacher'."
                )
            return []
        entry = self.vt_cache[x["id"]]
        # The dataset's VTs must be those the cache was built from; once per sample (a run's data do not change).
        if self.uses_images and "vt_images" in x and x["id"] not in self._vts_checked:
            check_vts(entry, x["vt_images"] or [], x["id"], self.vt_cache_name)
            self._vts_checked.add(x["id"])
        grids = entry.grid_thw if entry.grid_thw is not None else [None] * len(entry.embeds)
        deep = entry.deepstack or [None] * len(entry.embeds)
        return [SlotFeatures(e, g, d) for e, g, d in zip(entry.embeds, grids, deep, strict=True)]

    def vt_images(self, x) -> list:
        """The VT images the teacher sees (a text LM's teacher reads none)."""
        return self._counted(list(x.get("vt_images") or [])[: self.max_vt_images]) if self.uses_images else []

    def _counted(self, vts: list) -> list:
        """`vts` cycled to the control's fixed count (unchanged without one)."""
        if self.fixed_count is None or not vts:
            return vts
        return [vts[i % len(vts)] for i in range(self.fixed_count)]

    def sample_vts(self, x) -> SampleVTs:
        slots = self.cached_vts(x)
        if slots is not None:
            kept = self._counted(slots[: self.max_vt_images])
            available = len(kept) if self.fixed_count is not None else len(slots)
            return SampleVTs(kept, None, [s.embeds.shape[0] for s in kept], available)
        kept = self.vt_images(x)
        available = len(x.get("vt_images") or []) if self.uses_images else 0
        if self.fixed_count is not None:  # the count is the control's, not a truncation
            available = len(kept)
        if not kept:
            return SampleVTs(None, None, [], available)
        pixels = self.processing_class.image_processor(images=kept, return_tensors="pt")
        return SampleVTs(None, pixels, placeholders_per_image(self.processing_class, pixels["image_grid_thw"]),
                         available)

    def vt_text(self, x) -> str | None:
        """The sample's text VTs; under `noise_vt`, random vocabulary tokens as many as the VT text has (or
        `noise_vt_count`; fresh every call; decoded, so re-tokenised about as long), so the control keeps the context
        length, not the content."""
        text = x.get("vt_text")
        if not (self.noise_vt and text):
            return text
        tok = self.tokenizer
        n = self.fixed_count or len(tok(text, add_special_tokens=False)["input_ids"])
        special = set(tok.all_special_ids)
        ids = [i for i in torch.randint(len(tok), (2 * n + 8,)).tolist() if i not in special][:n]
        return tok.decode(ids)

    def batch(self, inputs, image_grid_thw: torch.Tensor | None, num_images: list[int] | None):
        """The teacher side of a generation batch: per sample its id, teacher prompt ids + slot mask, and VT features
        (cache) or VT pixels (online). `image_grid_thw` / `num_images`: the student batch's problem images. Also
        returns how many samples lost VTs to `max_vt_images`, and each sample's VT count."""
        counts = num_images or [0] * len(inputs)
        tokens = placeholders_per_image(self.processing_class, image_grid_thw) if image_grid_thw is not None else []
        offsets = [sum(counts[:i]) for i in range(len(inputs))]
        batch = {"sample_ids": [], "teacher_prompt_ids": [], "teacher_slot_mask": [], "vt_slots": [], "vt_pixels": []}
        truncated, n_vts = 0, []
        for x, offset, n_img in zip(inputs, offsets, counts, strict=True):
            vts = self.sample_vts(x)
            truncated += vts.available > len(vts.tokens)
            prompt = self.teacher_prompt(x, len(vts.tokens), tokens[offset : offset + n_img] + vts.tokens,
                                         use_vt_text=vts.slots is None)
            batch["sample_ids"].append(x["id"])
            batch["teacher_prompt_ids"].append(prompt.input_ids)
            batch["teacher_slot_mask"].append(prompt.slot_mask)
            batch["vt_slots"].append(vts.slots or [])
            batch["vt_pixels"].append(vts.pixels)
            n_vts.append(len(vts.tokens))
        return batch, truncated, n_vts

    def teacher_prompt(self, x, n_vt: int, tokens_per_slot: list[int], use_vt_text: bool) -> TeacherPrompt:
        """Render and tokenize one sample's teacher context (slots: problem images, then VTs; `tokens_per_slot` has
        one count per slot). `use_vt_text`: a text LM's VTs are its `vt_text`, not slots. A `privileged_context` goes
        where SDFT puts it (`privileged_messages`); the intro / VTs / transition block then follows only when the
        sample has VTs."""
        privileged = privileged_text(x.get("privileged_context"))
        if isinstance(x["prompt"], str):  # TRL tokenizes a plain-text prompt without a chat template (SDFT too)
            ids = self.processing_class(text=self.prompt_template.format(prompt=x["prompt"],
                                                                         privileged_context=privileged))["input_ids"]
            return TeacherPrompt(ids, [False] * len(ids))
        messages = x["prompt"]
        if self.uses_images:
            messages = prepare_multimodal_messages(messages, images=x.get("images") or [])
        if privileged is not None:
            messages = privileged_messages(messages, privileged, self.prompt_template)
        vt_text = self.vt_text(x) if use_vt_text and not self.uses_images else None
        if privileged is None or n_vt or vt_text:
            messages = teacher_messages(messages, n_vt=n_vt, intro=self.intro, transition=self.transition,
                                        vt_text=vt_text, as_images=self.uses_images, layout=self.layout)
        return self._tokenize(messages, tokens_per_slot)

    def student_prompt(self, x, tokens_per_slot: list[int]) -> TeacherPrompt:
        """The same rendering without the privileged context (eval's student; training takes TRL's)."""
        if isinstance(x["prompt"], str):
            ids = self.processing_class(text=x["prompt"])["input_ids"]
            return TeacherPrompt(ids, [False] * len(ids))
        messages = x["prompt"]
        if self.uses_images:
            messages = prepare_multimodal_messages(messages, images=x.get("images") or [])
        return self._tokenize(messages, tokens_per_slot)

    def _tokenize(self, messages, tokens_per_slot: list[int]) -> TeacherPrompt:
        text = self.processing_class.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **self.chat_template_kwargs
        )
        image_token = getattr(self.processing_class, "image_token", None) if self.uses_images else None
        return tokenize_teacher_prompt(text, self.tokenizer, image_token=image_token, tokens_per_slot=tokens_per_slot,
                                       placeholder_id=self.tokenizer.pad_token_id)

    # ------------------------------------------------------------------------------------------- at forward time
    @staticmethod
    def sequences(inputs: dict[str, Any], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(input_ids, attention_mask, slot_mask)` of the teacher sequences `[teacher prompt ; completion]`: the
        prompts left-padded, so the completion starts at the same column as in the student's sequences."""
        prompts = inputs["teacher_prompt_ids"]
        prompt_ids = pad([torch.tensor(p) for p in prompts], padding_value=pad_token_id, padding_side="left")
        prompt_mask = pad([torch.ones(len(p), dtype=torch.long) for p in prompts], padding_value=0,
                          padding_side="left")
        slot_mask = pad([torch.tensor(m) for m in inputs["teacher_slot_mask"]], padding_value=False,
                        padding_side="left")
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids.to(device), completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask.to(device), completion_mask], dim=1)
        slot_mask = torch.cat([slot_mask.to(device), torch.zeros_like(completion_ids, dtype=torch.bool)], dim=1)
        return input_ids, attention_mask, slot_mask

    def slots_for_batch(self, adapter, model, inputs: dict[str, Any], device) -> list[SlotFeatures]:
        """Row-major slot features: per sample its problem images (encoded now, under the weights in use), then
        its VTs (from the cache, or encoded now)."""
        if not adapter.uses_images:
            return [s for per in inputs["vt_slots"] for s in self.embedding_noise(adapter, per)]
        problem: list[SlotFeatures] = inputs.get("problem_slots") or []  # shared with the student forward
        if inputs.get("problem_slots") is None and inputs.get("pixel_values") is not None:
            problem = adapter.encode_images(model, inputs["pixel_values"], inputs["image_grid_thw"])
        counts = inputs.get("num_images") or [0] * len(inputs["vt_slots"])
        slots, offset = [], 0
        for n_img, cached, pixels in zip(counts, inputs["vt_slots"], inputs["vt_pixels"], strict=True):
            slots += problem[offset : offset + n_img]
            offset += n_img
            slots += self.vt_features(adapter, model, cached, pixels, device)
        return slots

    def vt_features(self, adapter, model, cached: list[SlotFeatures], pixels, device) -> list[SlotFeatures]:
        """One sample's VT features: cached, or encoded now; under `noise_vt`, the paper's control encodes standard
        Gaussian pixels of each VT's shape instead (fresh every call), or noises the features (`embeddings`)."""
        pixel_noise = self.noise_vt and self.noise_vt_space == "pixels"
        if pixels is None and not (pixel_noise and cached):
            return self.embedding_noise(adapter, cached)
        grid = pixels["image_grid_thw"] if pixels is not None else torch.stack([s.grid_thw for s in cached])
        if pixel_noise:
            values = torch.randn(int(grid.prod(-1).sum()), adapter.pixel_dim(), device=device)
        else:
            values = pixels["pixel_values"].to(device)
        return self.embedding_noise(adapter, adapter.encode_images(model, values, grid))

    def embedding_noise(self, adapter, slots: list[SlotFeatures]) -> list[SlotFeatures]:
        """`noise_vt_space="embeddings"` (and text LMs' embedding VTs, which have no pixels): Gaussian features with
        each image's mean and std."""
        if not self.noise_vt or (adapter.uses_images and self.noise_vt_space == "pixels"):
            return slots

        def noise(t):
            return torch.randn_like(t) * t.std() + t.mean() if t is not None else None

        return [SlotFeatures(noise(s.embeds), s.grid_thw, noise(s.deepstack)) for s in slots]
