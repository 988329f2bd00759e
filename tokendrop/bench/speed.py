"""Speed, MACs and memory of token drop: the measuring functions behind ``tokendrop bench``.

Timing follows DESIGN.md ("Timing on shared machines"): the variants of one network are timed in
*interleaved rounds* — every round times the d = 0 baseline, then each variant once (in a shuffled
order), and a closing baseline ends the last round. A variant's speed-up is the median over rounds of
``reference / time`` where ``reference`` is the geometric mean of the baselines that bracket it; the
medians of the raw times are reported beside it. A single median per variant drifts by tens of percent
on a shared machine; paired ratios cancel most of that drift.

Every measured step synchronises the device (``torch.cuda.synchronize`` / ``torch.mps.synchronize``).
A training step is ``zero_grad → forward → cross-entropy → backward → AdamW.step`` on a fixed random
batch (no data loading, no AMP, no clipping, no EMA). Inference is a forward under
``torch.inference_mode`` with the reducer active (sites attached with ``when="always"``); PTD itself
evaluates with every token, so the inference rows describe post-hoc pruning, not PTD's evaluation.

Peak training memory is CUDA's ``max_memory_allocated`` on a GPU; on the CPU it is the peak resident
set size of a separate process that builds the model and runs only that variant's training steps,
minus its resident size just before the first step (after imports and model creation).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..device import pick_device

from ..models import build_model
from ..reduction import Schedule, attach, expected_patch_tokens, prepare_step, sites
from ..reduction import reducer as build_reducer
from .flops import attached_macs, count_macs, count_train_macs

__all__ = [
    "DropProbe", "DropResult", "FixedDrop", "MemoryResult", "MemorySpec", "OverheadResult", "PairedTiming",
    "PipelineResult", "Projection", "TrainStep", "InferStep", "data_throughput", "epoch_drop_ratios",
    "input_batch", "interleaved_rounds", "machine_info", "measure_drops", "measure_overheads",
    "peak_train_memory", "project_schedule", "resolve_device", "steps_per_epoch",
    "synchronize", "train_set_size", "config_model", "drop_points", "seconds_at",
]

KNOWN_TRAIN_SIZES = {"cifar10": 50_000, "cifar100": 50_000, "fashion-mnist": 60_000, "digits": 1347}
"""Train-set sizes used when the data files are not on this machine (the projection only needs the count)."""


# ------------------------------------------------------------------------------------------- device
def resolve_device(name: str = "auto") -> torch.device:
    """The benchmark's ``--device``: see :func:`tokendrop.device.pick_device`."""
    return pick_device(name, key="--device")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where and when a result was produced: platform, CPU model, core count, torch threads and version,
    device (with the GPU name), Python version, the UTC date and the load average (other work on the machine)."""
    import timm

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1_5_15min"] = [round(v, 2) for v in os.getloadavg()]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ------------------------------------------------------------------------------------------ models
class FixedDrop(Schedule):
    """The drop ratio ``drop`` at every epoch; the benchmark moves ``drop`` between variants.

    Unlike ``Constant(1 − d)`` it returns ``d`` exactly, so the keep count is ``keep_count(N, d)`` —
    the count a curriculum produces at that d — without a float round trip.
    """

    def __init__(self, drop: float = 0.0) -> None:
        self.drop = float(drop)

    def __call__(self, epoch: float) -> float:
        return self.drop


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """``(in_chans, H, W)`` a ViT expects: the first convolution's input channels and ``patch_embed.img_size``."""
    pe = model.patch_embed
    size = getattr(pe, "img_size", None)
    if size is None:
        raise TypeError(f"{type(model).__name__}: patch_embed has no img_size")
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    conv = next((m for m in pe.modules() if isinstance(m, nn.Conv2d)), None)
    return (conv.in_channels if conv is not None else 3), h, w


