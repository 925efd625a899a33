"""VT cache: visual-thought images encoded once by the vision tower + projector, stored as safetensors shards
with a JSON index and manifest, read back by sample id. Format: ``docs/vt_cache.md``."""

from ..images import decode_image
from .build import build_vt_cache, import_vt_embeddings, sample_ids
from .encoders import (
    EncodedImage,
    VisionEncoder,
    VTEncoder,
    config_fingerprint,
    encoder_fingerprint,
    load_encoder,
    weights_sha256,
)
from .format import (
    FORMAT_VERSION,
    BadImageError,
    VTCacheCorruptError,
    VTCacheError,
    VTCacheMismatchError,
    problem_digest,
    vt_digest,
)
from .load import CachedImages, ProblemImages, VTCache, VTEntry, check_vts
from .verify import check_compatible, policy_fingerprint, verify_vt_cache

__all__ = [
    "FORMAT_VERSION",
    "BadImageError",
    "CachedImages",
    "EncodedImage",
    "VisionEncoder",
    "VTCache",
    "VTCacheCorruptError",
    "VTCacheError",
    "VTCacheMismatchError",
    "VTEncoder",
    "VTEntry",
    "build_vt_cache",
    "check_compatible",
    "check_vts",
    "config_fingerprint",
    "decode_image",
    "encoder_fingerprint",
    "import_vt_embeddings",
    "load_encoder",
    "policy_fingerprint",
    "problem_digest",
    "ProblemImages",
    "sample_ids",
    "vt_digest",
    "verify_vt_cache",
    "weights_sha256",
]
