"""Visual On-Policy Self-Distillation (Visual-OPSD) for Hugging Face TRL.

What users import: the config and trainer pair, the loss functions, the VT cache (build, load, check), evaluation and
model loading. Heavy imports (the trainer pulls in TRL and transformers) are resolved lazily so that
``import opsd_trl`` stays cheap. In-code test fixtures live in ``opsd_trl.testing`` and are not exported here.
"""

__version__ = "0.1.0"

_LAZY = {
    # training
    "VisualOPSDConfig": "opsd_trl.config",
    "VisualOPSDTrainer": "opsd_trl.trainer",
    # losses
    "generalized_jsd": "opsd_trl.losses",
    "sampled_token_reverse_kl": "opsd_trl.losses",
    "fused_generalized_jsd": "opsd_trl.fused_loss",
    # VT cache
    "build_vt_cache": "opsd_trl.vt_cache",
    "import_vt_embeddings": "opsd_trl.vt_cache",
    "load_encoder": "opsd_trl.vt_cache",
    "VTCache": "opsd_trl.vt_cache",
    "check_compatible": "opsd_trl.vt_cache",
    "verify_vt_cache": "opsd_trl.vt_cache",
    # evaluation
    "evaluate": "opsd_trl.eval",
    "evaluate_checkpoints": "opsd_trl.eval",
    # loading
    "load_pretrained": "opsd_trl.models.loading",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'opsd_trl' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
