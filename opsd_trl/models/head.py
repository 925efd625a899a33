"""The output head: how a model makes logits from its final hidden states. The loss (both paths), the logged
diagnostics, evaluation and the tests all make logits through `OutputHead`, so they agree with each other and with
the model's own forward.

What a head applies is what TRL's `DistillationTrainer._compute_loss` applies: the `lm_head` weight and bias, one
logit scale (the first set of `logit_scale`, `output_multiplier`, `lm_head_multiplier`, else `logits_scaling`,
which divides the logits: Granite, MiniCPM3; HyperCLOVA X multiplies by it), then final-logit softcapping.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

# Multipliers of the logits, in TRL's order of precedence (`logits_scaling` is handled after them).
_SCALE_FIELDS = ("logit_scale", "output_multiplier", "lm_head_multiplier")


def logit_scale(config) -> float:
    """The factor a text config's model multiplies its logits by before softcapping (1.0 when none)."""
    for field in _SCALE_FIELDS:
        value = getattr(config, field, None)
        if value is not None:
            return float(value)
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None:
        return float(scaling) if getattr(config, "model_type", "") == "hyperclovax" else 1.0 / scaling
    return 1.0


@dataclass(frozen=True)
class OutputHead:
    """Logits `softcap(scale * (hidden @ weight.T + bias))`; `weight` `(V, H)`, `bias` `(V,)` or None, `softcap`
    None for none. `module` is the model's output-embedding module (None for a head made from a bare weight)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None
    module: nn.Module | None = None

    @classmethod
    def of(cls, model: nn.Module) -> OutputHead:
        """The head of a (possibly PEFT- or accelerate-wrapped) transformers model."""
        module = model.get_output_embeddings()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = base.config.get_text_config()
        return cls(weight=module.weight, bias=getattr(module, "bias", None), scale=logit_scale(config),
                   softcap=getattr(config, "final_logit_softcapping", None), module=module)

    def with_weight(self, weight: torch.Tensor) -> OutputHead:
        """The same head with another weight (e.g. the EMA teacher's)."""
        return replace(self, weight=weight)

    def to(self, dtype: torch.dtype) -> OutputHead:
        """The head with its weight and bias in `dtype` (no copy when they already are)."""
        bias = None if self.bias is None else self.bias.to(dtype)
        return replace(self, weight=self.weight.to(dtype), bias=bias)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states `(..., H)` -> logits `(..., V)`, as the model's forward makes them."""
        logits = nn.functional.linear(hidden, self.weight, self.bias)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits
