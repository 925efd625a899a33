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

from .images import BadImageError, check_image, decode_image, open_image
from .markers import IMAGE_SKIP_MARKER

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
        needed = [kwargs.get("question_column", "question"), kwargs.get("answer_column", "answer")]
        missing = [c for c in needed if c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"dataset_format 'thinkmorph' needs the columns {needed} (with problem_image* and "
                f"reasoning_image_<k> images); this dataset lacks {missing} and has {dataset.column_names}. "
                "Formats: 'thinkmorph' (question, answer, problem_image*, reasoning_image_<k>, an optional id) or "
                "'standard' (id, prompt, images, vt_images, answer; docs/architecture.md) or 'sdft' (prompt, privileged_context)."
            )
        dataset = undecoded_images(ensure_ids(dataset, split))
        dataset = dataset.map(lambda ex: thinkmorph_to_standard(ex, **kwargs), remove_columns=dataset.column_names)
        # The images were moved as their stored bytes (decoded and re-saved, a JPEG would lose pixels and no longer
        # match a VT cache built from the same dataset); typed as images again here.
        dataset = _as_image_lists(dataset)
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


def multimodal_tokens(processing_class) -> list[str]:
    """The tokenizer's image / video marker tokens (the processor's `image_token` and `video_token`, and every added
    token naming vision, image or video): text the chat template and the processor reserve for image slots."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    found = {getattr(processing_class, a, None) for a in ("image_token", "video_token")}
    added = getattr(tokenizer, "get_added_vocab", dict)()
    found |= {t for t in added if any(w in t.lower() for w in ("vision", "image", "video"))}
    # The image-skip marker is text a policy writes (and the reference's system prompt names), not an image slot.
    found.discard(IMAGE_SKIP_MARKER)
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
    """A folder from ``Dataset.save_to_disk``, a local data folder/file, or a hub name -> ``datasets.Dataset``.

    Every source answers only for the splits it has: a ``DatasetDict`` folder for its split names, a single
    ``Dataset`` folder for the split it was saved as (``Dataset.split``; ``"train"`` when it records none), a data
    file for ``"train"``. Asking for another split is an error naming the source and the split, never a silent
    answer with other rows (an evaluation on the training rows)."""
    import os

    import datasets

    saved = ("dataset_info.json", "dataset_dict.json")  # a Dataset's / a DatasetDict's save_to_disk folder
    if os.path.isdir(path_or_name) and any(os.path.exists(os.path.join(path_or_name, f)) for f in saved):
        loaded = datasets.load_from_disk(path_or_name)
        if isinstance(loaded, datasets.DatasetDict):
            return loaded[split] if split in loaded else _missing_split(path_or_name, split, list(loaded))
        own = str(loaded.split) if loaded.split is not None else "train"
        return loaded if split == own else _missing_split(path_or_name, split, [own], single=True)
    if os.path.isfile(path_or_name):
        ext = path_or_name.rsplit(".", 1)[-1]
        builders = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}
        if ext not in builders:
            raise ValueError(f"dataset file {path_or_name}: unknown extension .{ext}; give a .jsonl, .json, .parquet or "
                             ".csv file, or a folder written by Dataset.save_to_disk.")
        if split != "train":  # a single data file is datasets' split "train"
            _missing_split(path_or_name, split, ["train"], single=True)
        builder = builders[ext]
        return _rows_or_error(path_or_name, split, lambda: datasets.load_dataset(builder, data_files=path_or_name,
                                                                                split=split))
    return _rows_or_error(path_or_name, split, lambda: datasets.load_dataset(path_or_name, split=split))


def _rows_or_error(name: str, split: str, load):
    """datasets reports a file with no rows as `Instruction "<split>" corresponds to no data!` (a header-only
    .csv) or a bare `StopIteration` (an empty .jsonl)."""
    try:
        return load()
    except StopIteration:
        pass
    except ValueError as e:
        if "corresponds to no data" not in str(e):
            raise
    raise ValueError(f"dataset {name} has no rows (split {split!r}); give a dataset with training rows (a .jsonl "
                     "file holds one JSON object per line).") from None


def _missing_split(source: str, split: str, has: list[str], single: bool = False):
    what = (f"holds a single dataset (split {has[0]!r})" if single else f"has the splits {has}")
    raise ValueError(
        f"dataset {source} {what}, not the split {split!r}; an evaluation never falls back to other rows. Save the "
        "splits together (DatasetDict({'train': train, 'test': test}).save_to_disk(folder)), or a held-out set on "
        "its own with its split name (Dataset.from_list(rows, split='test')), or set dataset_train_split / "
        "dataset_test_split (split, --split) to a split it has."
    )


def shared_ids(train, held_out) -> list[str]:
    """The sample ids found in both datasets (an `id` column each), in `held_out`'s order."""
    seen = set(train["id"])
    return [i for i in held_out["id"] if i in seen]


def refuse_shared_ids(train, held_out, train_name: str, held_out_name: str) -> None:
    """An evaluation set must not hold training samples: refuse shared ids, naming some of them."""
    shared = shared_ids(train, held_out)
    if shared:
        raise ValueError(
            f"{len(shared)} of the {len(held_out)} evaluation samples ({held_out_name}) are training samples "
            f"({train_name}): ids {shared[:5]}{' ...' if len(shared) > 5 else ''}; evaluate on held-out rows (another "
            "split or dataset)."
        )


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


