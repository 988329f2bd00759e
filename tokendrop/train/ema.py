"""Exponential moving average of the weights.

Two rules: ``torch_ema`` — the seeds' reference (library ``torch_ema``): decay at update n is
``min(decay, (1+n)/(10+n))`` and only parameters are averaged (buffers such as BatchNorm statistics are
taken from the live model); ``none`` — timm's ``ModelEmaV3`` with a constant decay, averaging
parameters and floating-point buffers (integer buffers are copied). A constant 0.9999 over a few hundred
steps leaves the average at its initial weights, so short runs want the warm-up rule.

Both are timm's ``ModelEmaV3``, which updates with multi-tensor ``torch._foreach_*`` ops; the warm-up
rule's decay is computed on the host (no device synchronisation per step). State dicts hold the averaged
model under ``module.`` (and, for ``torch_ema``, the update count ``num_updates``).
"""

from __future__ import annotations

import torch
from torch import nn
from timm.utils import ModelEmaV3


class WarmupEma(ModelEmaV3):
    """The ``torch_ema`` rule: ``d_n = min(decay, (1+n)/(10+n))``, parameters only (timm's warm-up rule
    differs, so the decay is ours and the update timm's ``exclude_buffers`` one)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        super().__init__(model, decay=decay, exclude_buffers=True)
        self.module.requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._count: int | None = None  # Python mirror of num_updates (no device sync per step)

    def current_decay(self) -> float:
        """Decay used by the next update."""
        if self._count is None:
            self._count = int(self.num_updates)
        n = self._count + 1
        return min(self.decay, (1 + n) / (10 + n))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # noqa: D102
        self._count = None  # re-read from the loaded buffer
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        """Blend the live parameters in with this update's decay; copy the live buffers."""
        decay = self.current_decay()
        self._count += 1
        self.num_updates.fill_(self._count)
        self.apply_update_no_buffers_(model, decay)


def build_ema(model: nn.Module, decay: float, warmup: str) -> nn.Module:
    """EMA wrapper with ``.module`` (the averaged model) and ``.update(model)``."""
    if warmup == "torch_ema":
        return WarmupEma(model, decay)
    return ModelEmaV3(model, decay=decay)
