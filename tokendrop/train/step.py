"""One training step as the trainer runs it, without host round-trips.

Forward (with gradient saliency and the reducers' auxiliary losses), optional distillation, backward,
global-norm clipping (``foreach``), the optimizer step and the EMA update. Nothing in the step reads a
tensor's value on the host: the loss and accuracy sums and a "first non-finite step" flag stay on the
device, and :meth:`TrainStep.poll` reads them all at once, when the caller asks (the trainer every
``run.nan_check_every`` steps and at the end of each epoch). So a NaN stops a run at most that many
steps after it appeared; the step where it appeared is reported, and ``last.pt`` keeps the last good epoch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .. import reduction as red
from .distill import distill_kl


class NonFiniteLossError(RuntimeError):
    """The training loss or gradient became NaN or infinite."""


def autocast_context(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (``auto``/``bf16``), full precision elsewhere."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@dataclass
class StepTotals:
    """What :meth:`TrainStep.poll` read: sums over the steps since :meth:`TrainStep.reset`."""

    loss_sum: float  # the per-step mean loss times the batch size
    correct: float  # top-1 hits against the unmixed labels
    seen: int
    first_bad: int  # index (0-based, since reset) of the first step with a non-finite loss or gradient; -1 = none


class TrainStep:
    """Call with a batch to train on it; ``model`` is the unwrapped model, ``net`` what runs the forward
    (the model, its DDP wrapper or its compiled form). ``clip_grad`` 0 measures the norm without clipping
    (the non-finite check reads it). ``teacher`` adds ``distill_weight`` × :func:`distill_kl`."""

    def __init__(self, model: nn.Module, net: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device: torch.device, *,
                 amp: str = "auto", clip_grad: float = 0.0, ema: nn.Module | None = None,
                 teacher: nn.Module | None = None, distill_weight: float = 0.0, distill_temperature: float = 1.0) -> None:
        self.model, self.net, self.optimizer, self.loss_fn, self.device = model, net, optimizer, loss_fn, device
        self.amp, self.max_norm, self.ema = amp, clip_grad or float("inf"), ema
        self.teacher, self.distill_weight, self.distill_temperature = teacher, distill_weight, distill_temperature
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.reset()

    def reset(self) -> None:
        """Zero the sums and the non-finite flag (at the start of an epoch)."""
        self.loss_sum = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device)
        self.first_bad = torch.full((), -1.0, device=self.device)
        self.seen = 0
        self.steps = 0

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """One step on ``images`` with ``targets`` (class indices, or soft targets after Mixup); accuracy
        counts against ``labels`` (default: ``targets``)."""
        labels = targets if labels is None else labels
        with autocast_context(self.device, self.amp):
            red.prepare_step(self.model, images, targets, lambda out, t: self.loss_fn(out.float(), t))
            logits = self.net(images)
            loss = self.loss_fn(logits.float(), targets) + red.aux_loss(self.model)
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits = self.teacher(images)
                loss = loss + self.distill_weight * distill_kl(logits, teacher_logits, self.distill_temperature)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # always: under DDP every process must join the gradient all-reduce
        # The norm of the all-reduced gradients is NaN on every process if any process's loss was, so all
        # processes flag the same step.
        norm = nn.utils.clip_grad_norm_(self.params, self.max_norm, foreach=True)
        bad = ~(torch.isfinite(loss) & torch.isfinite(norm))
        self.first_bad = torch.where(bad & (self.first_bad < 0), float(self.steps), self.first_bad)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        n = labels.shape[0]
        with torch.no_grad():
            self.loss_sum += loss.detach() * n
            self.correct += (logits.argmax(1) == labels).sum()
        self.seen += n
        self.steps += 1

    def poll(self) -> StepTotals:
        """Read the sums and the flag from the device (one synchronisation)."""
        loss_sum, correct, first_bad = torch.stack([self.loss_sum, self.correct, self.first_bad]).tolist()
        return StepTotals(loss_sum, correct, self.seen, int(first_bad))
