"""Build a VT cache: decode -> encode in batches -> buffer -> commit size-capped shards (temp name + rename).

Resumable: after every shard commit, ``progress.json`` records how many input samples are done and the index
entries so far. A rerun with the same settings drops uncommitted files and restarts at that sample. Batches are
aligned to multiples of ``batch_size`` from the first sample and shards only close between batches, so a resumed
build encodes exactly the same batches as an uninterrupted one and writes identical bytes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..data import duplicate_id_message, undecoded_images
from ..images import decode_image
from .encoders import FINGERPRINT_FIELDS, EncodedImage, VTEncoder, encoder_fingerprint
from .format import (
    DEFAULT_SHARD_BYTES,
    DTYPES,
    FORMAT_VERSION,
    INDEX,
    MANIFEST,
    PROGRESS,
    SKIPPED,
    TMP_SUFFIX,
    BadImageError,
    VTCacheError,
    crc32_tensors,
    deepstack_key,
    dtype_name,
    embeds_key,
    problem_digest,
    problem_key,
    read_json,
    sha256_file,
    sha256_json,
    shard_name,
    tensor_bytes,
    vt_digest,
    write_json_atomic,
)


def _column_values(sample: dict, column: str) -> list:
    value = sample.get(column)
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _decoded_images(sample: dict, sample_id: str, columns: Sequence[str]) -> list[tuple[str, Image.Image]]:
    return [(c, decode_image(v, sample_id, c)) for c in columns for v in _column_values(sample, c)]


def sample_ids(samples, id_column: str = "id") -> list[str]:
    """All ids (column access on a datasets.Dataset: no image decoding); duplicates are an error."""
    ids = samples[id_column] if hasattr(samples, "column_names") else [s[id_column] for s in samples]
    ids = [str(i) for i in ids]
    seen, dups = set(), []
    for i in ids:
        if i in seen:
            dups.append(i)
        seen.add(i)
    if dups:
        raise VTCacheError(duplicate_id_message(dups, f"column {id_column!r}"))
    return ids


class _ShardWriter:
    """Buffers encoded samples and commits them as one safetensors shard once ``shard_bytes`` is reached."""

    def __init__(self, out: Path, dtype: torch.dtype, next_shard: int, next_row: int):
        self.out, self.dtype, self.next_shard, self.next_row = out, dtype, next_shard, next_row
        self.tensors: dict[str, torch.Tensor] = {}
        self.entries: dict[str, dict] = {}
        self.nbytes = 0

    def add(self, sample_id: str, images: list[tuple[str, EncodedImage]], digest: str,
            problem: tuple[list[tuple[str, EncodedImage]], str] | None = None) -> None:
        """Buffer one sample: its VTs and their digest, and (when problem columns are cached) its problem images
        and their digest."""
        row = self.next_row
        entry = {"shard": shard_name(self.next_shard), "images": self._add_images(images, row, embeds_key),
                 "vt_digest": digest}
        if problem is not None:
            entry["problem_images"] = self._add_images(problem[0], row, problem_key)
            entry["problem_digest"] = problem[1]
        self.entries[sample_id] = entry
        self.next_row += 1

    def _add_images(self, images: list[tuple[str, EncodedImage]], row: int, key_of) -> list[dict]:
        items = []
        for j, (column, enc) in enumerate(images):
            key = key_of(row, j)
            embeds = enc.embeds.to(dtype=self.dtype, copy=True).contiguous()  # own memory, not a batch view
            self.tensors[key] = embeds
            item = {"key": key, "column": column, "shape": list(embeds.shape)}
            deep = None
            if enc.deepstack is not None:
                deep = enc.deepstack.to(dtype=self.dtype, copy=True).contiguous()
                self.tensors[deepstack_key(key)] = deep
                item["deepstack_shape"] = list(deep.shape)
            if enc.grid_thw is not None:
                item["grid_thw"] = list(enc.grid_thw)
            item["crc32"] = crc32_tensors(embeds, deep)
            self.nbytes += embeds.nbytes + (deep.nbytes if deep is not None else 0)
            items.append(item)
        return items

    def commit(self) -> tuple[dict, dict] | None:
        """Write the buffered shard (temp name, fsync, rename); return (shard record, its index entries)."""
        if not self.entries:
            return None
        name = shard_name(self.next_shard)
        final = self.out / name
        tmp = final.with_name(name + TMP_SUFFIX)
        # One metadata key only: safetensors writes a metadata map in per-process random order, and resumed
        # builds must produce identical bytes.
        save_file(self.tensors, tmp, metadata={"format": f"opsd_trl.vt_cache/{FORMAT_VERSION}"})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        record = {
            "file": name,
            "bytes": final.stat().st_size,
            "sha256": sha256_file(final),
            "num_samples": len(self.entries),
            "num_images": sum(len(e["images"]) for e in self.entries.values()),
        }
        if any("problem_images" in e for e in self.entries.values()):
            record["num_problem_images"] = sum(len(e["problem_images"]) for e in self.entries.values())
        entries = self.entries
        self.tensors, self.entries, self.nbytes = {}, {}, 0
        self.next_shard += 1
        return record, entries


def _resume_state(out: Path, config: dict, resume: bool) -> dict:
    fresh = {"config": config, "consumed": 0, "next_row": 0, "shards": [], "entries": {}, "skipped": []}
    path = out / PROGRESS
    if not path.exists():
        state = fresh
    elif not resume:
        raise VTCacheError(
            f"{out} holds an interrupted build; pass resume=True (CLI: drop --no-resume) or use a new directory"
        )
    else:
        state = read_json(path, "build progress")
        for key in config:
            if state["config"].get(key) != config[key]:
                raise VTCacheError(
                    f"{out}: cannot resume, setting {key!r} differs from the interrupted build "
                    f"({state['config'].get(key)!r} vs {config[key]!r}); use a new output directory"
                )
    committed = {s["file"] for s in state["shards"]}
    for p in out.iterdir():  # anything not committed is a leftover of the interrupted run
        if p.name.endswith(TMP_SUFFIX) or (p.name.startswith("shard-") and p.name not in committed):
            p.unlink()
    for s in state["shards"]:
        p = out / s["file"]
        if not p.exists() or p.stat().st_size != s["bytes"]:
            raise VTCacheError(f"{out}: committed shard {s['file']} is missing or changed; start a new build")
    return state


def build_vt_cache(
    samples,
    encoder: VTEncoder,
    output: str | Path,
    *,
    vt_columns: Sequence[str] = ("vt_images",),
    problem_columns: Sequence[str] = (),
    id_column: str = "id",
    batch_size: int = 8,
    dtype: torch.dtype | str = torch.float32,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    skip_bad: bool = False,
    resume: bool = True,
    progress: bool = True,
    source: str | None = None,
) -> Path:
    """Encode the VT images of every sample and write a cache to ``output``; returns the directory.

    ``samples``: a sequence of dicts (a ``datasets.Dataset`` works) with ``id_column`` and ``vt_columns``; each
    VT column holds an image, a list of images, or None. A sample's VT list is the concatenation over
    ``vt_columns`` in order. ``problem_columns`` (e.g. ``("images",)``): also cache each sample's problem images
    (concatenated over these columns), which the trainer then reuses instead of running the vision tower when the
    tower is frozen; encoded in their own encoder call, so the VT tensors are the same bytes as without them.
    ``batch_size`` counts samples (each brings all its images). ``skip_bad``: leave out samples with an unreadable
    image and list them in ``skipped.json`` instead of raising.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1 (samples per encoder call), got {batch_size!r}")
    if not isinstance(shard_bytes, int) or shard_bytes < 1:
        raise ValueError(f"shard_bytes must be an integer >= 1 (bytes per shard file), got {shard_bytes!r}")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    vt_columns, problem_columns = list(vt_columns), list(problem_columns)
    samples = undecoded_images(samples, vt_columns + problem_columns)  # decoding errors then name the column
    ids = sample_ids(samples, id_column)
    fingerprint = encoder.fingerprint()
    config = {
        **{k: fingerprint[k] for k in FINGERPRINT_FIELDS},
        "dtype": dtype_name(dtype),
        "vt_columns": vt_columns,
        "batch_size": batch_size,
        "shard_bytes": shard_bytes,
        "skip_bad": skip_bad,
        "ids_sha256": sha256_json(ids),
    }
    if problem_columns:  # absent otherwise: a VT-only build keeps the settings (and bytes) it always had
        config["problem_columns"] = problem_columns
    if (out / MANIFEST).exists():
        done = read_json(out / MANIFEST, "manifest")
        if done.get("build_config") == config:
            return out
        raise VTCacheError(f"{out} already holds a finished VT cache built with other settings")

    state = _resume_state(out, config, resume)
    writer = _ShardWriter(out, dtype, len(state["shards"]), state["next_row"])
    bar = tqdm(total=len(ids), initial=state["consumed"], unit="sample", desc="VT cache", disable=not progress)
    n_images = sum(s["num_images"] for s in state["shards"])
    for start in range(state["consumed"], len(ids), batch_size):
        stop = min(start + batch_size, len(ids))
        batch = []  # (id, [(column, image)], digest, problem [(column, image)] | None, problem digest)
        for i in range(start, stop):
            sample = samples[i]
            try:
                images = _decoded_images(sample, ids[i], vt_columns)
                problem = _decoded_images(sample, ids[i], problem_columns) if problem_columns else None
                batch.append((ids[i], images, vt_digest(images), problem))
            except BadImageError as e:
                if not skip_bad:
                    raise
                state["skipped"].append({"id": ids[i], "error": str(e)})
        encoded = iter(encoder.encode([im for _, images, _, _ in batch for _, im in images]))
        encoded_problem = iter(encoder.encode([im for *_, problem in batch for _, im in problem or []]))
        for sid, images, digest, problem in batch:
            problem_entry = None
            if problem is not None:
                problem_entry = ([(c, next(encoded_problem)) for c, _ in problem],
                                 problem_digest([im for _, im in problem]))
            writer.add(sid, [(c, next(encoded)) for c, _ in images], digest, problem_entry)
            n_images += len(images)
        if writer.nbytes >= shard_bytes:
            _commit(out, writer, state, consumed=stop)
        bar.update(stop - start)
        bar.set_postfix(images=n_images)
    bar.close()
    _commit(out, writer, state, consumed=len(ids))
    _finalize(out, state, fingerprint, source)
    return out


