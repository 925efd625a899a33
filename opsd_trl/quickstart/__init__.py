"""The CPU quickstart: a tiny Qwen2.5-VL learns 3x3 mazes, then Visual-OPSD distils its VT-conditioned self."""

__all__ = ["Settings", "run_quickstart"]


def __getattr__(name: str):
    # Lazy: `tiny:quickstart` imports `opsd_trl.quickstart.policy` alone, without the pipeline's trainer and eval.
    if name in __all__:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'opsd_trl.quickstart' has no attribute {name!r}")
