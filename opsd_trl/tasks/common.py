"""Shared pieces of the procedural tasks: content-hash splits and the standard dataset schema."""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterable, Iterator

from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage

SPLITS = ("train", "validation", "test")
# Fractions of the content-hash space owned by each split (train, validation, test).
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)

# The standard layout of docs/architecture.md. Explicit features so that image columns are stored as
# `Image()` even when a list is empty, and `{"type": "image"}` parts get `text=None` consistently.
FEATURES = Features(
    {
        "id": Value("string"),
        "prompt": List({"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})}),
        "images": List(Image()),
        "vt_images": List(Image()),
        "answer": Value("string"),
        "task": Value("string"),
        "meta": Value("string"),
    }
)


# Text tasks: chat prompts with string content, no images, and the privileged text (SDFT's `privileged_context`).
TEXT_FEATURES = Features(
    {
        "id": Value("string"),
        "prompt": List({"role": Value("string"), "content": Value("string")}),
        "images": List(Image()),
        "vt_images": List(Image()),
        "answer": Value("string"),
        "task": Value("string"),
        "meta": Value("string"),
        "privileged_context": Value("string"),
    }
)


def content_hash(key: str) -> str:
    """Stable hex digest of a sample's content key (Python's hash() is salted per process)."""
    return hashlib.sha256(key.encode()).hexdigest()


def split_of(key: str, fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS) -> str:
    """Assign content to a split by its hash, so equal content always lands in the same split.

    Seeds cannot give disjoint splits for small spaces (there are only ~1,700 distinct solvable 3x3 mazes):
    two seeds often draw the same maze.
    """
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"split fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    u = int(content_hash(key)[:15], 16) / 16**15  # uniform in [0, 1)
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "validation"
    return "test"


def split_seed(seed: int, split: str) -> int:
    """Independent random stream per (seed, split): asking for the test split never depends on train's size."""
    return int(content_hash(f"{seed}/{split}")[:15], 16)


def take_for_split(draws: Iterator, key_fn, split: str, n: int, *, dedupe: bool, fractions, max_draws: int) -> list:
    """Keep draws whose content belongs to `split` until `n` are collected (optionally distinct)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    kept, seen = [], set()
    for i, item in enumerate(draws):
        if len(kept) == n:
            break
        if i >= max_draws:
            raise ValueError(
                f"only {len(kept)} of {n} {'distinct ' if dedupe else ''}samples found for split {split!r} after "
                f"{max_draws} draws; the content space is too small: lower n, raise the difficulty, or dedupe=False"
            )
        key = key_fn(item)
        if split_of(key, fractions) != split or (dedupe and key in seen):
            continue
        seen.add(key)
        kept.append(item)
    return kept


def user_prompt(n_images: int, text: str) -> list[dict]:
    """One user turn: the image placeholders (one per entry of `images`, in order) then the question."""
    content = [{"type": "image", "text": None} for _ in range(n_images)]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def _png(image: PILImage.Image | dict) -> dict:
    """PNG bytes at compression level 1: lossless like datasets' own encoding, but ~3x faster to build."""
    if isinstance(image, dict):
        return image
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return {"bytes": buf.getvalue(), "path": None}


def to_dataset(rows: Iterable[dict]) -> Dataset:
    """Rows -> a `datasets.Dataset` with the standard features (`TEXT_FEATURES` for a text task's rows)."""
    rows = list(rows)
    features = TEXT_FEATURES if rows and "privileged_context" in rows[0] else FEATURES
    columns = {name: [r[name] for r in rows] for name in features}
    for name in ("images", "vt_images"):
        columns[name] = [[_png(im) for im in ims] for ims in columns[name]]
    return Dataset.from_dict(columns, features=features)


def dump_meta(meta: dict) -> str:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"))


def load_meta(meta: str | dict) -> dict:
    return json.loads(meta) if isinstance(meta, str) else dict(meta)


# ---- tolerant answer extraction, shared by the scorers ----
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER_MARKER = re.compile(r"(?i)\b(?:final\s+)?answer\b\s*(?:is\b|:|=)?")
# What may sit between two answer tokens of one run: punctuation, arrows, step numbers, a few filler words.
_FILLER = re.compile(r"(?i)(?:[\s,;:.\-–—>→|/()\[\]{}\"'`*#]|\d+|\b(?:step|then|and|move|go|piece)\b)*")


def _runs(text: str, token: re.Pattern) -> list[list[str]]:
    """Maximal runs of tokens separated only by filler."""
    runs: list[list[str]] = []
    end = None
    for m in token.finditer(text):
        if end is not None and _FILLER.fullmatch(text, end, m.start()):
            runs[-1].append(m.group())
        else:
            runs.append([m.group()])
        end = m.end()
    return runs


def extract_answer_tokens(text: str, token: re.Pattern) -> list[str] | None:
    """The answer tokens a completion commits to, or None when there are none.

    Priority: the last ``\\boxed{...}`` (what VLMEvalKit extracts), else the first run after the last
    "answer:" marker, else the last run in the text (final answers come last).
    """
    text = text.replace("\x08", "\\b")  # a "\b" that went through a JSON/Python string became a backspace
    boxed = _BOXED.findall(text)
    if boxed:
        tokens = [m.group() for m in token.finditer(boxed[-1])]
        return tokens or None
    markers = list(_ANSWER_MARKER.finditer(text))
    if markers:
        runs = _runs(text[markers[-1].end() :], token)
        if runs:
            return runs[0]
    runs = _runs(text, token)
    return runs[-1] if runs else None
