"""Exponential moving average of the weights.

Two rules: ``torch_ema`` — the seeds' reference (library ``torch_ema``): decay at update n is
``min(decay, (1+n)/(10+n))`` and only parameters are averaged (buffers such as BatchNorm statistics are
taken from the live model); ``none`` — timm's ``ModelEmaV3`` rule with a constant decay, averaging
parameters and floating-point buffers (integer buffers are copied). A constant 0.9999 over a few hundred
steps leaves the average at its initial weights, so short runs want the warm-up rule.

Both update with multi-tensor ``torch._foreach_*`` ops and compute the decay on the host (no device
synchronisation per step). State dicts hold the averaged model under ``module.`` (and, for
``torch_ema``, the update count ``num_updates``), as timm's ``ModelEmaV3`` does.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class _ForeachEma(nn.Module):
    """The averaged copy ``module`` and a multi-tensor update; subclasses choose the decay and what is averaged."""

    average_buffers = False

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    def current_decay(self) -> float:
        """Decay used by the next update."""
        return self.decay

    def _advance(self) -> None:
        """Count one update (after :meth:`current_decay` was read)."""

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the live model in (``ema ← ema + (1 − d)(live − ema)``); copy what is not averaged."""
        weight = 1.0 - self.current_decay()
        self._advance()
        lerp_e, lerp_m, copy_e, copy_m = list(self.module.parameters()), list(model.parameters()), [], []
        for e, m in zip(self.module.buffers(), model.buffers()):
            averaged = self.average_buffers and e.is_floating_point()
            (lerp_e if averaged else copy_e).append(e)
            (lerp_m if averaged else copy_m).append(m)
        torch._foreach_lerp_(lerp_e, [m.detach() for m in lerp_m], weight)
        if copy_e:
            torch._foreach_copy_(copy_e, copy_m)


class WarmupEma(_ForeachEma):
    """The ``torch_ema`` rule: ``d_n = min(decay, (1+n)/(10+n))``, parameters only."""

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        super().__init__(model, decay)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._count: int | None = None  # Python mirror of num_updates (no device sync per step)

    def current_decay(self) -> float:
        """Decay used by the next update."""
        if self._count is None:
            self._count = int(self.num_updates)
        n = self._count + 1
        return min(self.decay, (1 + n) / (10 + n))

    def _advance(self) -> None:
        self._count += 1
        self.num_updates.fill_(self._count)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # noqa: D102
        self._count = None  # re-read from the loaded buffer
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


class ConstantEma(_ForeachEma):
    """timm's ``ModelEmaV3`` rule (no warm-up): a constant decay, parameters and floating-point buffers."""

    average_buffers = True


def build_ema(model: nn.Module, decay: float, warmup: str) -> nn.Module:
    """EMA wrapper with ``.module`` (the averaged model) and ``.update(model)``."""
    if warmup == "torch_ema":
        return WarmupEma(model, decay)
    return ConstantEma(model, decay)
