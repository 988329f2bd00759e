"""Whole-step CUDA-graph capture (``run.cuda_graphs``): the training step — forward, backward, clipping,
fused AdamW and the EMA — recorded once per distinct computation and replayed, so a step costs one graph
launch instead of hundreds of kernel launches.

What one graph serves: steps whose inputs have the same shapes and whose reduction sites plan the same
work (:func:`tokendrop.reduction.step_signature`: keep counts, plus the keep fraction where a reducer
reads it). A curriculum changes its keep count at most once per token (the granularity is one token,
whether the schedule is per epoch or per step), and it moves one way, so at most :data:`MAX_GRAPHS` are
held: a new one replaces the least recently replayed. A signature that never repeats (a reducer that
reads the keep fraction under a per-step schedule, which moves it every step) is never captured; after
:data:`MAX_WARMING` of them the step runs eagerly, with a notice.

How a signature is served: its first :data:`WARMUP_STEPS` steps run eagerly on a side stream (lazy
initialisation, cuDNN and ``torch.compile`` happen there, as PyTorch's CUDA-graphs notes ask), the next
is captured and replayed, and every later one copies its batch into the graph's static inputs and
replays. Everything a replay must see change lives in device tensors read by the graph: the batch, each
parameter group's learning rate (a 0-d tensor, refreshed from the group before every replay, so a
scheduler that assigns floats still takes effect), the EMA's decay and the step's sums and flags.
Captures share one memory pool; that is safe in any replay order because nothing a graph allocates is
read after its replay ends (its results go to tensors allocated outside the graphs).

What cannot be captured runs eagerly, with a one-line notice: gradient saliency and reducers with
private generators (:func:`tokendrop.reduction.capture_blockers`), DDP, a step that synchronises with
the host (seen by CUDA's sync debug mode in its last warm-up step, before any capture is tried), and any
step whose capture fails.
"""

from __future__ import annotations

import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

WARMUP_STEPS = 3
"""Eager steps of each signature before it is captured."""

MAX_GRAPHS = 64
"""Graphs held at most; a new one replaces the least recently replayed."""

MAX_WARMING = 256
"""Signatures still in their warm-up at most; past it the signatures do not repeat, and the step runs eagerly."""

_HYPER = ("betas", "weight_decay", "eps", "amsgrad", "maximize")
"""Optimizer settings a graph bakes in; if one changes, the graphs are captured again."""

Body = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def print_notice(message: str) -> None:
    print(message, file=sys.stderr)


class CudaGraphBackend:
    """Runs warm-up steps on a side stream and captures with ``torch.cuda.graph`` into one shared pool
    (thread-local capture: the data loader's pinning thread may use CUDA meanwhile)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = None

    def warmup(self, fn: Callable[[], None], check: bool = False) -> str | None:
        """Run ``fn`` eagerly on a side stream, ordered after and before the current stream's work. With
        ``check``, watch it with CUDA's sync debug mode and return what synchronised with the host (such
        a step cannot be captured), else None."""
        main = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(main)
        with warnings.catch_warnings(record=True) as caught, torch.cuda.stream(side):
            warnings.simplefilter("always")
            previous = torch.cuda.get_sync_debug_mode()
            if check:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        main.wait_stream(side)
        syncs = [str(w.message) for w in caught if "synchronizing" in str(w.message)]
        for w in caught:  # pass the step's other warnings on
            if "synchronizing" not in str(w.message):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return syncs[0].splitlines()[0] if syncs else None

    def release(self) -> None:
        """Every graph was dropped: the next capture starts a new pool (a pool must not be reused once
        no graph holds it)."""
        self.pool = None

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Record ``fn`` (nothing runs) and return the graph's replay."""
        graph = torch.cuda.CUDAGraph()
        entry = torch.cuda.current_stream(self.device)
        try:
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                fn()
        except Exception:
            torch.cuda.set_stream(entry)  # a failed capture_end leaves the capture stream current
            raise
        if self.pool is None:
            self.pool = graph.pool()
        return graph.replay


@dataclass
class _Graph:
    inputs: tuple[torch.Tensor, ...]  # static inputs, allocated outside the graphs
    replay: Callable[[], None]


