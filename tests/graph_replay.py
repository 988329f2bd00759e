"""A stand-in for CUDA graphs on the CPU, with their semantics, for testing captured training steps.

A CUDA graph records kernels with their arguments fixed: Python numbers read during the capture are baked
in, tensors that existed before the capture are read and written where they live at every replay, and
the capture itself runs nothing. :class:`CpuGraphBackend` does the same at the level of ATen operators:
``capture`` logs every operator the step dispatches (a ``TorchDispatchMode``), with its non-tensor
arguments as they were, then restores the state the capture changed (it had to run the operators to
log them); ``replay`` runs the log again, reading pre-existing tensors live and re-creating the rest.
An operator that would synchronise with the host (``.item()``, ``nonzero``) fails the capture, as it
does on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

SYNCING_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}


class _Made:
    """A tensor the log itself produced: the ``index``-th output."""

    def __init__(self, index: int) -> None:
        self.index = index


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple] = []
        self.made: dict[int, int] = {}  # id(tensor) -> index in self.outputs
        self.keep: list[torch.Tensor] = []  # keeps produced tensors alive, so ids stay unique

    def _ref(self, x):
        if isinstance(x, torch.Tensor) and id(x) in self.made:
            return _Made(self.made[id(x)])
        return x

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING_OPS:
            raise RuntimeError(f"operation not permitted when stream is capturing ({func})")
        refs = (tree_map(self._ref, args), tree_map(self._ref, kwargs))  # before the outputs get names
        out = func(*args, **kwargs)
        flat_out, _ = tree_flatten(out)
        outputs = []
        for t in flat_out:
            if isinstance(t, torch.Tensor) and id(t) not in self.made:
                self.made[id(t)] = len(self.keep)
                self.keep.append(t)
                outputs.append(self.made[id(t)])
            else:
                outputs.append(None)
        self.log.append((func, *refs, outputs))
        return out


class CpuGraphBackend:
    """``warmup`` runs the step; ``capture`` logs it (see the module docstring) and returns its replay.
    ``state`` lists every tensor the step may change in place (parameters, optimizer state, EMA, sums),
    which the capture puts back."""

    def __init__(self, state: Callable[[], Iterable[torch.Tensor]]) -> None:
        self.state = state
        self.warmups = self.captures = self.replays = self.releases = 0

    def warmup(self, fn: Callable[[], None], check: bool = False) -> str | None:
        self.warmups += 1
        fn()
        return None  # the CPU has no sync debug mode: host syncs show when the capture fails

    def release(self) -> None:
        self.releases += 1

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        saved = [(t, t.detach().clone()) for t in self.state()]
        recorder = _Recorder()
        try:
            with recorder:
                fn()
        finally:
            with torch.no_grad():
                for t, before in saved:
                    t.copy_(before)
        self.captures += 1
        log, n_made = recorder.log, len(recorder.keep)

        def replay() -> None:
            made: list[torch.Tensor | None] = [None] * n_made

            def resolve(x):
                return made[x.index] if isinstance(x, _Made) else x

            with torch.no_grad():
                for func, args, kwargs, outputs in log:
                    out = func(*tree_map(resolve, args), **tree_map(resolve, kwargs))
                    for index, t in zip(outputs, tree_flatten(out)[0]):
                        if index is not None:
                            made[index] = t
            self.replays += 1

        return replay
