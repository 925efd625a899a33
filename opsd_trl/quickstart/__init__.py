"""The CPU quickstart: a tiny Qwen2.5-VL learns 3x3 mazes, then Visual-OPSD distils its VT-conditioned self."""

from .pipeline import Settings, run_quickstart

__all__ = ["Settings", "run_quickstart"]
