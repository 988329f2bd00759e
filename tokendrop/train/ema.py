"""Exponential moving average of the weights.

Two rules: ``torch_ema`` — the seeds' reference (library ``torch_ema``): decay at update n is
``min(decay, (1+n)/(10+n))`` and only parameters are averaged (buffers such as BatchNorm statistics are
taken from the live model); ``none`` — timm's ``ModelEmaV3`` with a constant decay, averaging
parameters and buffers. A constant 0.9999 over a few hundred steps leaves the average at its initial
weights, so short runs want the warm-up rule.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from timm.utils import ModelEmaV3


class WarmupEma(nn.Module):
    """The ``torch_ema`` rule: ``d_n = min(decay, (1+n)/(10+n))``, parameters only."""

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        super().__init__()
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
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
    def update(self, model: nn.Module) -> None:
        """Blend the live parameters in; copy the live buffers."""
        d = self.current_decay()
        self._count += 1
        self.num_updates.fill_(self._count)
        for ema_p, p in zip(self.module.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - d)
        for ema_b, b in zip(self.module.buffers(), model.buffers()):
            ema_b.copy_(b)


def build_ema(model: nn.Module, decay: float, warmup: str) -> nn.Module:
    """EMA wrapper with ``.module`` (the averaged model) and ``.update(model)``."""
    if warmup == "torch_ema":
        return WarmupEma(model, decay)
    return ModelEmaV3(model, decay=decay)
