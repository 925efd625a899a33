"""Dataset adapters: everything the trainer, the VT cache and eval read is in the *standard layout*.

Standard layout (one row per sample; see docs/architecture.md "Contracts between modules"):

============  ==========================  ==============================================================
column        type                        meaning
============  ==========================  ==============================================================
``id``        str                         unique sample id; the VT cache key
``prompt``    list of chat messages       user content: one ``{"type": "image"}`` per entry of ``images``
                                          (in order) and ``{"type": "text", "text": ...}`` parts
``images``    list of PIL images          problem image(s), student and teacher (empty for text LMs)
``vt_images`` list of PIL images          visual thoughts, teacher only (may be empty)
``answer``    str                         reference answer
``vt_text``   str, optional               text-only LMs: the visual thoughts written as text
``task``      str, optional               task name
``meta``      str (JSON), optional        what the task's exact scorer needs
============  ==========================  ==============================================================

Text-only LMs get their visual thoughts either as ``vt_text`` or as user-provided embeddings: a safetensors file
keyed by sample id, turned into a VT cache by :func:`opsd_trl.vt_cache.import_vt_embeddings`.

SDFT layout (TRL's ``trl.experimental.sdft.SDFTTrainer`` contract): ``prompt`` (plain text or chat messages) and
``privileged_context`` (text, or chat messages whose texts are joined as SDFT joins them), optionally ``answer`` and
an id column. The trainer takes it as is (the teacher's last user turn becomes ``teacher_prompt_template`` filled
with the prompt and the privileged text, SDFT's default template; VTs, when a sample also has them, follow); a
``datasets.Dataset`` in it gets an ``id`` column when it has none.

ThinkMorph layout: ``question``, problem image column(s) (``problem_image`` or ``problem_image_<k>``), reasoning
images ``reasoning_image_<k>`` (the VTs, ordered by k), ``answer``, and optionally an id column.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

STANDARD_COLUMNS = ("id", "prompt", "images", "vt_images", "answer")
OPTIONAL_COLUMNS = ("vt_text", "privileged_context", "task", "meta")
PRIVILEGED_COLUMN = "privileged_context"  # SDFT's privileged text column
DATASET_FORMATS = ("standard", "thinkmorph", "sdft")
ID_CANDIDATES = ("id", "pid", "sample_id", "index")


def numbered_columns(column_names: Sequence[str], stem: str) -> list[str]:
    """``stem`` and ``stem_<k>`` columns ordered by k (``reasoning_image_10`` after ``reasoning_image_2``)."""
    found = []
    for name in column_names:
        m = re.fullmatch(rf"{re.escape(stem)}(?:_(\d+))?", name)
        if m:
            found.append((int(m.group(1)) if m.group(1) else -1, name))
    return [name for _, name in sorted(found)]


def thinkmorph_vt_columns(column_names: Sequence[str]) -> list[str]:
    return numbered_columns(column_names, "reasoning_image")


def ensure_ids(dataset, split: str = "train"):
    """Add an ``id`` column if missing: from ``pid`` / ``sample_id`` / ``index`` when present, else
    ``"<split>-<row>"`` (stable as long as the dataset order is)."""
    if "id" in dataset.column_names:
        return dataset
    source = next((c for c in ID_CANDIDATES if c in dataset.column_names), None)
    ids = [str(v) for v in dataset[source]] if source else [f"{split}-{i}" for i in range(len(dataset))]
    return dataset.add_column("id", ids)


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def thinkmorph_to_standard(
    example: dict,
    *,
    question_column: str = "question",
    answer_column: str = "answer",
    text_vt_column: str | None = None,
) -> dict:
    """One ThinkMorph row (with an ``id``) -> one standard-layout row."""
    names = list(example)
    images = [im for c in numbered_columns(names, "problem_image") for im in _as_list(example[c])]
    vts = [im for c in thinkmorph_vt_columns(names) for im in _as_list(example[c])]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": example[question_column]}]
    row = {
        "id": str(example["id"]),
        "prompt": [{"role": "user", "content": content}],
        "images": images,
        "vt_images": vts,
        "answer": str(example[answer_column]),
    }
    if text_vt_column:
        row["vt_text"] = example[text_vt_column]
    return row


def privileged_text(value) -> str | None:
    """A sample's `privileged_context` as the text the teacher reads, joined as SDFT's
    `DemonstrationTeacherContextBuilder` joins it: a string as is, chat messages as their texts (the text parts of
    a typed content, joined by spaces) one per line, anything else `str()`; None stays None (no privileged text)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[0], dict):
        chunks = []
        for message in value:
            content = message.get("content", "")
            text = (" ".join(p.get("text", "") for p in content if p.get("type") == "text")
                    if isinstance(content, list) else str(content))
            if text:
                chunks.append(text)
        return "\n".join(chunks)
    return str(value)


def is_sdft_layout(column_names: Sequence[str]) -> bool:
    """SDFT's columns (`prompt`, `privileged_context`) without the standard layout's image columns."""
    names = set(column_names)
    return {"prompt", PRIVILEGED_COLUMN} <= names and not {"images", "vt_images"} & names


def with_sample_ids(dataset, split: str = "train"):
    """A `datasets.Dataset` in the SDFT layout gets the `id` column the trainer names samples by (errors, VT cache);
    anything else is returned as is. A dict of datasets is mapped by name."""
    from datasets import Dataset

    if isinstance(dataset, dict):
        return {name: with_sample_ids(ds, name) for name, ds in dataset.items()}
    if isinstance(dataset, Dataset) and PRIVILEGED_COLUMN in dataset.column_names:
        return ensure_ids(dataset, split)
    return dataset


def sdft_to_standard(example: dict) -> dict:
    """One SDFT row (with an ``id``) -> one standard-layout row: the prompt unchanged (text or chat messages), the
    privileged context as its text, no images, ``answer`` kept when present."""
    return {
        "id": str(example["id"]),
        "prompt": example["prompt"],
        "images": [],
        "vt_images": [],
        "answer": str(example.get("answer") or ""),
        PRIVILEGED_COLUMN: privileged_text(example[PRIVILEGED_COLUMN]),
    }