def input_batch(model: nn.Module, batch_size: int, device: torch.device, seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch ``(images, targets)`` for ``model`` (shape from :func:`input_shape`)."""
    gen = torch.Generator().manual_seed(seed)
    c, h, w = input_shape(model)
    images = torch.randn(batch_size, c, h, w, generator=gen)
    targets = torch.randint(0, max(1, int(getattr(model, "num_classes", 1000))), (batch_size,), generator=gen)
    return images.to(device), targets.to(device)


class DropProbe:
    """A backbone with reduction sites at ``blocks`` whose drop ratio is set directly (one shared
    :class:`FixedDrop`). The method is ``reducer`` (a registered name, default Top-K) with ``reducer_args``
    (default ``score``); every site of the probe uses it at its default position.

    ``when="always"``: the reducer runs in training and in inference, so both can be timed reduced.
    ``always_reduce`` runs saliency and top-k even at d = 0 (nothing dropped): the saliency overhead.
    """

    def __init__(self, model: nn.Module, blocks: Sequence[int], score: str = "cls_attention",
                 relative_to: str = "entering", always_reduce: bool = False, reducer: str = "topk",
                 reducer_args: dict | None = None) -> None:
        self.model = model
        self.schedule = FixedDrop(0.0)
        args = dict(reducer_args or {})
        if reducer == "topk":
            args.setdefault("score", score)
        attach(model, build_reducer(reducer, **args), blocks=list(blocks), schedule=self.schedule, when="always",
               relative_to=relative_to, always_reduce=always_reduce)
        self.blocks = [s.block for s in sites(model)]
        self.needs_gradient = any("gradient" in s.reducer.needs for s in sites(model))

    def set(self, drop: float) -> None:
        """Make every site drop ``drop`` of the patch tokens entering it."""
        self.schedule.drop = float(drop)

    def set_always_reduce(self, on: bool) -> None:
        """Compute saliency and top-k even when nothing is dropped (``on``), or skip them at d = 0."""
        for s in sites(self.model):
            s.always_reduce = bool(on)

    @property
    def num_patches(self) -> int:
        return int(self.model.patch_embed.num_patches)

    def kept(self) -> list[int]:
        """Patch tokens after each site at the current drop ratio (plain ints)."""
        return expected_patch_tokens(self.model, training=True)

    def analytic_macs(self, drop: float | None = None) -> int:
        """Closed-form forward MACs per image at ``drop`` (default: the current drop ratio)."""
        if drop is not None:
            self.set(drop)
        _, h, w = input_shape(self.model)
        return attached_macs(self.model, (h, w))


class TrainStep:
    """One training step on a fixed batch: zero_grad, forward, cross-entropy, backward, AdamW step.

    With a gradient-saliency site, :func:`tokendrop.prepare_step` runs first (its extra forward and
    backward are part of the step, as in training)."""

    def __init__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, lr: float = 1e-5,
                 gradient_saliency: bool = False) -> None:
        self.model, self.images, self.targets = model, images, targets
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        self.gradient_saliency = gradient_saliency

    def __call__(self) -> None:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.gradient_saliency:
            prepare_step(self.model, self.images, self.targets, F.cross_entropy)
        loss = F.cross_entropy(self.model(self.images), self.targets)
        loss.backward()
        self.optimizer.step()


class InferStep:
    """One inference forward on a fixed batch (eval mode, ``torch.inference_mode``)."""

    def __init__(self, model: nn.Module, images: torch.Tensor) -> None:
        self.model, self.images = model, images

    def __call__(self) -> None:
        self.model.eval()
        with torch.inference_mode():
            self.model(self.images)


# ------------------------------------------------------------------------------------------ timing
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


# ----------------------------------------------------------------------------------- drop variants
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
                  on_round: Callable[[], None] | None = None) -> list[DropResult]:
    """Time training (and, with ``infer``, inference) of ``probe.model`` at every drop ratio in ``drops``
    against d = 0, in interleaved rounds; with ``count``, count MACs with FlopCounterMode beside the
    closed form. d = 0 is always measured: it is the baseline (its row has speed-up 1).

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
    train_step = TrainStep(model, images, targets, gradient_saliency=probe.needs_gradient)
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


# ---------------------------------------------------------------------------------------- overheads
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
                      on_round: Callable[[], None] | None = None) -> OverheadResult:
    """Training step of ``model`` (no drop) against (a) a site at ``block`` at d = 0 with
    ``always_reduce=True`` (saliency computed, nothing dropped) and (b) a copy of the network whose
    attention materialises ``softmax(QKᵀ)`` (timm's ``fused_attn = False``), in interleaved rounds.
    ``model`` must have no sites; it is used in place."""
    import copy

    model.to(device)
    explicit = copy.deepcopy(model)
    for blk in explicit.blocks:
        if hasattr(blk.attn, "fused_attn"):
            blk.attn.fused_attn = False
    probe = DropProbe(model, [block])  # d = 0: inactive unless always_reduce
    images, targets = input_batch(model, batch_size, device, seed)
    ours = TrainStep(model, images, targets)
    theirs = TrainStep(explicit, images, targets)

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


