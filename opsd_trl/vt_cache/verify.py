"""Integrity (``verify_vt_cache``) and policy compatibility (``check_compatible``) of a VT cache."""

from __future__ import annotations

import warnings
from pathlib import Path

from safetensors import safe_open

from ..models.adapters import get_adapter
from .encoders import FINGERPRINT_FIELDS, VisionEncoder, config_fingerprint
from .format import (
    FORMAT_VERSION,
    INDEX,
    MANIFEST,
    VTCacheError,
    VTCacheMismatchError,
    deepstack_key,
    read_json,
    sha256_file,
)
from .load import VTCache

_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def verify_vt_cache(path: str | Path) -> list[str]:
    """Re-hash every shard and the index, and check every indexed tensor's presence, shape and dtype.

    Returns the problems found (empty when the cache is intact); each names the file it concerns.
    """
    path = Path(path)
    try:
        manifest = read_json(path / MANIFEST, "manifest")
    except VTCacheError as e:  # missing or unreadable: reported, not raised
        return [str(e)]
    if not path.is_dir() or not (path / INDEX).is_file():
        return [f"{path / INDEX}: missing (the cache is incomplete)"]
    manifest = manifest if isinstance(manifest, dict) else {}
    lacking = [k for k in ("index_sha256", "shards", "dtype", "num_samples", "num_images") if k not in manifest]
    if manifest.get("format_version") != FORMAT_VERSION or lacking:
        return [f"{path / MANIFEST}: not a VT cache manifest of format_version {FORMAT_VERSION} "
                f"(format_version {manifest.get('format_version')!r}, lacks {lacking})"]
    problems = []
    if sha256_file(path / INDEX) != manifest["index_sha256"]:
        return [f"{path / INDEX}: sha256 does not match the manifest (index altered)"]
    samples = read_json(path / INDEX, "index")["samples"]
    expected: dict[str, dict[str, list[int]]] = {s["file"]: {} for s in manifest["shards"]}
    for sid, entry in samples.items():
        if (entry["images"] or entry.get("problem_images")) and entry["shard"] not in expected:
            problems.append(f"{path / INDEX}: sample {sid!r} points to unknown shard {entry['shard']}")
            continue
        for item in entry["images"] + entry.get("problem_images", []):
            expected[entry["shard"]][item["key"]] = item["shape"]
            if "deepstack_shape" in item:
                expected[entry["shard"]][deepstack_key(item["key"])] = item["deepstack_shape"]
    st_dtype = _ST_DTYPES[manifest["dtype"]]
    for record in manifest["shards"]:
        shard = path / record["file"]
        if not shard.exists():
            problems.append(f"shard {shard}: missing")
            continue
        if shard.stat().st_size != record["bytes"]:
            problems.append(
                f"shard {shard}: {shard.stat().st_size} bytes, manifest says {record['bytes']} (truncated?)"
            )
            continue
        if sha256_file(shard) != record["sha256"]:
            problems.append(f"shard {shard}: sha256 does not match the manifest (altered)")
        problems += _check_header(shard, expected[record["file"]], st_dtype)
    n_images = sum(len(e["images"]) for e in samples.values())
    if (len(samples), n_images) != (manifest["num_samples"], manifest["num_images"]):
        problems.append(
            f"{path / INDEX}: {len(samples)} samples / {n_images} images, manifest says "
            f"{manifest['num_samples']} / {manifest['num_images']}"
        )
    n_problem = sum(len(e.get("problem_images", [])) for e in samples.values())
    if n_problem != manifest.get("num_problem_images", 0):
        problems.append(f"{path / INDEX}: {n_problem} problem images, manifest says "
                        f"{manifest.get('num_problem_images', 0)}")
    return problems


def _check_header(shard: Path, expected: dict[str, list[int]], st_dtype: str) -> list[str]:
    try:
        with safe_open(shard, framework="pt") as f:
            keys = set(f.keys())
            problems = (
                [f"shard {shard}: tensors not in the index: {sorted(keys - set(expected))[:5]}"]
                if keys - set(expected)
                else []
            )
            for key, shape in expected.items():
                if key not in keys:
                    problems.append(f"shard {shard}: tensor {key} missing")
                    continue
                sl = f.get_slice(key)
                if list(sl.get_shape()) != shape or sl.get_dtype() != st_dtype:
                    problems.append(
                        f"shard {shard}: tensor {key} is {sl.get_dtype()}{sl.get_shape()}, index says {st_dtype}{shape}"
                    )
            return problems
    except Exception as e:
        return [f"shard {shard}: unreadable safetensors file ({e})"]


def policy_fingerprint(model, processor=None) -> dict:
    """The manifest fields a cache must match to be used with ``model`` (a Qwen-VL model or a text LM)."""
    if get_adapter(model).uses_images:
        if processor is None:
            raise ValueError("a Qwen-VL policy needs its processor to check a VT cache")
        return VisionEncoder(model, processor).fingerprint()
    return config_fingerprint(model.config)


def check_compatible(
    cache: VTCache | str | Path, model, processor=None, *, allow_trainable_vision: bool = False
) -> None:
    """Raise unless ``cache`` was built by this policy's vision tower + projector and image processor.

    A trainable vision tower makes cached features stale after the first optimizer step, so that is refused
    unless ``allow_trainable_vision=True`` (then only warned). Under ZeRO-3 call this before sharding (or with
    the tower's parameters gathered): the weights hash reads every vision parameter.
    """
    manifest = (cache if isinstance(cache, VTCache) else VTCache(cache, verify="none")).manifest
    policy = policy_fingerprint(model, processor)
    for field in FINGERPRINT_FIELDS:
        if field in policy and manifest.get(field) != policy[field]:
            detail = ""
            if field == "processor_sha256":
                cfg_c, cfg_p = manifest.get("processor_config", {}), policy["processor_config"]
                keys = sorted(k for k in set(cfg_c) | set(cfg_p) if cfg_c.get(k) != cfg_p.get(k))
                detail = f" (processor_config keys differ: {keys})"
            raise VTCacheMismatchError(
                f"VT cache does not match the policy: manifest field {field!r} is {manifest.get(field)!r}, "
                f"the policy gives {policy[field]!r}{detail}; rebuild the cache with this model"
            )
    if get_adapter(model).uses_images:
        trainable = [n for n, p in get_adapter(model).vision_tower(model).named_parameters() if p.requires_grad]
        if trainable:
            msg = (
                f"the vision tower has {len(trainable)} trainable parameters (e.g. {trainable[0]}); cached VT "
                "features go stale as soon as it trains. Freeze it, or opt in explicitly "
                "(allow_trainable_vision=True) to accept stale features."
            )
            if not allow_trainable_vision:
                raise VTCacheError(msg)
            warnings.warn(msg, stacklevel=2)
