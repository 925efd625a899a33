"""On-disk layout of a VT cache: file names, JSON documents, hashes, errors. No torch models here.

A cache directory holds ``shard-NNNNN.safetensors`` files, ``index.json`` (sample id -> tensors),
``manifest.json`` (what produced the cache; written last, so its presence means "complete") and, while a build
is running or was interrupted, ``progress.json``. ``docs/vt_cache.md`` documents every field.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path

import torch

from ..images import BadImageError  # noqa: F401  (re-exported: raised by builds for an unusable image)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.json"
PROGRESS = "progress.json"
SKIPPED = "skipped.json"
TMP_SUFFIX = ".tmp"
DEFAULT_SHARD_BYTES = 1 << 30

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class VTCacheError(RuntimeError):
    """Base class of every VT cache error."""


class VTCacheCorruptError(VTCacheError):
    """A shard or the index does not match what the manifest recorded (the message names the file)."""


class VTCacheMismatchError(VTCacheError):
    """The cache was built for a different model / processor (the message names the manifest field)."""


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def embeds_key(row: int, j: int) -> str:
    # Keys use the cache row, not the sample id: ids are arbitrary strings, rows are short and sortable.
    return f"{row:08d}.{j}"


def problem_key(row: int, j: int) -> str:
    return f"{row:08d}.p{j}"


def deepstack_key(key: str) -> str:
    """The deepstack tensor stored beside the embeddings tensor ``key``."""
    return f"{key}.deepstack"


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported VT cache dtype {dtype}; choose one of {sorted(DTYPES)}")


def to_jsonable(obj):
    """Plain JSON values for configs that carry tuples, enums or numpy scalars (processor configs do)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, bool | str | type(None)):
        return obj
    if isinstance(obj, int | float):
        return obj
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "value"):  # enums such as PIL's Resampling
        return to_jsonable(obj.value)
    return str(obj)


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(to_jsonable(obj), sort_keys=True).encode()).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Raw bytes of a tensor without a copy (bf16 has no numpy dtype, so view it as int16 first)."""
    t = t.detach().cpu().contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def crc32_tensors(*tensors: torch.Tensor | None) -> int:
    """Cheap per-image checksum verified at load (bit rot / tampering detection, not security)."""
    crc = 0
    for t in tensors:
        if t is not None:
            crc = zlib.crc32(tensor_bytes(t), crc)
    return crc


def _image_digest(h, column: str, im) -> None:
    h.update(f"{column}:{im.mode}:{im.size}\n".encode())
    h.update(im.tobytes())


def vt_digest(images) -> str:
    """Hash of a sample's decoded RGB VT images, ``[(column, image)]`` in order (column, mode, size, pixels): the
    index's ``vt_digest``, recomputed by the trainer to check that the cached VTs are the sample's."""
    h = hashlib.sha256()
    for column, im in images:
        _image_digest(h, column, im)
    return h.hexdigest()


def problem_digest(images) -> str:
    """Hash of a sample's decoded RGB problem images in order (mode, size, pixels; not the column names, which
    differ between a ThinkMorph dataset and its standard layout). The trainer recomputes it to check that the
    cached features belong to the images it is given."""
    h = hashlib.sha256()
    for im in images:
        _image_digest(h, "", im)
    return h.hexdigest()


def write_json_atomic(path: Path, obj, *, compact: bool = False) -> None:
    """Write to a temp name, fsync, rename: readers and resumed builds never see half a file."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    text = json.dumps(obj, separators=(",", ":")) if compact else json.dumps(obj, indent=1)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise VTCacheError(f"{path.parent}: no {what} ({path.name}); is this a finished VT cache?") from None
    except json.JSONDecodeError as e:
        raise VTCacheCorruptError(f"{path}: unreadable {what}: {e}") from None