def _commit(out: Path, writer: _ShardWriter, state: dict, consumed: int) -> None:
    committed = writer.commit()
    if committed is not None:
        record, entries = committed
        state["shards"].append(record)
        state["entries"].update(entries)
    state["consumed"], state["next_row"] = consumed, writer.next_row
    write_json_atomic(out / PROGRESS, state, compact=True)


def _finalize(out: Path, state: dict, fingerprint: dict, source: str | None) -> None:
    entries = state["entries"]
    write_json_atomic(out / INDEX, {"format_version": FORMAT_VERSION, "samples": entries}, compact=True)
    images_hash = hashlib.sha256()
    for sid, e in entries.items():
        images_hash.update(f"{sid}\0{e['vt_digest']}\n".encode())
    if state["skipped"]:
        write_json_atomic(out / SKIPPED, state["skipped"])
    config = state["config"]
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "opsd_trl.vt_cache",
        **fingerprint,
        "dtype": config["dtype"],
        "vt_columns": config["vt_columns"],
        "num_samples": len(entries),
        "num_images": sum(len(e["images"]) for e in entries.values()),
        "num_skipped": len(state["skipped"]),
        "images_sha256": images_hash.hexdigest(),
        **_problem_manifest(config, entries),
        "index_sha256": sha256_file(out / INDEX),
        "shards": state["shards"],
        "source": source,
        "build_config": config,
    }
    write_json_atomic(out / MANIFEST, manifest)  # last: its presence marks the cache complete
    (out / PROGRESS).unlink()


