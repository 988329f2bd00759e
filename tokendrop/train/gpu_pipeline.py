"""The training data pipeline on the device (``data.pipeline: gpu``).

The uint8 training set lives on the device; each batch is drawn by a seeded permutation and augmented
there, per sample, in the CPU pipeline's order: random crop with zero padding, horizontal flip, RandAugment,
AutoAugment (CIFAR-10 policy; both from :mod:`.device_augment`), normalisation, random erasing (random
normal fill), with the parameters and distributions of torchvision's ``RandomCrop(size, padding)``,
``RandomHorizontalFlip()``, ``RandAugment(num_ops, magnitude)``, ``AutoAugment(CIFAR10)``, ``Normalize``
and ``RandomErasing(p, value="random")`` (the policies' ops are torchvision's tensor ops, not its PIL ones).
Mixup/CutMix stay timm's, which already mix on the batch's device. Written device-agnostic: the tests run it
on the CPU.

Not done on the device (``auto`` keeps the CPU pipeline for them, ``gpu`` is an error naming them):
RandomResizedCrop, resizing (``data.img_size`` other than the native side), data sets not held in memory
(``imagefolder``) and DDP.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from .config import AugmentConfig, ConfigError
from .device_augment import autoaugment, randaugment
from .data import ArrayDataset, DatasetInfo

DEVICE_MEMORY_FRACTION = 0.5
"""``gpu`` keeps the training set on the device only if it takes at most this share of the free memory."""

ERASE_SCALE, ERASE_RATIO, ERASE_TRIES = (0.02, 0.33), (0.3, 3.3), 10
"""torchvision ``RandomErasing``'s defaults: area fraction, aspect-ratio range (log-uniform), attempts."""


