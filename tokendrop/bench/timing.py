"""Timing on shared machines (DESIGN.md): interleaved rounds and paired ratios.

The variants of one network are timed in *interleaved rounds* — every round times the baseline, then each
variant once (in a shuffled order), and a closing baseline ends the last round. A variant's speed-up is the
median over rounds of ``reference / time`` where ``reference`` is the geometric mean of the baselines that
bracket it; the medians of the raw times are reported beside it. A single median per variant drifts by tens
of percent on a shared machine; paired ratios cancel most of that drift. Every timed call synchronises the
device.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from .machine import synchronize

__all__ = ["PairedTiming", "Timing", "interleaved_rounds"]


@dataclass
class PairedTiming:
    """Times (seconds) of interleaved rounds: ``baseline`` has one more entry than each variant
    (the closing baseline); variant ``v`` in round ``r`` is paired with baselines ``r`` and ``r + 1``."""

    baseline_name: str
    baseline: list[float]
    variants: dict[str, list[float]]

    def _ratios(self, name: str) -> list[float]:
        """Per round ``time(name) / reference`` with the geometric mean of the bracketing baselines."""
        if name == self.baseline_name:
            return [1.0] * (len(self.baseline) - 1)
        ts = self.variants[name]
        return [t / math.sqrt(self.baseline[r] * self.baseline[r + 1]) for r, t in enumerate(ts)]

    def median(self, name: str) -> float:
        """Median raw time of ``name`` (seconds)."""
        return statistics.median(self.baseline if name == self.baseline_name else self.variants[name])

    def minimum(self, name: str) -> float:
        """Fastest raw time of ``name`` (seconds)."""
        return min(self.baseline if name == self.baseline_name else self.variants[name])

    def speedup(self, name: str) -> float:
        """Median over rounds of the paired ratio ``reference / time`` (> 1: faster than the baseline)."""
        return statistics.median(1.0 / r for r in self._ratios(name))

    def speedup_quartiles(self, name: str) -> tuple[float, float]:
        """Lower and upper quartile of the paired speed-up ratios (the spread over rounds)."""
        vals = sorted(1.0 / r for r in self._ratios(name))
        if len(vals) < 2:
            return vals[0], vals[0]
        q = statistics.quantiles(vals, n=4, method="inclusive")
        return q[0], q[2]

    def speedup_over(self, name: str, reference: str) -> float:
        """Median over rounds of ``time(reference) / time(name)`` for two variants timed in the same rounds
        (> 1: ``name`` is faster)."""
        return statistics.median(r / t for t, r in zip(self.variants[name], self.variants[reference]))

    def overhead(self, name: str) -> float:
        """Median over rounds of ``time / reference − 1`` (a fraction; > 0: slower than the baseline)."""
        return statistics.median(self._ratios(name)) - 1.0


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def interleaved_rounds(calls: Mapping[str, Callable[[], Any]], baseline: str, rounds: int, warmup: int = 1,
                       device: torch.device = torch.device("cpu"), seed: int = 0,
                       on_round: Callable[[], None] | None = None) -> PairedTiming:
    """Time ``calls`` in ``rounds`` interleaved rounds against ``calls[baseline]``.

    First every call runs ``warmup`` times (allocator, optimizer state, caches). Each round then times the
    baseline and every other call once, in an order shuffled per round (seeded), and a closing baseline
    follows the last round, so every variant sits between two baseline times.
    """
    if baseline not in calls:
        raise ValueError(f"baseline: {baseline!r} is not one of the calls {list(calls)}")
    if rounds < 1:
        raise ValueError(f"rounds: {rounds!r} must be >= 1")
    for _ in range(max(0, warmup)):
        for fn in calls.values():
            fn()
    synchronize(device)
    others = [n for n in calls if n != baseline]
    rng = random.Random(seed)
    base: list[float] = []
    times: dict[str, list[float]] = {n: [] for n in others}
    for _ in range(rounds):
        base.append(_timed(calls[baseline], device))
        rng.shuffle(others)
        for n in others:
            times[n].append(_timed(calls[n], device))
        if on_round is not None:
            on_round()
    base.append(_timed(calls[baseline], device))
    return PairedTiming(baseline, base, times)


@dataclass
class Timing:
    """Timing of one variant against the d = 0 baseline (seconds, images/s, paired speed-up)."""

    median_s: float
    baseline_median_s: float
    images_per_s: float
    speedup: float  # median of paired ratios baseline / variant
    speedup_q25: float
    speedup_q75: float
    min_s: float  # fastest step: other load on the machine only ever adds time
    speedup_of_minima: float  # fastest baseline step / fastest variant step (a second, load-robust estimate)

    @classmethod
    def from_paired(cls, t: PairedTiming, name: str, batch_size: int) -> "Timing":
        med = t.median(name)
        q25, q75 = t.speedup_quartiles(name)
        fastest = t.minimum(name)
        return cls(med, t.median(t.baseline_name), batch_size / med, t.speedup(name), q25, q75, fastest,
                   t.minimum(t.baseline_name) / fastest)
