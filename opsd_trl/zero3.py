"""ZeRO-3 helpers shared by the teacher pass and the vLLM weight sync."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def gathered(params):
    """Full values of `params` inside the block under ZeRO-3 (read only); a no-op otherwise."""
    from_zero3 = [p for p in params if hasattr(p, "ds_tensor")]
    if from_zero3:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        # Already-gathered ones (persistent parameters) are left alone: re-partitioning them on exit would drop them.
        from_zero3 = [p for p in from_zero3 if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    params = from_zero3
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield
