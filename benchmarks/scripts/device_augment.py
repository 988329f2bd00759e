"""Time RandAugment(2, 10) on one batch of 128 uint8 32×32×3 images, side by side in one process:
the device pipeline's rounds, gathered (the CPU's default) and masked (CUDA's: no host syncs), and
torchvision's RandAugment on PIL images one by one (the CPU pipeline's transform, without workers).
`python benchmarks/scripts/device_augment.py`; median of 20 per variant, interleaved."""
import statistics
import time

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

from tokendrop.train import device_augment as A

torch.set_num_threads(2)
rng = np.random.default_rng(0)
batch = rng.integers(0, 256, (128, 32, 32, 3), dtype=np.uint8)
x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()
gen = torch.Generator().manual_seed(0)
pil = [Image.fromarray(im) for im in batch]
policy = T.RandAugment(2, 10)


def rounds(masked: bool) -> None:
    ops, mags = A.randaugment_params(128, 2, 10, 32, 32, gen)
    for o, m in zip(ops, mags):
        A.apply_ops(x, o, m, masked=masked)


variants = {"gathered": lambda: rounds(False), "masked": lambda: rounds(True),
            "torchvision PIL": lambda: [policy(im) for im in pil]}
times = {k: [] for k in variants}
for _ in range(20):
    for name, fn in variants.items():
        t = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t)
for name, ts in times.items():
    print(f"RESULT {name}: {1e3 * statistics.median(ts):.1f} ms per batch of 128")
