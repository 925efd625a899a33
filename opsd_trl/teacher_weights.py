"""Teacher weights for the `ema` and `fixed` teacher modes: a shadow copy of the trainable parameters.

The shadow holds, for each trainable parameter, exactly the piece of it this rank owns: under DeepSpeed ZeRO-3 the
local partition (`param.ds_tensor`), never a gathered full tensor; otherwise the full tensor. The teacher forward
runs inside `swapped()`, which releases every gathered weight, then writes the shadow into the partitions in place,
so ZeRO-3 gathers the teacher weights exactly as it gathers the policy's. Frozen parameters never change, so the live value is the teacher's value for them.

- `ema`: after each optimizer step, shadow <- decay * shadow + (1 - decay) * policy.
- `fixed` without PEFT: the shadow is the initial policy and is never updated (one extra copy of the trainable
  weights, sharded like the model). With PEFT, the fixed teacher is the base model (adapter disabled) instead.
"""

from __future__ import annotations

import contextlib
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def _local_view(param: torch.Tensor) -> torch.Tensor:
    """The tensor this rank owns for `param`: its ZeRO-3 partition (`ds_tensor`, which every gather reads and every
    optimizer step writes, for small "persistent" parameters too), or the whole parameter without ZeRO-3."""
    return param.ds_tensor.data if hasattr(param, "ds_tensor") else param.data


def _local_piece(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's piece of the full tensor `full` of `param`: under ZeRO-3 the slice of the flattened tensor its
    partition holds (DeepSpeed partitions `param.view(-1)` into equal, zero-padded pieces in rank order), else all."""
    if not hasattr(param, "ds_tensor"):
        return full
    import torch.distributed as dist

    size = param.ds_tensor.numel()
    rank = dist.get_rank(group=param.ds_process_group) if dist.is_initialized() else 0
    flat = full.reshape(-1)[rank * size : (rank + 1) * size]
    return torch.cat([flat, flat.new_zeros(size - flat.numel())])


def _full_shape(param: torch.Tensor) -> tuple:
    return tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)


def _check_partitioned(params) -> None:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    for p in params:
        if hasattr(p, "ds_tensor") and p.ds_status != ZeroParamStatus.NOT_AVAILABLE:
            # A gathered copy would keep serving the other set of weights.
            raise RuntimeError(
                f"ZeRO-3 parameter {p.ds_id} is still gathered; teacher weights swap only while the model is fully "
                "partitioned (pass the engine's empty_partition_cache as release_gathered)."
            )


class ShadowWeights:
    def __init__(self, model: nn.Module):
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        if not self.names:
            raise ValueError(
                "the model has no trainable parameters to shadow; an EMA / fixed teacher needs some (or use "
                "teacher_mode='self')."
            )
        params = dict(model.named_parameters())
        self._params = [params[n] for n in self.names]
        # fp32 so that small EMA increments survive a bf16 policy.
        self.shadow = [_local_view(p).detach().to(torch.float32, copy=True) for p in self._params]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """shadow <- decay * shadow + (1 - decay) * live, on this rank's pieces."""
        for s, p in zip(self.shadow, self._params, strict=True):
            s.mul_(decay).add_(_local_view(p).to(s.dtype), alpha=1.0 - decay)

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped(self, release_gathered=None):
        """Inside the block the model carries the shadow (teacher) weights; the policy is restored bit-exactly on
        exit (the live values are stashed, not recovered from the fp32 shadow).

        `release_gathered` (ZeRO-3: the engine's `empty_partition_cache`) is called on entry and before the restore:
        ZeRO-3 may keep recently used weights gathered for reuse, and a gathered copy of one set of weights must never
        serve a forward meant for the other.
        """
        if release_gathered is not None:
            release_gathered()
            _check_partitioned(self._params)
        if not any(hasattr(p, "ds_tensor") for p in self._params) and all(
            p.dtype == sh.dtype for p, sh in zip(self._params, self.shadow, strict=True)
        ):
            # Same dtype, no ZeRO-3: point the parameters at the shadow tensors, no copy of the model is made.
            live = [p.data for p in self._params]
            for p, sh in zip(self._params, self.shadow, strict=True):
                p.data = sh
            try:
                yield
            finally:
                for p, data in zip(self._params, live, strict=True):
                    p.data = data
            return
        views = [_local_view(p) for p in self._params]
        stash = [v.clone() for v in views]
        for v, s in zip(views, self.shadow, strict=True):
            v.copy_(s)
        try:
            yield
        finally:
            if release_gathered is not None:
                release_gathered()
            for v, saved in zip(views, stash, strict=True):
                v.copy_(saved)

    @torch.no_grad()
    def start_from(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Set the shadow from full tensors under the model's parameter names (`ema_init_weights`; ZeRO-3: each
        rank keeps its partition's piece)."""
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ValueError(f"ema_init_weights {source} lacks {len(missing)} of the trained parameters, e.g. "
                             f"{missing[0]!r}; give weights of this model (or ema_init_weights: null).")
        for n, s, p in zip(self.names, self.shadow, self._params, strict=True):
            if tuple(state[n].shape) != _full_shape(p):
                raise ValueError(f"ema_init_weights {source}: {n!r} has shape {tuple(state[n].shape)}, the model's is "
                                 f"{_full_shape(p)}; give weights of this model (or ema_init_weights: null).")
            s.copy_(_local_piece(p, state[n]).reshape(s.shape))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: s.contiguous() for n, s in zip(self.names, self.shadow, strict=True)}

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp"
        save_file(self.state_dict(), tmp)
        os.replace(tmp, path)

    def load(self, path: str) -> None:
        state = load_file(path)
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ValueError(f"teacher shadow file {path} lacks {len(missing)} parameters, e.g. {missing[0]!r}.")
        for n, s in zip(self.names, self.shadow, strict=True):
            if state[n].shape != s.shape:
                raise ValueError(
                    f"teacher shadow {n!r} in {path} has shape {tuple(state[n].shape)}, expected {tuple(s.shape)} "
                    "(was the checkpoint written with another number of processes or ZeRO stage?)."
                )
            s.copy_(state[n])