def standardize(dataset, fmt: str = "standard", split: str = "train", **kwargs):
    """A ``datasets.Dataset`` in ``fmt`` ("standard", "thinkmorph" or "sdft") -> the standard layout, validated. A
    "standard" dataset with SDFT's columns and no image columns is read as "sdft"."""
    if fmt == "standard" and is_sdft_layout(dataset.column_names):
        fmt = "sdft"
    if fmt == "thinkmorph":
        dataset = ensure_ids(dataset, split)
        dataset = dataset.map(lambda ex: thinkmorph_to_standard(ex, **kwargs), remove_columns=dataset.column_names)
    elif fmt == "sdft":
        if PRIVILEGED_COLUMN not in dataset.column_names or "prompt" not in dataset.column_names:
            raise ValueError(f"dataset_format 'sdft' needs the columns prompt and {PRIVILEGED_COLUMN} (TRL's SDFTTrainer "
                             f"contract); the dataset has {dataset.column_names}.")
        dataset = ensure_ids(dataset, split)
        keep = [c for c in ("task", "meta") if c in dataset.column_names]
        dataset = dataset.map(sdft_to_standard, remove_columns=[c for c in dataset.column_names if c not in keep])
    elif fmt != "standard":
        raise ValueError(f"unknown dataset format {fmt!r}; use one of {DATASET_FORMATS}")
    missing = [c for c in STANDARD_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValueError(f"dataset lacks standard columns {missing} (has {dataset.column_names})")
    return dataset


PROMPT_FORMAT = ('a list of chat messages, e.g. [{"role": "user", "content": [{"type": "image"}, {"type": "text", '
                 '"text": "..."}]}] (docs/architecture.md, standard dataset layout)')


def validate_prompt(example: dict) -> None:
    """Check one row's `prompt`: conversational (chat messages with a role and string or typed-part content) and
    with a user turn (the visual thoughts go into the last one). Errors name the sample and the expected format."""
    sid = example.get("id")
    if "prompt" not in example or example["prompt"] is None:
        raise ValueError(f"sample {sid!r} has no prompt column (or it is empty); every sample needs `prompt`: "
                         f"{PROMPT_FORMAT}.")
    prompt = example["prompt"]
    if not isinstance(prompt, list | tuple) or not prompt:
        raise ValueError(f"sample {sid!r}: prompt must be {PROMPT_FORMAT}; got {type(prompt).__name__} "
                         f"{str(prompt)[:60]!r}.")
    for i, message in enumerate(prompt):
        ok = isinstance(message, dict) and isinstance(message.get("role"), str) and "content" in message
        content = message.get("content") if ok else None
        if ok and isinstance(content, list | tuple):
            ok = all(isinstance(p, dict) and p.get("type") in ("text", "image") for p in content)
        elif ok:
            ok = isinstance(content, str)
        if not ok:
            raise ValueError(f"sample {sid!r}: prompt message {i} is not a chat message with a role and a string or "
                             f"[{{'type': 'text' | 'image', ...}}] content: {str(message)[:80]!r}; prompt must be "
                             f"{PROMPT_FORMAT}.")
    if not any(m["role"] == "user" for m in prompt):
        raise ValueError(f"sample {sid!r}: the prompt has no user message (roles: {[m['role'] for m in prompt]}); "
                         "the visual thoughts go into the last user turn: add one.")


def check_prompt_lengths(samples: list[dict], lengths: list[int], role: str, limit: int | None) -> None:
    """Refuse a tokenized `role` ("student" / "teacher") prompt longer than `limit` (`max_prompt_length`; None: no
    limit), naming the sample."""
    for x, length in zip(samples, lengths, strict=True):
        if limit is not None and length > limit:
            raise ValueError(
                f"sample {x['id']!r}: {role} prompt has {length} tokens > max_prompt_length={limit}; raise the "
                "limit or shorten the prompt" + (" / reduce max_vt_images." if role == "teacher" else ".")
            )


def validate_standard(example: dict) -> None:
    """Check one standard row: the prompt has exactly one image part per problem image."""
    parts = [p for m in example["prompt"] if isinstance(m["content"], list) for p in m["content"]]
    n_image_parts = sum(p.get("type") == "image" for p in parts)
    if n_image_parts != len(example["images"]):
        raise ValueError(
            f"sample {example['id']!r}: prompt has {n_image_parts} image parts but {len(example['images'])} images"
        )


def load_any(path_or_name: str, split: str = "train"):
    """A folder from ``Dataset.save_to_disk``, a local data folder/file, or a hub name -> ``datasets.Dataset``."""
    import os

    import datasets

    if os.path.isdir(path_or_name) and os.path.exists(os.path.join(path_or_name, "dataset_info.json")):
        loaded = datasets.load_from_disk(path_or_name)
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    if os.path.isfile(path_or_name):
        ext = path_or_name.rsplit(".", 1)[-1]
        builders = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}
        if ext not in builders:
            raise ValueError(f"dataset file {path_or_name}: unknown extension .{ext}; give a .jsonl, .json, .parquet or "
                             ".csv file, or a folder written by Dataset.save_to_disk.")
        builder = builders[ext]
        return datasets.load_dataset(builder, data_files=path_or_name, split=split)
    return datasets.load_dataset(path_or_name, split=split)


IMAGE_COLUMNS = ("images", "vt_images")


def defer_image_decoding(dataset):
    """Keep the image columns of a `datasets.Dataset` as stored bytes, so the trainer decodes them itself and a
    corrupt image raises an error naming the sample and column (instead of failing inside the dataloader). A dict
    of datasets (an `eval_dataset` with several names) is mapped by name."""
    from datasets import Dataset, Image, List

    if isinstance(dataset, dict):
        return {name: defer_image_decoding(ds) for name, ds in dataset.items()}
    if not isinstance(dataset, Dataset):
        return dataset
    for column in IMAGE_COLUMNS:
        feature = dataset.features.get(column)
        if isinstance(feature, List) and isinstance(feature.feature, Image) and feature.feature.decode:
            dataset = dataset.cast_column(column, List(Image(decode=False)))
    return dataset


def decode_sample_images(sample: dict) -> dict:
    """`sample` with its image columns decoded to RGB PIL images (errors name the sample id and column)."""
    from .vt_cache.build import decode_image

    out = dict(sample)
    for column in IMAGE_COLUMNS:
        if sample.get(column):
            out[column] = [decode_image(v, sample.get("id", "?"), column) for v in sample[column]]
    return out
