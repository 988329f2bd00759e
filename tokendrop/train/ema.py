"""Exponential moving average of the weights.

Two rules: ``torch_ema`` — the seeds' reference (library ``torch_ema``): decay at update n is
``min(decay, (1+n)/(10+n))`` and only parameters are averaged (buffers such as BatchNorm statistics are
taken from the live model); ``none`` — timm's ``ModelEmaV3`` with a constant decay, averaging
parameters and floating-point buffers (integer buffers are copied). A constant 0.9999 over a few hundred
steps leaves the average at its initial weights, so short runs want the warm-up rule.

Both are timm's ``ModelEmaV3`` and update with multi-tensor ``torch._foreach_*`` ops. An update is two
halves: ``prepare()`` on the host (the warm-up rule's decay, computed there and written to a device
scalar: no synchronisation per step) and ``apply(model)``, device work only, which a training step
captured in a CUDA graph replays. State dicts hold the averaged model under ``module.`` (and, for
``torch_ema``, the update count ``num_updates``).
"""

from __future__ import annotations

import torch
from torch import nn
from timm.utils import ModelEmaV3


class ConstantEma(ModelEmaV3):
    """timm's ``ModelEmaV3`` with a constant decay, its update split like :class:`WarmupEma`'s."""

    def prepare(self) -> None:
        """Nothing to do on the host: the decay never changes."""

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Blend ``model`` in with the constant decay (device work only)."""
        self.apply_update_(model, self.decay)

    def update(self, model: nn.Module, step: int | None = None) -> None:  # noqa: D102
        self.prepare()
        self.apply(model)


class WarmupEma(ModelEmaV3):
    """The ``torch_ema`` rule: ``d_n = min(decay, (1+n)/(10+n))``, parameters only (timm's warm-up rule
    differs, so the decay is ours and the update timm's ``exclude_buffers`` one).

    An update is :meth:`prepare` (host: the next decay, written into a device scalar) then :meth:`apply`
    (device only, reading that scalar), so a captured training step replays with each step's decay."""

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        super().__init__(model, decay=decay, exclude_buffers=True)
        self.module.requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("blend", torch.zeros(()), persistent=False)  # 1 − this update's decay
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
    def prepare(self) -> None:
        """Compute the next update's decay on the host and write it (and the count) to the device."""
        self.blend.fill_(1.0 - self.current_decay())
        self._count += 1
        self.num_updates.fill_(self._count)

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Blend the live parameters in with the prepared decay; copy the live buffers (device work only)."""
        averaged = list(self.module.parameters())
        # e += (p − e)·w with w a device scalar: foreach ops with a tensor factor (lerp's would read it on the host)
        torch._foreach_add_(averaged, torch._foreach_mul(torch._foreach_sub(list(model.parameters()), averaged),
                                                         self.blend))
        for ema_b, model_b in zip(self.module.buffers(), model.buffers()):
            ema_b.copy_(model_b)

    def update(self, model: nn.Module, step: int | None = None) -> None:
        """One whole update: :meth:`prepare`, then :meth:`apply`."""
        self.prepare()
        self.apply(model)


def build_ema(model: nn.Module, decay: float, warmup: str) -> nn.Module:
    """EMA wrapper with ``.module`` (the averaged model), ``.update(model)`` and its two halves
    ``.prepare()`` (host) and ``.apply(model)`` (device)."""
    if warmup == "torch_ema":
        return WarmupEma(model, decay)
    return ConstantEma(model, decay=decay)
