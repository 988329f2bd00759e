"""A whole schedule's wall time projected from step times measured at a few drop ratios."""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..reduction import Schedule
from .drops import DropResult
from .probe import DropProbe

__all__ = ["KNOWN_TRAIN_SIZES", "Projection", "drop_points", "epoch_drop_ratios", "project_schedule", "seconds_at",
           "steps_per_epoch", "train_set_size"]

KNOWN_TRAIN_SIZES = {"cifar10": 50_000, "cifar100": 50_000, "fashion-mnist": 60_000, "digits": 1347}
"""Train-set sizes used when the data files are not on this machine (the projection only needs the count)."""


def train_set_size(cfg: Any) -> int:
    """Training images per epoch: the data set's files when present, else its known size; ``train_subset``
    applies."""
    n = KNOWN_TRAIN_SIZES.get(cfg.data.dataset)
    if n is None:
        from ..train.data import build_datasets

        train, _, _ = build_datasets(dataclasses.replace(cfg.data, download=False), cfg.augment, cfg.seed)
        n = len(train)
    sub = cfg.data.train_subset
    return min(n, sub) if sub > 0 else n


def steps_per_epoch(train_size: int, batch_size: int, drop_last: bool) -> int:
    """Optimizer steps per epoch: ``⌊n / b⌋`` with ``drop_last`` (the trainer drops the last partial batch
    when Mixup/CutMix is on), else ``⌈n / b⌉``."""
    return train_size // batch_size if drop_last else -(-train_size // batch_size)


def epoch_drop_ratios(schedule: Schedule, epochs: int, steps: int = 1, per_step: bool = False) -> list[list[float]]:
    """Drop ratio of every step, grouped by epoch: ``d(e)`` once per epoch (the reference, epochs counted
    from 0 as the trainer does) or, ``per_step``, ``d(e + s / steps)`` for every step s."""
    if per_step:
        return [[schedule(e + s / steps) for s in range(steps)] for e in range(epochs)]
    return [[schedule(float(e))] for e in range(epochs)]


@dataclass
class Projection:
    """Predicted wall time of a whole schedule against the same run without drop."""

    epochs: int
    steps_per_epoch: int
    batch_size: int
    points: list[dict]  # measured points: drop_ratio, kept_tokens, macs_per_image, step_s
    epoch_drop: list[float]  # mean drop ratio per epoch
    epoch_step_s: list[float]  # predicted mean step time per epoch
    predicted_s: float
    no_drop_s: float
    speedup: float  # no_drop_s / predicted_s
    ideal_speedup: float  # the same sums with analytic MACs in place of step times
    config: str = ""
    model: str = ""
    blocks: list[int] = field(default_factory=list)
    schedule: str = ""
    measured_batch_size: int = 0
    notes: list[str] = field(default_factory=list)


def project_schedule(probe: DropProbe, epoch_drops: Sequence[Sequence[float]], step_s: Mapping[float, float],
                     steps: int, batch_size: int) -> Projection:
    """Project a schedule's wall time from step times measured at a few drop ratios.

    ``epoch_drops``: the drop ratio of every step of every epoch (:func:`epoch_drop_ratios`).
    ``step_s``: measured seconds per step at some drop ratios (d = 0 required). Each step's time is
    interpolated linearly in analytic MACs between the measured points (flat beyond them), since the
    step time is close to linear in MACs. Predicted time = Σ over epochs of mean step time × ``steps``;
    the no-drop run is ``epochs × steps × step_s[0]``. The ideal speed-up is the same ratio with the
    analytic forward MACs of each step's kept token counts in place of the times.
    """
    if 0.0 not in step_s:
        raise ValueError("step_s: the no-drop time (d = 0) is needed")
    macs_cache: dict[float, int] = {}

    def macs(d: float) -> int:
        if d not in macs_cache:
            macs_cache[d] = probe.analytic_macs(d)
        return macs_cache[d]

    points = sorted(((macs(d), t, d) for d, t in step_s.items()), key=lambda p: p[0])
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]

    def interp(m: float) -> float:
        if m <= xs[0]:
            return ys[0]
        if m >= xs[-1]:
            return ys[-1]
        for i in range(1, len(xs)):
            if m <= xs[i]:
                x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
                return y0 if x1 == x0 else y0 + (y1 - y0) * (m - x0) / (x1 - x0)
        return ys[-1]

    epoch_step, epoch_macs, epoch_drop = [], [], []
    for drops in epoch_drops:
        epoch_step.append(statistics.fmean(interp(macs(d)) for d in drops))
        epoch_macs.append(statistics.fmean(macs(d) for d in drops))
        epoch_drop.append(statistics.fmean(drops))
    epochs = len(epoch_drops)
    predicted = steps * sum(epoch_step)
    no_drop = steps * epochs * step_s[0.0]
    ideal = epochs * macs(0.0) / sum(epoch_macs)
    pts = []
    for d, t in sorted(step_s.items()):
        probe.set(d)
        pts.append({"drop_ratio": d, "kept_tokens": probe.kept(), "macs_per_image": macs(d), "step_s": t})
    probe.set(0.0)
    return Projection(epochs, steps, batch_size, pts, epoch_drop, epoch_step, predicted, no_drop,
                      no_drop / predicted, ideal)


def drop_points(epoch_drops: Sequence[Sequence[float]], extra: Sequence[float] = ()) -> list[float]:
    """Drop ratios to measure for a projection: 0, the schedule's smallest and largest drop ratio, and the
    ``extra`` ratios between them."""
    flat = [d for ep in epoch_drops for d in ep]
    lo, hi = min(flat), max(flat)
    return sorted({0.0, lo, hi, *(float(d) for d in extra if lo < d < hi)})


def seconds_at(rows: Sequence[DropResult], batch_size: int) -> dict[float, float]:
    """Step seconds per drop ratio from measured rows, from the paired ratios (baseline median / speed-up),
    scaled linearly from the measured batch size to ``batch_size``."""
    scale = batch_size / rows[0].batch_size
    return {r.drop_ratio: scale * r.train.baseline_median_s / r.train.speedup for r in rows if r.train is not None}