def resident_arrays(ds: Dataset) -> tuple[np.ndarray, np.ndarray] | None:
    """uint8 images ``(N, H, W, C)`` and labels of an in-memory training set (:class:`ArrayDataset`,
    torchvision's CIFAR, or a ``Subset`` of one); None for anything else."""
    indices = None
    if isinstance(ds, Subset):
        indices, ds = np.asarray(ds.indices), ds.dataset
    images = ds.images if isinstance(ds, ArrayDataset) else getattr(ds, "data", None)
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim not in (3, 4):
        return None
    labels = np.asarray(ds.targets, dtype=np.int64)
    if indices is not None:
        images, labels = images[indices], labels[indices]
    return (images[..., None] if images.ndim == 3 else images), labels


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (CUDA: the driver's count; CPU: available RAM); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):  # no such count on this system (macOS)
            return None
    return None


def _unsupported(aug: AugmentConfig, info: DatasetInfo, img_size: int, world: int) -> list[str]:
    reasons = []
    if aug.random_resized_crop:
        reasons.append("RandomResizedCrop (augment.random_resized_crop=false)")
    if img_size and img_size != info.img_size:
        reasons.append(f"resizing (data.img_size=0, the native {info.img_size})")
    if world > 1:
        reasons.append("DDP (one process)")
    return reasons


def choose_pipeline(setting: str, device: torch.device, train_ds: Dataset, aug: AugmentConfig, info: DatasetInfo,
                    img_size: int, world: int = 1) -> tuple[np.ndarray, np.ndarray] | None:
    """The training set's arrays when the batches are to be made on the device, None for the CPU pipeline.
    ``auto`` = the device pipeline on CUDA when everything is supported and the set fits; ``gpu`` asks for
    it on any device and raises a one-line :class:`ConfigError` naming what stands in the way."""
    if setting == "cpu" or (setting == "auto" and device.type != "cuda"):
        return None
    reasons = _unsupported(aug, info, img_size, world)
    arrays = resident_arrays(train_ds)
    if arrays is None:
        reasons.append(f"data sets held in memory ({info.name} is read from files)")
    if reasons:
        if setting == "gpu":
            raise ConfigError(f"data.pipeline: gpu does not support {', '.join(reasons)}; use data.pipeline=cpu")
        return None
    need, free = arrays[0].nbytes, free_memory_bytes(device)
    if free is not None and need > DEVICE_MEMORY_FRACTION * free:
        if setting == "gpu":
            raise ConfigError(f"data.pipeline: gpu needs {need / 2**20:.0f} MiB for the training set on {device}, "
                              f"more than {DEVICE_MEMORY_FRACTION:.0%} of its {free / 2**20:.0f} MiB free; "
                              f"use data.pipeline=cpu or a data.train_subset")
        return None
    return arrays


# ------------------------------------------------------------------------------ the per-sample ops
def crop_params(n: int, padding: int, gen: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left corners ``(i, j)`` in the padded images, each uniform in ``[0, 2·padding]`` (``RandomCrop``)."""
    i = torch.randint(0, 2 * padding + 1, (n,), generator=gen, device=device)
    return i, torch.randint(0, 2 * padding + 1, (n,), generator=gen, device=device)


def pad_crop(images: torch.Tensor, i: torch.Tensor, j: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad ``(N, C, H, W)`` by ``padding`` on every side, then crop ``H × W`` at ``(i[n], j[n])``."""
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    rows = (i[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (j[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    chan = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def hflip(images: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """Mirror the images whose ``flags`` are set (left–right)."""
    return torch.where(flags[:, None, None, None], images.flip(-1), images)


def normalize(images: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 → float in [0, 1] (``ToTensor``), then ``(x − mean) / std`` per channel."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255 - m) / s


@dataclass
class EraseParams:
    """Per image: whether to erase and the box ``rows i..i+h, cols j..j+w``."""

    apply: torch.Tensor
    i: torch.Tensor
    j: torch.Tensor
    h: torch.Tensor
    w: torch.Tensor


def erase_params(n: int, height: int, width: int, p: float, gen: torch.Generator, device: torch.device) -> EraseParams:
    """``RandomErasing.get_params`` for ``n`` images at once: with probability ``p``, up to
    :data:`ERASE_TRIES` boxes of area fraction uniform in :data:`ERASE_SCALE` and log-uniform aspect ratio in
    :data:`ERASE_RATIO`; the first that fits strictly inside the image is placed uniformly; none = no erase."""
    apply = torch.rand(n, generator=gen, device=device) < p
    area = height * width * (ERASE_SCALE[0] + (ERASE_SCALE[1] - ERASE_SCALE[0])
                             * torch.rand(n, ERASE_TRIES, generator=gen, device=device, dtype=torch.float64))
    lo, hi = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
    aspect = torch.exp(lo + (hi - lo) * torch.rand(n, ERASE_TRIES, generator=gen, device=device, dtype=torch.float64))
    h, w = torch.round(torch.sqrt(area * aspect)).long(), torch.round(torch.sqrt(area / aspect)).long()
    fits = (h < height) & (w < width)
    first = fits.long().argmax(1, keepdim=True)
    h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
    apply &= fits.any(1)
    u = torch.rand(n, 2, generator=gen, device=device, dtype=torch.float64)
    i = (u[:, 0] * (height - h + 1)).floor().long().clamp_(min=0)
    j = (u[:, 1] * (width - w + 1)).floor().long().clamp_(min=0)
    return EraseParams(apply, i, j, h, w)


def erase(images: torch.Tensor, params: EraseParams, values: torch.Tensor) -> torch.Tensor:
    """Replace each applied box with the same pixels of ``values`` (``(N, C, H, W)``; random normal for
    ``value="random"``)."""
    _, _, height, width = images.shape
    r = torch.arange(height, device=images.device)[None, :, None]
    c = torch.arange(width, device=images.device)[None, None, :]
    p = params
    box = ((r >= p.i[:, None, None]) & (r < (p.i + p.h)[:, None, None]) & (c >= p.j[:, None, None])
           & (c < (p.j + p.w)[:, None, None]) & p.apply[:, None, None])
    return torch.where(box[:, None], values, images)


# ----------------------------------------------------------------------------------------- loader
class DeviceLoader:
    """Batches ``(images, labels)`` of a uint8 training set held on ``device``, augmented there. Iterate
    once per epoch; the order and the augmentations draw from :attr:`generator` (the trainer reseeds it
    per epoch, as it does the CPU loader's, so a resumed run draws the same batches)."""

    def __init__(self, arrays: tuple[np.ndarray, np.ndarray], dataset: Dataset, info: DatasetInfo,
                 aug: AugmentConfig, batch_size: int, drop_last: bool, device: torch.device) -> None:
        images, labels = arrays
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.from_numpy(labels).to(device)
        self.dataset, self.info, self.aug, self.device = dataset, info, aug, device
        self.batch_size, self.drop_last = batch_size, drop_last
        self.generator = torch.Generator(device=device)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """The configured ops on one uint8 batch; returns normalised float images."""
        n, gen, dev, a = images.shape[0], self.generator, self.device, self.aug
        if a.crop_padding > 0:
            images = pad_crop(images, *crop_params(n, a.crop_padding, gen, dev), a.crop_padding)
        if a.hflip:
            images = hflip(images, torch.rand(n, generator=gen, device=dev) < 0.5)
        if a.randaugment_ops > 0:
            images = randaugment(images, a.randaugment_ops, a.randaugment_magnitude, gen)
        if a.autoaugment:
            images = autoaugment(images, gen)
        x = normalize(images, self.info.mean, self.info.std)
        if a.random_erasing > 0:
            params = erase_params(n, x.shape[2], x.shape[3], a.random_erasing, gen, dev)
            x = erase(x, params, torch.randn(x.shape, generator=gen, device=dev))
        return x

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.labels), generator=self.generator, device=self.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.augment(self.images[idx]), self.labels[idx]
