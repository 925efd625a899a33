"""Import of VLMEvalKit TSV files (the VSP maze benchmark) into the standard layout, scored by `maze.score`.

VLMEvalKit's `VSP_maze_task_main_original.tsv` has the columns `index`, `image`, `question`, `answer`,
`maze_map`, `maze_size`. What we mirror from VLMEvalKit (vlmeval/dataset/image_base.py, image_vqa.py
`VSPOriginalDataset`, utils/frozen_lake.py):
- `image` is one base64 image, or a Python list literal of them, or (<= 64 chars) the `index` of another row
  whose image is reused; without `image`, `image_path` names files relative to the TSV.
- `question` may place images with `<IMAGE-k>` (k-th image, 1-based) and `<TEST-IMAGE>` (the last image);
  otherwise all images come before the text.
- the grid is not parsed from the question or the image: `maze_map` holds its rows as quoted strings
  (e.g. "['SFF' 'FHF' 'FFG']"), and scoring simulates moves on it with VSP rules.
"""

from __future__ import annotations

import ast
import base64
import io
import os
import re

import pandas as pd
from datasets import Dataset
from PIL import Image

from .common import dump_meta, to_dataset

_PLACEHOLDER = re.compile(r"<IMAGE-(\d+)>|<TEST-IMAGE>")
_ROW = re.compile(r"['\"]([SFHG]+)['\"]")


def _as_list(value: str) -> list[str]:
    value = str(value)
    return [str(v) for v in ast.literal_eval(value)] if value.startswith("[") and value.endswith("]") else [value]


def decode_image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def parse_maze_map(maze_map) -> list[str]:
    """Grid rows from VLMEvalKit's `maze_map` cell (a list, or its str / numpy-array repr)."""
    rows = list(maze_map) if isinstance(maze_map, list | tuple) else _ROW.findall(str(maze_map))
    if (
        not rows
        or any(len(r) != len(rows) for r in rows)
        or "".join(rows).count("S") != 1
        or "".join(rows).count("G") != 1
    ):
        raise ValueError(f"cannot read a square maze with one S and one G from maze_map={maze_map!r}")
    return rows


def _content(question: str, images: list[Image.Image]) -> tuple[list[dict], list[Image.Image]]:
    """Chat content parts and the images in the order the parts use them (VLMEvalKit's `split_vsp`)."""
    if not _PLACEHOLDER.search(question):
        return [{"type": "image", "text": None} for _ in images] + [{"type": "text", "text": question}], images
    parts, used, pos = [], [], 0
    for m in _PLACEHOLDER.finditer(question):
        if m.start() > pos:
            parts.append({"type": "text", "text": question[pos : m.start()]})
        idx = int(m.group(1)) - 1 if m.group(1) else len(images) - 1
        if 0 <= idx < len(images):
            parts.append({"type": "image", "text": None})
            used.append(images[idx])
        pos = m.end()
    if pos < len(question):
        parts.append({"type": "text", "text": question[pos:]})
    return parts, used


def load_vlmevalkit_tsv(path: str | os.PathLike, *, rules: str = "vsp", limit: int | None = None) -> Dataset:
    """A VLMEvalKit maze TSV as a standard-layout Dataset (task "maze", no visual thoughts)."""
    data = pd.read_csv(path, sep="\t", dtype={"index": str})
    if "maze_map" not in data:
        raise ValueError(f"{path}: no `maze_map` column; the maze scorer needs the grid (VSP maze format)")
    if limit is not None:
        data = data.iloc[:limit]
    images_by_index = dict(zip(data["index"], data["image"].astype(str), strict=True)) if "image" in data else {}
    root = os.path.dirname(os.fspath(path))
    rows = []
    for _, line in data.iterrows():
        if images_by_index:
            cell = images_by_index[line["index"]]
            if len(cell) <= 64:  # a reference to another row's image, to save space
                cell = images_by_index[cell]
            images = [decode_image(b) for b in _as_list(cell)]
        else:
            images = [Image.open(os.path.join(root, p)).convert("RGB") for p in _as_list(line["image_path"])]
        parts, used = _content(str(line["question"]), images)
        rows.append(
            {
                "id": f"vsp-{line['index']}",
                "prompt": [{"role": "user", "content": parts}],
                "images": used,
                "vt_images": [],
                "answer": "" if pd.isna(line.get("answer")) else str(line["answer"]),
                "task": "maze",
                "meta": dump_meta({"grid": parse_maze_map(line["maze_map"]), "rules": rules}),
            }
        )
    return to_dataset(rows)
