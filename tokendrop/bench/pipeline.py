"""The rate of a config's training input pipeline alone (its augmentations and workers)."""

from __future__ import annotations

import dataclasses
import gc
import time
from dataclasses import dataclass
from typing import Any

import torch

from .machine import synchronize

__all__ = ["PipelineResult", "data_throughput"]


@dataclass
class PipelineResult:
    """Images per second of a config's training input pipeline (augmentations, its worker count)."""

    images_per_s: float
    batches: int
    batch_size: int
    workers: int
    source: str  # the data set, or "synthetic …" when its files are not on this machine


def data_throughput(cfg: Any, batches: int = 40, batch_size: int | None = None,
                    device: torch.device | None = None) -> PipelineResult:
    """Iterate the config's train DataLoader (its augmentations and ``data.workers``) and return images
    per second over ``batches`` batches (rounded up to a multiple of the worker count).

    The first ``workers`` batches (worker start-up; the workers deliver batches in bursts of one per
    worker) are not timed, so the window runs from the end of one burst to the end of another and the
    prefetched backlog does not inflate the rate.

    Nothing is downloaded; when the data set's files are missing, random uint8 images of the data set's
    shape go through the same transforms (augmentation cost does not depend on the pixels much).
    Note that on a CPU the workers and the model share the cores, so the two rates do not add up.

    When the trainer would make the batches on ``device`` (``data.pipeline``, see
    :func:`~tokendrop.train.gpu_pipeline.choose_pipeline`; default device: ``run.device``), that pipeline
    is timed instead, synchronising the device at both ends (``workers`` is then 0).
    """
    import numpy as np

    from ..device import pick_device
    from ..train.data import (ArrayDataset, DatasetNotFoundError, build_datasets, build_loaders, build_transforms,
                              dataset_info)
    from ..train.gpu_pipeline import DeviceLoader, choose_pipeline

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
    device = device if device is not None else pick_device(cfg.run.device)
    info = dataset_info(cfg.data.dataset, cfg.model.name, cfg.data.synthetic)
    arrays = choose_pipeline(cfg.data.pipeline, device, train, cfg.augment, info, cfg.data.img_size)
    if arrays is not None:
        return _device_throughput(DeviceLoader(arrays, train, info, cfg.augment, bs, True, device), batches,
                                  f"{source}, batches made on {device}")
    loader, _, _ = build_loaders(train, train, bs, bs, cfg.data.workers, cfg.seed, drop_last=True)
    available = len(loader) - burst
    if available >= burst:  # stay within one pass (a new pass restarts the workers)
        batches = min(batches, available // burst * burst)
    it = iter(loader)
    try:
        for _ in range(burst):
            next(it)
        t0 = time.perf_counter()
        done = _draw(loader, it, batches)
        elapsed = time.perf_counter() - t0
    finally:
        del it
        del loader
        gc.collect()
    return PipelineResult(done / elapsed, batches, bs, cfg.data.workers, source)


def _device_throughput(loader: Any, batches: int, source: str) -> PipelineResult:
    """Images per second of a :class:`~tokendrop.train.gpu_pipeline.DeviceLoader` over ``batches`` batches
    (one untimed batch first)."""
    loader.generator.manual_seed(0)
    it = iter(loader)
    next(it)
    synchronize(loader.device)
    t0 = time.perf_counter()
    done = _draw(loader, it, batches)
    synchronize(loader.device)
    return PipelineResult(done / (time.perf_counter() - t0), batches, loader.batch_size, 0, source)


def _draw(loader: Any, it: Any, batches: int) -> int:
    """Draw ``batches`` batches from ``it``, restarting ``loader`` when a pass ends; the images drawn."""
    done = 0
    for _ in range(batches):
        try:
            images, _ = next(it)
        except StopIteration:
            it = iter(loader)
            images, _ = next(it)
        done += images.shape[0]
    return done