# ----------------------------------------------------------------------------------------------- dataset presets
# The reference's data selection (TiezMind/Visual-OPSD data/configs/visual_opsd.yaml `num_used_data`,
# data/opsd_paired_dataset.py): the first rows of each ThinkMorph set's train split, in this order.
DATASET_PRESETS = {
    "thinkmorph": {
        "ThinkMorph/Visual_Search": 6990,
        "ThinkMorph/Spatial_Navigation": 6000,
        "ThinkMorph/Jigsaw_Assembly": 6000,
        "ThinkMorph/Chart_Refocus": 6000,
    },
}
REFERENCE_ROUNDS = 8  # `max_reference_rounds`: reasoning_image_0..7 and the thought columns 0..7
# The reference reads `resoning_thought_<i>` (its spelling); the corrected spelling is read too.
THOUGHT_STEMS = ("resoning_thought", "reasoning_thought")


def _decodes(value, sample_id: str, column: str) -> bool:
    try:
        decode_image(value, sample_id, column)
    except BadImageError:
        return False
    return True


def reference_selection(dataset, num_rows: int, name: str):
    """One ThinkMorph set -> the reference's samples in the standard layout, images kept as stored bytes.

    The first `num_rows` rows are read (rows skipped below count against them, as in the reference); a row is
    skipped when its question or answer is empty, when it has no non-empty thought text (`resoning_thought_<i>`,
    i < 8) or when `problem_image_0` does not decode; the problem image is `problem_image_0` alone; the VTs are
    the non-empty `reasoning_image_<i>` (i < 8) that decode, in order (a row may keep none: its teacher then sees
    intro + transition, `on_missing_vt: no_vt_teacher`). Ids are `<set>-<row>` (the set's last name part), unique
    across sets. Every image is decoded once here, to match the reference's skips (a few minutes for the 24,990
    rows; `datasets` caches the result for a hub or saved dataset).
    """
    from datasets import Image, List

    if "problem_image_0" not in dataset.column_names:
        raise ValueError(f"dataset {name}: no problem_image_0 column (columns: {dataset.column_names}); the "
                         "thinkmorph preset reads the ThinkMorph layout (question, answer, problem_image_0, "
                         "reasoning_image_<i>, resoning_thought_<i>).")
    dataset = dataset.select(range(min(num_rows, len(dataset))))
    for column, feature in dataset.features.items():  # stored bytes: decoded here to test, by the trainer to use
        if isinstance(feature, Image):
            dataset = dataset.cast_column(column, Image(decode=False))
    short = name.rstrip("/").split("/")[-1]
    vt_columns = [f"reasoning_image_{i}" for i in range(REFERENCE_ROUNDS)]
    thought_columns = [f"{stem}_{i}" for stem in THOUGHT_STEMS for i in range(REFERENCE_ROUNDS)]

    def select(batch, indices):
        out = {"id": [], "prompt": [], "images": [], "vt_images": [], "answer": []}
        for j, row in enumerate(indices):
            sid = f"{short}-{row}"
            question, answer = batch["question"][j] or "", batch["answer"][j] or ""
            problem = batch["problem_image_0"][j]
            if not question or not answer:
                continue
            if not any(batch[c][j] for c in thought_columns if c in batch):
                continue
            if not problem or not _decodes(problem, sid, "problem_image_0"):
                continue
            vts = [batch[c][j] for c in vt_columns if c in batch and batch[c][j]]
            out["id"].append(sid)
            out["prompt"].append([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": str(question)}]}])
            out["images"].append([problem])
            out["vt_images"].append([v for v in vts if _decodes(v, sid, "reasoning_image")])
            out["answer"].append(str(answer))
        return out

    selected = dataset.map(select, with_indices=True, batched=True, batch_size=64,
                           remove_columns=dataset.column_names)
    for column in IMAGE_COLUMNS:
        selected = selected.cast_column(column, List(Image(decode=False)))
    return selected


def load_preset(preset: str, split: str = "train", sources: Sequence[str] | None = None):
    """A named selection (`DATASET_PRESETS`) as one standard-layout dataset. `sources`: where to read each set
    (local copies, in the preset's order); default: the hub names."""
    from datasets import concatenate_datasets

    if preset not in DATASET_PRESETS:
        raise ValueError(f"unknown dataset_preset {preset!r}; known: {sorted(DATASET_PRESETS)}.")
    sets = DATASET_PRESETS[preset]
    sources = list(sources) if sources else list(sets)
    if len(sources) != len(sets):
        raise ValueError(f"dataset_preset {preset!r} reads {len(sets)} sets ({', '.join(sets)}); dataset_name gives "
                         f"{len(sources)}: give one source per set, in this order, or none (the hub names).")
    parts = [reference_selection(load_any(src, split), n, name)
             for src, (name, n) in zip(sources, sets.items(), strict=True)]
    return concatenate_datasets(parts)


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