class StepGraphs:
    """Serves ``body(images, targets, labels)`` from graphs, one per signature (see the module docstring).
    ``body`` must update state in place only, and read per-step values from device tensors.
    ``on_failure`` is called after a failed capture, before the step runs eagerly."""

    def __init__(self, body: Body, optimizer: torch.optim.Optimizer, device: torch.device, *,
                 backend: CudaGraphBackend | None = None, warmup: int = WARMUP_STEPS, max_graphs: int = MAX_GRAPHS,
                 notice: Callable[[str], None] = print_notice, on_failure: Callable[[], None] = lambda: None) -> None:
        self.body, self.optimizer, self.device = body, optimizer, device
        self.backend = backend if backend is not None else CudaGraphBackend(device)
        self.warmup, self.max_graphs, self.notice, self.on_failure = warmup, max_graphs, notice, on_failure
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()  # least recently replayed first
        self.warm: dict[tuple, int] = {}
        self.failed = False
        self.replays = 0
        self._group_ids: list[int] = []
        self._lrs: list[torch.Tensor] = []
        self._hyper: list[tuple] = []

    def __call__(self, signature: tuple, images: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor) -> None:
        """Train on one batch: eagerly, by capturing its signature's graph, or by replaying it."""
        inputs = (images, targets, labels)
        if self.failed:
            self.body(*inputs)
            return
        self._sync_optimizer()
        key = (signature, *((x.shape, x.dtype) for x in inputs))
        graph = self.graphs.get(key)
        if graph is None:
            if self.warm.get(key, 0) < self.warmup:
                if key not in self.warm and len(self.warm) >= MAX_WARMING:
                    self._fall_back(f"{MAX_WARMING} keep-count signatures seen once or twice: they do not repeat")
                    self.body(*inputs)
                    return
                self.warm[key] = self.warm.get(key, 0) + 1
                synced = self.backend.warmup(lambda: self.body(*inputs), check=self.warm[key] == self.warmup)
                if synced:  # a capture would fail: say so now, before trying
                    self._fall_back(synced)
                return
            graph = self._capture(key, inputs)
            if graph is None:
                self.body(*inputs)
                return
        self.graphs.move_to_end(key)
        for static, x in zip(graph.inputs, inputs):
            static.copy_(x)
        graph.replay()
        self.replays += 1

    def _capture(self, key: tuple, inputs: tuple[torch.Tensor, ...]) -> _Graph | None:
        static = tuple(x.clone() for x in inputs)
        try:
            replay = self.backend.capture(lambda: self.body(*static))
        except Exception as e:  # noqa: BLE001 — any failure means: not capturable; say so, run eagerly
            self.on_failure()
            self._fall_back((str(e).strip().splitlines() or [type(e).__name__])[0])
            return None
        self.warm.pop(key, None)
        self.graphs[key] = graph = _Graph(static, replay)
        if len(self.graphs) > self.max_graphs:  # after the capture: the shared pool always has a live graph
            self.graphs.popitem(last=False)
        return graph

    def _drop_graphs(self) -> None:
        """Drop every graph; the next capture starts a new pool."""
        self.graphs.clear()
        self.backend.release()

    def _fall_back(self, reason: str) -> None:
        """Run eagerly from now on, after a one-line notice."""
        self.failed = True
        self._drop_graphs()
        self.notice(f"notice: run.cuda_graphs: the training step could not be captured ({reason}); it runs "
                    f"eagerly from here on")

    def _sync_optimizer(self) -> None:
        """Give every parameter group a 0-d device LR that the graphs read, carrying over a value a
        scheduler assigned since; mark the groups capturable; drop the graphs if a baked-in setting changed."""
        groups = self.optimizer.param_groups
        ids, hyper = [id(g) for g in groups], [tuple(g.get(k) for k in _HYPER) for g in groups]
        if ids != self._group_ids or hyper != self._hyper:  # first call, a loaded state dict, a new setting
            self._drop_graphs()
            if ids != self._group_ids:
                self._lrs = [torch.tensor(float(g["lr"]), device=self.device) for g in groups]
            self._group_ids, self._hyper = ids, hyper
        for group, lr in zip(groups, self._lrs):
            group["capturable"] = True
            if group["lr"] is not lr:
                lr.fill_(float(group["lr"]))
                group["lr"] = lr
