"""Read a VT cache: O(1) lookup by sample id, tensors read from memory-mapped shards.

Every process opens shards lazily (``safe_open`` maps the file; only pages that are read become resident, and
the OS can drop them), keeps at most ``max_open_shards`` open, and reopens after a fork, so one ``VTCache`` can be
handed to dataloader workers and used on every rank. Nothing is ever written.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .format import (
    DTYPES,
    FORMAT_VERSION,
    INDEX,
    MANIFEST,
    VTCacheCorruptError,
    VTCacheError,
    VTCacheMismatchError,
    crc32_tensors,
    deepstack_key,
    read_json,
    sha256_file,
    vt_digest,
)

VERIFY_MODES = ("none", "size", "sample", "shard")


@dataclass
class CachedImages:
    """Encoded images of one sample, in column order."""

    embeds: list[torch.Tensor]  # per image (n_tokens_i, hidden): rows that replace its image placeholder tokens
    grid_thw: torch.Tensor | None  # (n_images, 3) long, pre-merge (t, h, w) patch grid, for M-RoPE; None if unused
    deepstack: list[torch.Tensor] | None  # per image (n_levels, n_tokens_i, hidden), Qwen3-VL only
    columns: list[str]  # dataset column each image came from


@dataclass
class ProblemImages(CachedImages):
    """A sample's cached problem images and the digest of the decoded images they were encoded from."""

    digest: str = ""


@dataclass
class VTEntry(CachedImages):
    """The cached VTs of one sample, in the order of the dataset's VT columns, its problem images when the
    cache was built with problem columns (None otherwise), and the `vt_digest` of the decoded VT images they were
    encoded from ("" where unknown: an entry made in code)."""

    problem: ProblemImages | None = None
    digest: str = ""


def check_vts(entry: VTEntry, images: list, sample_id, cache_name) -> None:
    """Refuse a cached sample whose VT images (decoded RGB, in order) are not those the cache was built from: their
    number, or their pixels or order (`vt_digest`). Nothing to compare for an entry without a digest."""
    if not entry.digest:
        return
    fix = "rebuild the cache over this dataset with `opsd-trl build-vt-cache`."
    if len(images) != len(entry.columns):
        raise VTCacheMismatchError(
            f"sample {sample_id!r}: the dataset gives {len(images)} visual-thought image(s), the VT cache {cache_name} "
            f"was built from {len(entry.columns)}; {fix}"
        )
    if vt_digest(zip(entry.columns, images, strict=True)) != entry.digest:
        raise VTCacheMismatchError(
            f"sample {sample_id!r}: its visual-thought images are not those the VT cache {cache_name} was built from "
            f"(other pixels, or another order); {fix}"
        )


