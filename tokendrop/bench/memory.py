"""Peak training memory of one drop variant.

CUDA: ``max_memory_allocated``. CPU: the peak resident set size of a separate process that builds the
model and runs only that variant's training steps, minus its resident size just before the first step
(after imports and model creation).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import resource
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models import build_model
from .machine import synchronize
from .probe import DropProbe, FixedBatchStep, StepSpec, build_train_step, input_batch

__all__ = ["MemoryResult", "MemorySpec", "peak_train_memory"]


@dataclass
class MemorySpec:
    """What a memory measurement builds: ``build_model(model, **model_kwargs)`` with ``reducer`` sites at
    ``blocks`` dropping ``drop_ratio``, trained for ``steps`` steps at ``batch_size`` by the trainer's step
    (``step``: the fields of a :class:`~tokendrop.bench.probe.StepSpec`)."""

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
    step: dict = field(default_factory=dict)


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


def _build_for_memory(spec: MemorySpec, device: torch.device) -> FixedBatchStep:
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, **spec.model_kwargs).to(device)
    probe = DropProbe(model, spec.blocks, reducer=spec.reducer, reducer_args=spec.reducer_args)
    probe.set(spec.drop_ratio)
    images, targets = input_batch(model, spec.batch_size, device, spec.seed)
    return FixedBatchStep(build_train_step(model, StepSpec(**spec.step), device), images, targets)


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
    code = "from tokendrop.bench.memory import _memory_child_main; _memory_child_main()"
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(dataclasses.asdict(spec)),
                          capture_output=True, text=True, env=env, timeout=timeout_s)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"memory process for {spec.model} d={spec.drop_ratio} failed: {tail[0]}")
    return MemoryResult(**json.loads(proc.stdout.strip().splitlines()[-1]))
