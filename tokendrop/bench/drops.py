"""The drop grid: training and inference speed-up of one network at several drop ratios against d = 0,
with the MACs counted and in closed form."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .flops import count_macs, count_train_macs
from .probe import DropProbe, FixedBatchStep, InferStep, StepSpec, build_train_step, input_batch
from .timing import Timing, interleaved_rounds

__all__ = ["DropResult", "measure_drops"]


@dataclass
class DropResult:
    """One benchmark row: a network with sites at ``blocks`` dropping ``drop_ratio``, at ``batch_size``."""

    model: str
    blocks: list[int]
    drop_ratio: float
    batch_size: int
    patch_tokens: int
    kept_tokens: list[int]  # patch tokens after each site
    train: Timing | None = None
    infer: Timing | None = None
    macs_counted: int | None = None  # forward MACs per image, FlopCounterMode
    macs_analytic: int = 0  # forward MACs per image, closed form from the kept token counts
    macs_agreement_pct: float | None = None  # |counted − analytic| / analytic, percent
    train_macs_counted: int | None = None  # forward + backward MACs per image, FlopCounterMode
    ideal_speedup: float = 1.0  # analytic forward MACs at d = 0 / at this d
    ideal_train_speedup: float | None = None  # counted training MACs at d = 0 / at this d
    train_efficiency: float | None = None  # measured training speed-up / ideal
    infer_efficiency: float | None = None
    peak_memory_mb: float | None = None
    memory_vs_no_drop: float | None = None
    memory_method: str | None = None


def measure_drops(name: str, probe: DropProbe, drops: Sequence[float], batch_size: int, device: torch.device,
                  rounds: int = 5, warmup: int = 2, infer: bool = True, count: bool = True, seed: int = 0,
                  on_round: Callable[[], None] | None = None, step: StepSpec | None = None) -> list[DropResult]:
    """Time training (and, with ``infer``, inference) of ``probe.model`` at every drop ratio in ``drops``
    against d = 0, in interleaved rounds; with ``count``, count MACs with FlopCounterMode beside the
    closed form. d = 0 is always measured: it is the baseline (its row has speed-up 1). The training step
    is the trainer's, built from ``step`` (default :class:`StepSpec`) by :func:`build_train_step`.

    Returns one :class:`DropResult` per drop ratio (d = 0 first); memory fields are left empty
    (see :func:`peak_train_memory`).
    """
    drops = sorted({0.0, *(float(d) for d in drops)})
    model = probe.model.to(device)
    images, targets = input_batch(model, batch_size, device, seed)
    rows: list[DropResult] = []
    for d in drops:
        probe.set(d)
        rows.append(DropResult(name, list(probe.blocks), d, batch_size, probe.num_patches, probe.kept(),
                               macs_analytic=probe.analytic_macs()))
    base_macs = rows[0].macs_analytic
    for r in rows:
        r.ideal_speedup = base_macs / r.macs_analytic

    if count:
        xs, ys = input_batch(model, 2, device, seed + 1)
        for r in rows:
            probe.set(r.drop_ratio)
            model.eval()
            r.macs_counted = count_macs(model, xs) // 2
            r.macs_agreement_pct = 100.0 * abs(r.macs_counted - r.macs_analytic) / r.macs_analytic
            if not probe.needs_gradient:  # gradient saliency needs prepare_step; not counted here
                r.train_macs_counted = count_train_macs(model, xs, ys) // 2
        if rows[0].train_macs_counted:
            for r in rows:
                if r.train_macs_counted:
                    r.ideal_train_speedup = rows[0].train_macs_counted / r.train_macs_counted

    def variant(step: Callable[[], None], d: float) -> Callable[[], None]:
        def run() -> None:
            probe.set(d)
            step()
        return run

    key = {r.drop_ratio: f"d={r.drop_ratio:g}" for r in rows}
    train_step = FixedBatchStep(build_train_step(model, step or StepSpec(), device), images, targets)
    timing = interleaved_rounds({key[d]: variant(train_step, d) for d in drops}, key[0.0], rounds, warmup,
                                device, seed, on_round)
    for r in rows:
        r.train = Timing.from_paired(timing, key[r.drop_ratio], batch_size)
        r.train_efficiency = r.train.speedup / r.ideal_speedup
    if infer:
        infer_step = InferStep(model, images)
        timing = interleaved_rounds({key[d]: variant(infer_step, d) for d in drops}, key[0.0], rounds, warmup,
                                    device, seed + 1, on_round)
        for r in rows:
            r.infer = Timing.from_paired(timing, key[r.drop_ratio], batch_size)
            r.infer_efficiency = r.infer.speedup / r.ideal_speedup
    probe.set(0.0)
    model.zero_grad(set_to_none=True)
    return rows
