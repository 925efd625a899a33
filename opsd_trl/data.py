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

ThinkMorph layout: ``question``, problem image column(s) (``problem_image`` or ``problem_image_<k>``), reasoning
images ``reasoning_image_<k>`` (the VTs, ordered by k), ``answer``, and optionally an id column.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .images import BadImageError, check_image, decode_image, open_image

STANDARD_COLUMNS = ("id", "prompt", "images", "vt_images", "answer")
OPTIONAL_COLUMNS = ("vt_text", "task", "meta")
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


def standardize(dataset, fmt: str = "standard", split: str = "train", **kwargs):
    """A ``datasets.Dataset`` in ``fmt`` ("standard" or "thinkmorph") -> the standard layout, validated."""
    if fmt == "thinkmorph":
        dataset = undecoded_images(ensure_ids(dataset, split))
        dataset = dataset.map(lambda ex: thinkmorph_to_standard(ex, **kwargs), remove_columns=dataset.column_names)
        # The images were moved as their stored bytes (decoded and re-saved, a JPEG would lose pixels and no longer
        # match a VT cache built from the same dataset); typed as images again here.
        dataset = _as_image_lists(dataset)
    elif fmt != "standard":
        raise ValueError(f"unknown dataset format {fmt!r}; use 'standard' or 'thinkmorph'")
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


