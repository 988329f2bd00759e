"""Drop-ratio schedules: how many tokens a site removes as training progresses.

A schedule maps the (possibly fractional) epoch ``t`` to a drop ratio ``d(t)`` in [0, 1). The keep
count over ``n`` tokens is :func:`keep_count` — ``max(1, int(n·(1−d)))`` as the PTD/CTD reference code.
"""

from __future__ import annotations

import math


def _check_ratio(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
        raise ValueError(f"{name}: {value!r} is outside the allowed range [0, 1)")
    return float(value)


def truncate(x: float) -> int:
    """``int(x)`` after rounding to 9 decimals, so float error (``1 − (1 − 0.2)`` is 0.19999…) does not
    cost a token; otherwise the reference's truncation."""
    return int(round(x, 9))


def keep_count(n: int, drop_ratio: float) -> int:
    """Tokens kept out of ``n`` at drop ratio ``d``: ``max(1, int(n·(1−d)))`` (the reference's rounding)."""
    return max(1, truncate(n * (1.0 - drop_ratio)))


class Schedule:
    """Base class: ``schedule(t)`` returns the drop ratio at epoch ``t``."""

    def __call__(self, epoch: float) -> float:
        raise NotImplementedError

    def keep(self, n: int, epoch: float) -> int:
        """Tokens kept of ``n`` entering at ``epoch`` (default: :func:`keep_count` at the drop ratio)."""
        return keep_count(n, self(epoch))

    def fraction_kept(self, n: int, epoch: float) -> float:
        """The exact fraction kept of ``n`` at ``epoch`` (default ``1 − d``; it compounds across sites for
        ``relative_to="original"``)."""
        return 1.0 - self(epoch)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Constant(Schedule):
    """The same drop ratio ``1 − keep_rate`` at every epoch (post-hoc pruning, the keep rates of
    "Which Tokens to Use?")."""

    def __init__(self, keep_rate: float) -> None:
        if not (isinstance(keep_rate, (int, float)) and 0.0 < keep_rate <= 1.0):
            raise ValueError(f"keep_rate: {keep_rate!r} is outside the allowed range (0, 1]")
        self.keep_rate = float(keep_rate)

    def __call__(self, epoch: float) -> float:
        return 1.0 - self.keep_rate


class Remove(Schedule):
    """Remove exactly ``r`` patch tokens at every site (ToMe's ``r``), never more than all but one; a
    method may cap it further (ToMe merges at most half). ``r`` may be a list, one entry per epoch
    (ToMe's decreasing schedules), the last entry holding after it."""

    def __init__(self, r: int | list[int]) -> None:
        values = list(r) if isinstance(r, (list, tuple)) else [r]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise ValueError(f"r: {r!r} must be a whole number >= 0 (or a non-empty list of them)")
        self.r = r

    def removed(self, epoch: float) -> int:
        """Tokens removed per site at ``epoch``."""
        values = self.r if isinstance(self.r, (list, tuple)) else [self.r]
        return values[min(int(epoch), len(values) - 1)]

    def keep(self, n: int, epoch: float) -> int:
        return max(1, n - self.removed(epoch))

    def fraction_kept(self, n: int, epoch: float) -> float:
        return self.keep(n, epoch) / n

    def __call__(self, epoch: float) -> float:
        """Not defined without a token count (``keep`` is): the drop ratio differs per site."""
        raise TypeError("Remove(r) removes a count, not a ratio; sites call schedule.keep(n, epoch)")


class Ramp(Schedule):
    """``d(t) = initial`` before ``start``, ``final`` from ``end`` on, and
    ``initial + shape((t − start)/(end − start))·(final − initial)`` in between.
    Subclasses define ``shape`` on [0, 1] with shape(0) = 0 and shape(1) = 1."""

    def __init__(self, start: float, end: float, initial: float = 0.0, final: float = 0.35) -> None:
        if end <= start:
            raise ValueError(f"end: {end!r} must be greater than start ({start!r})")
        if start < 0:
            raise ValueError(f"start: {start!r} is outside the allowed range [0, inf)")
        self.start, self.end = float(start), float(end)
        self.initial = _check_ratio("initial", initial)
        self.final = _check_ratio("final", final)

    def shape(self, progress: float) -> float:
        raise NotImplementedError

    def __call__(self, epoch: float) -> float:
        if epoch < self.start:
            return self.initial
        if epoch >= self.end:
            return self.final
        progress = (epoch - self.start) / (self.end - self.start)
        return self.initial + self.shape(progress) * (self.final - self.initial)


class Curriculum(Ramp):
    """The polynomial curriculum ``shape(p) = p**gamma`` (PTD report §2.2, CTD README).
    PTD: ``Curriculum(40, 140, final=0.35, gamma=2.0)``; CTD: ``Curriculum(20, 160, final=0.35, gamma=1.5)``."""

    def __init__(self, start: float, end: float, initial: float = 0.0, final: float = 0.35, gamma: float = 2.0) -> None:
        super().__init__(start, end, initial, final)
        if not (isinstance(gamma, (int, float)) and gamma > 0 and math.isfinite(gamma)):
            raise ValueError(f"gamma: {gamma!r} is outside the allowed range (0, inf)")
        self.gamma = float(gamma)

    def shape(self, progress: float) -> float:
        return progress ** self.gamma


class Linear(Ramp):
    """Linear ramp (the curriculum with gamma = 1), the CTD README's schedule-shape ablation."""

    def shape(self, progress: float) -> float:
        return progress


class Cosine(Ramp):
    """Half-cosine ramp: ``(1 − cos(π p)) / 2`` — slow at both ends."""

    def shape(self, progress: float) -> float:
        return 0.5 * (1.0 - math.cos(math.pi * progress))


class Step(Ramp):
    """Staircase: ``steps`` equal jumps, ``floor(p·steps)/steps`` (reaches ``final`` at ``end``)."""

    def __init__(self, start: float, end: float, initial: float = 0.0, final: float = 0.35, steps: int = 4) -> None:
        super().__init__(start, end, initial, final)
        if not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"steps: {steps!r} is outside the allowed range [1, inf)")
        self.steps = steps

    def shape(self, progress: float) -> float:
        return math.floor(progress * self.steps) / self.steps


def make_schedule(kind: str, *, start: float = 40, end: float = 140, initial: float = 0.0, final: float = 0.35,
                  gamma: float = 2.0, steps: int = 4, keep_rate: float | None = None) -> Schedule:
    """Build a schedule by name (``curriculum``, ``linear``, ``cosine``, ``step``, ``constant``).
    The ramps go from drop ratio ``initial`` to ``final``; ``constant`` keeps the fraction ``keep_rate``
    throughout (``Constant(keep_rate)``, a drop ratio of ``1 − keep_rate``) and reads nothing else."""
    if kind == "curriculum":
        return Curriculum(start, end, initial, final, gamma)
    if kind == "linear":
        return Linear(start, end, initial, final)
    if kind == "cosine":
        return Cosine(start, end, initial, final)
    if kind == "step":
        return Step(start, end, initial, final, steps)
    if kind == "constant":
        if keep_rate is None:
            raise ValueError("keep_rate: a constant schedule needs keep_rate (the fraction of tokens kept)")
        return Constant(keep_rate)
    raise ValueError(f"schedule: unknown schedule {kind!r} (allowed: curriculum, linear, cosine, step, constant)")
