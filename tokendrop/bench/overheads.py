"""Overheads of the reduction machinery: CLS-attention saliency at d = 0, and the fused attention against an
explicit ``softmax(QKᵀ)``."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .probe import DropProbe, FixedBatchStep, StepSpec, build_train_step, input_batch
from .timing import interleaved_rounds

__all__ = ["OverheadResult", "measure_overheads"]


@dataclass
class OverheadResult:
    """Saliency overhead and fused-versus-explicit attention for one network and batch size."""

    model: str
    batch_size: int
    block: int
    step_median_s: float  # d = 0, saliency skipped (the plain network)
    saliency_step_median_s: float  # d = 0 with always_reduce: saliency + top-k computed, nothing dropped
    saliency_overhead_pct: float  # median paired (saliency / plain − 1), percent of the training step
    explicit_step_median_s: float  # same network, timm's explicit softmax(QKᵀ) attention
    explicit_over_ours: float  # median paired explicit / ours (> 1: ours is faster)


def measure_overheads(name: str, model: nn.Module, block: int, batch_size: int, device: torch.device,
                      rounds: int = 5, warmup: int = 2, seed: int = 0,
                      on_round: Callable[[], None] | None = None, step: StepSpec | None = None) -> OverheadResult:
    """Training step of ``model`` (no drop) against (a) a site at ``block`` at d = 0 with
    ``always_reduce=True`` (saliency computed, nothing dropped) and (b) a copy of the network whose
    attention materialises ``softmax(QKᵀ)`` (timm's ``fused_attn = False``), in interleaved rounds.
    ``model`` must have no sites; it is used in place. Both steps are the trainer's, built from ``step``
    (default :class:`~tokendrop.bench.probe.StepSpec`)."""
    model.to(device)
    explicit = copy.deepcopy(model)
    for blk in explicit.blocks:
        if hasattr(blk.attn, "fused_attn"):
            blk.attn.fused_attn = False
    probe = DropProbe(model, [block])  # d = 0: inactive unless always_reduce
    images, targets = input_batch(model, batch_size, device, seed)
    spec = step or StepSpec()
    ours = FixedBatchStep(build_train_step(model, spec, device), images, targets)
    theirs = FixedBatchStep(build_train_step(explicit, spec, device), images, targets)

    def plain() -> None:
        probe.set_always_reduce(False)
        ours()

    def salient() -> None:
        probe.set_always_reduce(True)
        ours()

    t = interleaved_rounds({"ours": plain, "saliency": salient, "explicit": theirs}, "ours", rounds, warmup,
                           device, seed, on_round)
    probe.set_always_reduce(False)
    return OverheadResult(name, batch_size, block, t.median("ours"), t.median("saliency"),
                          100.0 * t.overhead("saliency"), t.median("explicit"), 1.0 + t.overhead("explicit"))