def multimodal_tokens(processing_class) -> list[str]:
    """The tokenizer's image / video marker tokens (the processor's `image_token` and `video_token`, and every added
    token naming vision, image or video): text the chat template and the processor reserve for image slots."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    found = {getattr(processing_class, a, None) for a in ("image_token", "video_token")}
    added = getattr(tokenizer, "get_added_vocab", dict)()
    found |= {t for t in added if any(w in t.lower() for w in ("vision", "image", "video"))}
    return sorted(t for t in found if isinstance(t, str) and t)


def check_prompt_text(example: dict, reserved: Sequence[str]) -> None:
    """Refuse a prompt whose text holds one of the `reserved` marker tokens (`multimodal_tokens`): the processor
    would count it as an image slot, naming the sample."""
    for message in example["prompt"]:
        content = message["content"]
        texts = [content] if isinstance(content, str) else [p.get("text") or "" for p in content]
        for text in texts:
            hits = [t for t in reserved if t in text]
            if hits:
                raise ValueError(
                    f"sample {example.get('id')!r}: the prompt text contains {hits}, which this processor reserves for "
                    "image slots; remove them from the text (an image is an {'type': 'image'} part of the prompt)."
                )


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


def undecoded_images(dataset, columns: Sequence[str] | None = None):
    """A `datasets.Dataset` whose image columns (`columns`, default all; an image or a list of images each) are
    read as their stored bytes (``{"bytes", "path"}``), not decoded."""
    if not hasattr(dataset, "cast_column"):
        return dataset
    from datasets import Image, List

    for column in columns if columns is not None else dataset.column_names:
        feature = dataset.features.get(column)
        if isinstance(feature, Image) and feature.decode:
            dataset = dataset.cast_column(column, Image(decode=False))
        elif isinstance(feature, List) and isinstance(feature.feature, Image) and feature.feature.decode:
            dataset = dataset.cast_column(column, List(Image(decode=False)))
    return dataset


def _as_image_lists(dataset):
    from datasets import Image, List

    for column in IMAGE_COLUMNS:
        feature = dataset.features.get(column)
        if feature is not None and not (isinstance(feature, List) and isinstance(feature.feature, Image)):
            dataset = dataset.cast_column(column, List(Image()))
    return dataset


def defer_image_decoding(dataset):
    """Keep the image columns of a `datasets.Dataset` as stored bytes, so the trainer decodes them itself and a
    corrupt image raises an error naming the sample and column (instead of failing inside the dataloader). A dict
    of datasets (an `eval_dataset` with several names) is mapped by name."""
    from datasets import Dataset

    if isinstance(dataset, dict):
        return {name: defer_image_decoding(ds) for name, ds in dataset.items()}
    if not isinstance(dataset, Dataset):
        return dataset
    return undecoded_images(dataset, IMAGE_COLUMNS)


def decode_sample_images(sample: dict) -> dict:
    """`sample` with its image columns decoded to RGB PIL images (errors name the sample id and column)."""
    out = dict(sample)
    for column in IMAGE_COLUMNS:
        if sample.get(column):
            out[column] = [decode_image(v, sample.get("id", "?"), column) for v in sample[column]]
    return out


def duplicate_id_message(duplicates: Sequence[str], where: str) -> str:
    return (f"duplicate sample ids in {where}: {sorted(set(duplicates))[:10]} ({len(set(duplicates))} in all); an id "
            "names one sample (in errors, and as the VT cache key): make the ids unique.")


def check_unique_ids(dataset, where: str) -> None:
    """Refuse a `datasets.Dataset` (or a list of rows) whose `id` column repeats a value, naming the ids."""
    if dataset is None or not hasattr(dataset, "__len__"):
        return
    if hasattr(dataset, "column_names"):
        if "id" not in dataset.column_names:
            return
        ids = dataset["id"]
    else:
        ids = [row.get("id") for row in dataset if isinstance(row, dict)]
    seen, duplicates = set(), []
    for i in map(str, ids):
        if i in seen:
            duplicates.append(i)
        seen.add(i)
    if duplicates:
        raise ValueError(duplicate_id_message(duplicates, where))


HEADER_BYTES = 1 << 16  # what the up-front check reads of a stored image: its header (size, mode), not its pixels


def _image_values(table, column: str) -> list[list]:
    """Per row of an arrow batch, the column's images as ``{"bytes": first HEADER_BYTES, "path"}`` (None for a None
    entry): the stored bytes are cut in arrow, so a check of headers does not copy every image into Python."""
    import pyarrow as pa
    import pyarrow.compute as pc

    rows = []
    for lists in table.column(column).chunks:
        if not pa.types.is_list(lists.type) or not pa.types.is_struct(lists.type.value_type):
            rows += lists.to_pylist()  # not stored bytes (e.g. every list empty): the values as they are
            continue
        flat, offsets = lists.flatten(), lists.offsets.to_pylist()  # flatten() starts at offsets[0]
        heads = pc.binary_slice(flat.field("bytes"), 0, HEADER_BYTES).to_pylist()
        paths, valid = flat.field("path").to_pylist(), flat.is_valid().to_pylist()
        values = [{"bytes": b, "path": p} if ok else None for b, p, ok in zip(heads, paths, valid, strict=True)]
        base = offsets[0]
        rows += [values[offsets[i] - base:offsets[i + 1] - base] if ok else []
                 for i, ok in enumerate(lists.is_valid().to_pylist())]
    return rows


def check_dataset_images(dataset, where: str, batch_size: int = 256) -> None:
    """Before training: every image of `dataset` (a `datasets.Dataset` whose image columns are stored bytes, as
    `defer_image_decoding` leaves them) opens and is usable (`opsd_trl.images.check_image`: mode, size, aspect
    ratio), from its header alone (the first `HEADER_BYTES`; no pixel is decoded). Raises a `BadImageError` listing
    the bad images. A header not within those bytes is left to the decoding of its batch (which names it too)."""
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        return
    columns = [c for c in IMAGE_COLUMNS if c in dataset.column_names]
    if not columns or "id" not in dataset.column_names:
        return
    problems = []
    batches = dataset.select_columns(["id", *columns]).with_format("arrow").iter(batch_size=batch_size)
    for table in batches:
        ids = table.column("id").to_pylist()
        for column in columns:
            for sid, values in zip(ids, _image_values(table, column), strict=True):
                for value in values or []:
                    try:
                        image = open_image(value, sid, column)
                    except BadImageError as e:
                        cut = isinstance(value, dict) and value.get("bytes") and len(value["bytes"]) == HEADER_BYTES
                        if not cut:  # else the header may lie past the bytes read: its batch decodes it
                            problems.append(str(e))
                        continue
                    try:
                        check_image(image, sid, column)
                    except BadImageError as e:
                        problems.append(str(e))
    if problems:
        raise BadImageError(f"{len(problems)} image(s) of the {where} cannot be used: " + " | ".join(problems[:5])
                            + (" | ..." if len(problems) > 5 else ""))
