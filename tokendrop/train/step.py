"""One training step as the trainer runs it, without host round-trips.

Forward (with gradient saliency and the reducers' auxiliary losses), optional distillation, backward,
global-norm clipping (``foreach``), the optimizer step and the EMA update. Nothing in the step reads a
tensor's value on the host: the loss and accuracy sums and a "first non-finite step" flag stay on the
device, and :meth:`TrainStep.poll` reads them all at once, when the caller asks (the trainer every
``run.nan_check_every`` steps and at the end of each epoch). So a NaN stops a run at most that many
steps after it appeared; the step where it appeared is reported, and ``last.pt`` keeps the last good epoch.

On CUDA, ``cuda_graphs`` serves the step from CUDA graphs (:mod:`tokendrop.train.graphs`): the step's
device work (:meth:`TrainStep.compute`) updates its state in place and reads every per-step value from
device tensors, so a replay does what an eager call does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .. import reduction as red
from .distill import distill_kl
from .graphs import CudaGraphBackend, StepGraphs, print_notice


class NonFiniteLossError(RuntimeError):
    """The training loss or gradient became NaN or infinite."""


def autocast_context(device: torch.device, amp: str, cache: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (``auto``/``bf16``), full precision elsewhere; ``cache=False`` for a step
    captured in a CUDA graph (autocast's cache of cast weights must not outlive the capture)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache)


def graph_blockers(model: nn.Module, net: nn.Module) -> list[str]:
    """Why the step through ``model`` (run as ``net``) cannot be captured in a CUDA graph; empty if it can."""
    reasons = red.capture_blockers(model)
    if isinstance(getattr(net, "_orig_mod", net), nn.parallel.DistributedDataParallel):  # compiled or not
        reasons.append("DDP")
    return reasons


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
    (the non-finite check reads it). ``teacher`` adds ``distill_weight`` × :func:`distill_kl`.

    ``cuda_graphs``: on CUDA, capture and replay the step (:class:`~tokendrop.train.graphs.StepGraphs`);
    what cannot be captured runs eagerly after a one-line ``notice``; elsewhere the flag does nothing
    unless a ``graph_backend`` is given (the tests give one that replays on the CPU)."""

    def __init__(self, model: nn.Module, net: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device: torch.device, *,
                 amp: str = "auto", clip_grad: float = 0.0, ema: nn.Module | None = None,
                 teacher: nn.Module | None = None, distill_weight: float = 0.0, distill_temperature: float = 1.0,
                 cuda_graphs: bool = False, graph_backend: CudaGraphBackend | None = None,
                 notice: Callable[[str], None] = print_notice) -> None:
        self.model, self.net, self.optimizer, self.loss_fn, self.device = model, net, optimizer, loss_fn, device
        self.amp, self.max_norm, self.ema = amp, clip_grad or float("inf"), ema
        self.teacher, self.distill_weight, self.distill_temperature = teacher, distill_weight, distill_temperature
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device)
        self.first_bad = torch.zeros((), device=device)
        self.step_index = torch.zeros((), device=device)  # steps since reset, counted on the device
        self.graphs: StepGraphs | None = None
        if cuda_graphs and (device.type == "cuda" or graph_backend is not None):
            blockers = graph_blockers(model, net)
            if blockers:
                notice(f"notice: run.cuda_graphs: the step runs eagerly ({'; '.join(blockers)} cannot be captured)")
            else:
                self.graphs = StepGraphs(self.compute, optimizer, device, backend=graph_backend, notice=notice,
                                         on_failure=lambda: red.aux_loss(model))  # drop what a failed capture left
        self.reset()

    def reset(self) -> None:
        """Zero the sums and the non-finite flag (at the start of an epoch), in place: graphs read them."""
        for t in (self.loss_sum, self.correct, self.step_index):
            t.zero_()
        self.first_bad.fill_(-1.0)
        self.seen = 0
        self.steps = 0

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """One step on ``images`` with ``targets`` (class indices, or soft targets after Mixup); accuracy
        counts against ``labels`` (default: ``targets``)."""
        labels = targets if labels is None else labels
        if self.ema is not None:
            self.ema.prepare()  # host side: the decay of this step's update, written to the device
        if self.graphs is None:
            self.compute(images, targets, labels)
        else:
            self.graphs(red.step_signature(self.model), images, targets, labels)
        self.seen += labels.shape[0]
        self.steps += 1

    def compute(self, images: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor) -> None:
        """The step's device work; state changes in place only, so that it can be captured and replayed."""
        with autocast_context(self.device, self.amp, cache=self.graphs is None):
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
        with torch.no_grad():
            bad = ~(torch.isfinite(loss) & torch.isfinite(norm))
            self.first_bad.copy_(torch.where(bad & (self.first_bad < 0), self.step_index, self.first_bad))
        self.optimizer.step()
        if self.ema is not None:
            self.ema.apply(self.model)
        with torch.no_grad():
            self.loss_sum.add_(loss.detach() * labels.shape[0])
            self.correct.add_((logits.argmax(1) == labels).sum())
            self.step_index.add_(1)

    def poll(self) -> StepTotals:
        """Read the sums and the flag from the device (one synchronisation)."""
        loss_sum, correct, first_bad = torch.stack([self.loss_sum, self.correct, self.first_bad]).tolist()
        return StepTotals(loss_sum, correct, self.seen, int(first_bad))