# ------------------------------------------------------------------------------------------- memory
@dataclass
class MemorySpec:
    """What a memory measurement builds: ``build_model(model, **model_kwargs)`` with ``reducer`` sites at
    ``blocks`` dropping ``drop_ratio``, trained for ``steps`` steps at ``batch_size``."""

    model: str
    model_kwargs: dict = field(default_factory=dict)
    blocks: list[int] = field(default_factory=lambda: [0])
    drop_ratio: float = 0.0
    batch_size: int = 32
    steps: int = 2
    threads: int = 0
    device: str = "cpu"
    seed: int = 0
    reducer: str = "topk"
    reducer_args: dict = field(default_factory=dict)


@dataclass
class MemoryResult:
    """Peak training memory above the state before the first step (bytes), and how it was measured."""

    peak_bytes: int
    baseline_bytes: int
    method: str


def _rss_bytes(key: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process from /proc (Linux), or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _maxrss_bytes() -> int:
    """``ru_maxrss`` of this process in bytes (KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def _build_for_memory(spec: MemorySpec, device: torch.device) -> TrainStep:
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, **spec.model_kwargs).to(device)
    probe = DropProbe(model, spec.blocks, reducer=spec.reducer, reducer_args=spec.reducer_args)
    probe.set(spec.drop_ratio)
    images, targets = input_batch(model, spec.batch_size, device, spec.seed)
    return TrainStep(model, images, targets)


def _measure_memory_here(spec: MemorySpec) -> MemoryResult:
    """Measure in this process (CUDA: allocator statistics; CPU: resident set size of this process)."""
    device = torch.device(spec.device)
    if spec.threads > 0:
        torch.set_num_threads(spec.threads)
    step = _build_for_memory(spec, device)
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(spec.steps):
            step()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return MemoryResult(peak - base, base, "cuda max_memory_allocated")
    base = _rss_bytes("VmRSS")
    reset = False
    if base is not None:
        try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
            reset = True
        except OSError:
            pass
    if not reset:
        base = _maxrss_bytes()
    for _ in range(spec.steps):
        step()
    if reset:
        peak = _rss_bytes("VmHWM") or 0
        return MemoryResult(peak - base, base, "peak RSS (VmHWM, reset before the first step) of a separate process")
    peak = _maxrss_bytes()
    return MemoryResult(peak - base, base, "ru_maxrss of a separate process minus its value before the first step")


def _memory_child_main() -> None:
    """Entry point of the separate memory process: a JSON :class:`MemorySpec` on stdin, JSON result on stdout."""
    spec = MemorySpec(**json.loads(sys.stdin.read()))
    print(json.dumps(dataclasses.asdict(_measure_memory_here(spec))))


def peak_train_memory(spec: MemorySpec, timeout_s: float = 900.0) -> MemoryResult | None:
    """Peak memory of ``spec.steps`` training steps above the memory held before the first step.

    CUDA: ``torch.cuda.max_memory_allocated`` in this process. CPU: a fresh Python process runs only this
    variant (so no other variant's allocations linger) and reports its peak resident set size minus the
    resident size after imports, model, optimizer and batch creation. MPS: not measured (None).
    """
    if spec.device.startswith("cuda"):
        return _measure_memory_here(spec)
    if spec.device.startswith("mps"):
        return None
    pkg_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH", "")) if p)
    code = "from tokendrop.bench.speed import _memory_child_main; _memory_child_main()"
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(dataclasses.asdict(spec)),
                          capture_output=True, text=True, env=env, timeout=timeout_s)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"memory process for {spec.model} d={spec.drop_ratio} failed: {tail[0]}")
    return MemoryResult(**json.loads(proc.stdout.strip().splitlines()[-1]))


# --------------------------------------------------------------------------------------- projection
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


# ------------------------------------------------------------------------------------ data pipeline
@dataclass
class PipelineResult:
    """Images per second of a config's training input pipeline (augmentations, its worker count)."""

    images_per_s: float
    batches: int
    batch_size: int
    workers: int
    source: str  # the data set, or "synthetic …" when its files are not on this machine


def data_throughput(cfg: Any, batches: int = 40, batch_size: int | None = None) -> PipelineResult:
    """Iterate the config's train DataLoader (its augmentations and ``data.workers``) and return images
    per second over ``batches`` batches (rounded up to a multiple of the worker count).

    The first ``workers`` batches (worker start-up; the workers deliver batches in bursts of one per
    worker) are not timed, so the window runs from the end of one burst to the end of another and the
    prefetched backlog does not inflate the rate.

    Nothing is downloaded; when the data set's files are missing, random uint8 images of the data set's
    shape go through the same transforms (augmentation cost does not depend on the pixels much).
    Note that on a CPU the workers and the model share the cores, so the two rates do not add up.
    """
    import numpy as np

    from ..train.data import (ArrayDataset, DatasetNotFoundError, build_datasets, build_loaders, build_transforms,
                              dataset_info)

    bs = int(batch_size or cfg.optim.batch_size)
    burst = max(1, cfg.data.workers)
    batches = -(-max(1, batches) // burst) * burst
    data_cfg = dataclasses.replace(cfg.data, download=False)
    try:
        train, _, _ = build_datasets(data_cfg, cfg.augment, cfg.seed, cfg.model.name)
        source = cfg.data.dataset
    except (DatasetNotFoundError, FileNotFoundError) as e:
        info = dataset_info(cfg.data.dataset, cfg.model.name, cfg.data.synthetic)
        n = bs * (batches + burst)
        rng = np.random.default_rng(cfg.seed)
        shape = (n, info.img_size, info.img_size) + (() if info.in_chans == 1 else (info.in_chans,))
        images = rng.integers(0, 256, size=shape, dtype=np.uint8)
        labels = rng.integers(0, max(1, info.num_classes), size=n).tolist()
        train = ArrayDataset(images, labels, build_transforms(info, cfg.augment, cfg.data.img_size, train=True))
        source = f"synthetic {info.img_size}px images through the {cfg.data.dataset} transforms ({type(e).__name__})"
    loader, _, _ = build_loaders(train, train, bs, bs, cfg.data.workers, cfg.seed, drop_last=True)
    available = len(loader) - burst
    if available >= burst:  # stay within one pass (a new pass restarts the workers)
        batches = min(batches, available // burst * burst)
    it = iter(loader)
    done = 0
    try:
        for _ in range(burst):
            next(it)
        t0 = time.perf_counter()
        for _ in range(batches):
            try:
                images, _ = next(it)
            except StopIteration:
                it = iter(loader)
                images, _ = next(it)
            done += images.shape[0]
        elapsed = time.perf_counter() - t0
    finally:
        del it
        del loader
        gc.collect()
    return PipelineResult(done / elapsed, batches, bs, cfg.data.workers, source)


def config_model(cfg: Any) -> tuple[nn.Module, dict]:
    """The config's backbone (no sites) and the ``build_model`` keyword arguments used."""
    from ..train.data import dataset_info

    info = dataset_info(cfg.data.dataset, cfg.model.name, cfg.data.synthetic)
    num_classes = info.num_classes
    if num_classes == 0:  # imagefolder: read the class folders
        from ..train.data import build_datasets

        data_cfg = dataclasses.replace(cfg.data, download=False)
        num_classes = build_datasets(data_cfg, cfg.augment, cfg.seed)[2].num_classes
    kwargs = {"num_classes": num_classes, "in_chans": info.in_chans, "img_size": cfg.data.img_size or info.img_size,
              "drop_rate": cfg.model.drop_rate, "drop_path_rate": cfg.model.drop_path_rate}
    return build_model(cfg.model.name, **kwargs), kwargs


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
