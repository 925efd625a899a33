"""Visual On-Policy Self-Distillation (Visual-OPSD) for Hugging Face TRL.

Heavy imports (the trainer pulls in TRL and transformers) are resolved lazily so that ``import opsd_trl`` stays
cheap for the pure helpers (losses, tasks, cache format).
"""

__version__ = "0.1.0"

_LAZY = {
    "VisualOPSDConfig": "opsd_trl.config",
    "VisualOPSDTrainer": "opsd_trl.trainer",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'opsd_trl' has no attribute {name!r}")
