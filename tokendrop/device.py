"""Choosing the device at run time: CUDA, then Apple MPS, then the CPU."""

from __future__ import annotations

import torch


def pick_device(name: str = "auto", key: str = "run.device") -> torch.device:
    """``auto``: CUDA, then MPS, then CPU; otherwise ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, checked to
    exist. Errors are one line starting with ``key`` (the config key or flag that named the device)."""
    mps = getattr(torch.backends, "mps", None)
    mps_ok = mps is not None and mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_ok else torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{key}: {name!r} is not a device (auto, cpu, cuda, cuda:N, mps)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{key}: {name!r} requested but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{key}: {name!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
    if dev.type == "mps" and not mps_ok:
        raise ValueError(f"{key}: {name!r} requested but MPS is not available here")
    return dev