def _problem_manifest(config: dict, entries: dict) -> dict:
    """Manifest fields of the cached problem images (none for a VT-only cache)."""
    if not config.get("problem_columns"):
        return {}
    h = hashlib.sha256()
    for sid, e in entries.items():
        h.update(f"{sid}\0{e['problem_digest']}\n".encode())
    return {
        "problem_columns": config["problem_columns"],
        "num_problem_images": sum(len(e["problem_images"]) for e in entries.values()),
        "problem_images_sha256": h.hexdigest(),
    }


def import_vt_embeddings(
    embeddings_file: str | Path,
    output: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Text-only LMs: turn user-provided VT embeddings into a VT cache the trainer reads like any other.

    ``embeddings_file``: a safetensors file whose keys are sample ids and whose values are ``(n_tokens, hidden)``
    (one VT) or ``(n_vts, n_tokens, hidden)``. Not resumable (no encoding to save).
    """
    from safetensors import safe_open

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise VTCacheError(f"{out} is not empty")
    with safe_open(embeddings_file, framework="pt") as f:
        keys = list(f.keys())
        first = f.get_tensor(keys[0]) if keys else torch.zeros(0, 0)
        dtype = DTYPES[dtype] if isinstance(dtype, str) else (dtype or first.dtype)
        fingerprint = encoder_fingerprint(model_family="text", hidden_size=first.shape[-1])
        config = {
            **{k: fingerprint[k] for k in FINGERPRINT_FIELDS},
            "dtype": dtype_name(dtype),
            "vt_columns": ["vt_embeddings"],
            "source_file": str(embeddings_file),
        }
        state = {"config": config, "shards": [], "entries": {}, "skipped": []}
        writer = _ShardWriter(out, dtype, 0, 0)
        for sid in keys:
            t = f.get_tensor(sid)
            if t.dim() not in (2, 3) or t.shape[-1] != fingerprint["hidden_size"]:
                raise VTCacheError(
                    f"{embeddings_file}: sample {sid!r} has shape {list(t.shape)}; expected "
                    f"(n_tokens, {fingerprint['hidden_size']}) or (n_vts, n_tokens, hidden)"
                )
            vts = list(t) if t.dim() == 3 else [t]
            h = hashlib.sha256()
            for v in vts:
                h.update(tensor_bytes(v))
            digest = h.hexdigest()
            writer.add(sid, [("vt_embeddings", EncodedImage(v, None)) for v in vts], digest)
            if writer.nbytes >= shard_bytes:
                _commit(out, writer, state, consumed=0)
    _commit(out, writer, state, consumed=0)
    _finalize(out, state, fingerprint, source=str(embeddings_file))
    return out