class VTCache:
    """``cache[sample_id] -> VTEntry``.

    ``verify``: what is checked at load. ``"size"``: each shard's byte size when first opened (catches
    truncation). ``"sample"`` (default): also every image's CRC32 when read (catches altered bytes).
    ``"shard"``: also each shard's SHA-256 when first opened (reads the whole shard once). ``"none"``: nothing.
    """

    def __init__(self, path: str | Path, *, verify: str = "sample", max_open_shards: int = 16):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        self.path = Path(path)
        self.verify, self.max_open_shards = verify, max_open_shards
        self.manifest = read_json(self.path / MANIFEST, "manifest")
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise VTCacheError(
                f"{self.path}: format_version {self.manifest.get('format_version')} is not "
                f"{FORMAT_VERSION}; rebuild the cache with this version of opsd_trl"
            )
        try:
            raw = (self.path / INDEX).read_bytes()
        except FileNotFoundError:
            raise VTCacheError(f"{self.path}: no index ({INDEX}) next to the manifest; the cache is incomplete: "
                               "rebuild it (or restore the file)") from None
        if verify != "none" and hashlib.sha256(raw).hexdigest() != self.manifest["index_sha256"]:
            raise VTCacheCorruptError(f"{self.path / INDEX}: index does not match the manifest's index_sha256")
        try:
            self._index = json.loads(raw)["samples"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise VTCacheCorruptError(f"{self.path / INDEX}: unreadable index ({e!r}); rebuild the cache") from None
        self._shards = {s["file"]: s for s in self.manifest["shards"]}
        self._handles: OrderedDict = OrderedDict()
        self._pid = os.getpid()

    # Dataloader workers started with "spawn" receive a pickled copy: send paths and index, never handles.
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        return state

    @property
    def hidden_size(self) -> int:
        return self.manifest["hidden_size"]

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.manifest["dtype"]]

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, sample_id) -> bool:
        return str(sample_id) in self._index

    def ids(self):
        return iter(self._index)

    def num_images(self, sample_id) -> int:
        """How many VT images the cache holds for `sample_id` (from the index: nothing is read)."""
        return len(self._entry(sample_id)["images"])

    def __getitem__(self, sample_id) -> VTEntry:
        entry = self._entry(sample_id)
        return VTEntry(**vars(self._read_images(sample_id, entry["shard"], entry["images"])),
                       problem=self._problem(sample_id, entry), digest=entry.get("vt_digest", ""))

    def problem_images(self, sample_id) -> ProblemImages | None:
        """The sample's cached problem images (None when the cache has none), without reading its VTs."""
        return self._problem(sample_id, self._entry(sample_id))

    def _entry(self, sample_id) -> dict:
        entry = self._index.get(str(sample_id))
        if entry is None:
            raise KeyError(f"sample {sample_id!r} is not in the VT cache {self.path}")
        return entry

    def _problem(self, sample_id, entry: dict) -> ProblemImages | None:
        if "problem_images" not in entry:
            return None
        images = self._read_images(sample_id, entry["shard"], entry["problem_images"])
        return ProblemImages(**vars(images), digest=entry["problem_digest"])

    def _read_images(self, sample_id, shard: str, items: list[dict]) -> CachedImages:
        embeds, deepstack, grids = [], [], []
        for item in items:
            e = self._read(shard, item["key"], item["shape"])
            d = (
                self._read(shard, deepstack_key(item["key"]), item["deepstack_shape"])
                if "deepstack_shape" in item
                else None
            )
            if self.verify == "sample" and crc32_tensors(e, d) != item["crc32"]:
                raise VTCacheCorruptError(
                    f"shard {self.path / shard}: checksum mismatch for sample {sample_id!r} "
                    f"tensor {item['key']}; run `opsd-trl verify-vt-cache {self.path}`"
                )
            embeds.append(e)
            deepstack.append(d)
            grids.append(item.get("grid_thw"))
        has_grid = bool(grids) and grids[0] is not None
        return CachedImages(
            embeds=embeds,
            grid_thw=torch.tensor(grids, dtype=torch.long) if has_grid else None,
            deepstack=deepstack if self.manifest.get("deepstack_levels") else None,
            columns=[item["column"] for item in items],
        )

    def _read(self, shard: str, key: str, shape: list[int]) -> torch.Tensor:
        try:
            t = self._handle(shard).get_tensor(key)
        except VTCacheError:
            raise
        except Exception as e:
            raise VTCacheCorruptError(f"shard {self.path / shard}: cannot read tensor {key} ({e})") from e
        if list(t.shape) != shape:
            raise VTCacheCorruptError(
                f"shard {self.path / shard}: tensor {key} has shape {list(t.shape)}, index says {shape}"
            )
        return t

    def _handle(self, shard: str):
        if os.getpid() != self._pid:  # forked worker: never share the parent's open handles
            self._handles, self._pid = OrderedDict(), os.getpid()
        handle = self._handles.get(shard)
        if handle is not None:
            self._handles.move_to_end(shard)
            return handle
        path, record = self.path / shard, self._shards[shard]
        if self.verify != "none":
            size = path.stat().st_size if path.exists() else None
            if size != record["bytes"]:
                raise VTCacheCorruptError(
                    f"shard {path}: {size} bytes on disk, manifest says {record['bytes']} (truncated or replaced)"
                )
        if self.verify == "shard" and sha256_file(path) != record["sha256"]:
            raise VTCacheCorruptError(f"shard {path}: sha256 does not match the manifest")
        try:
            handle = safe_open(path, framework="pt")
        except Exception as e:
            raise VTCacheCorruptError(f"shard {path}: unreadable safetensors header ({e})") from e
        self._handles[shard] = handle
        if len(self._handles) > self.max_open_shards:
            self._handles.popitem(last=False)
        return handle
