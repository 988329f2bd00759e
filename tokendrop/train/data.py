"""Data sets, transforms and loaders for training.

Supported data sets (``DataConfig.dataset``):

* ``cifar10`` / ``cifar100`` — torchvision, files under ``data.root`` (downloaded when
  ``data.download`` is true and the internet is reachable).
* ``fashion-mnist`` — the four raw idx ``.gz`` files, read with a small numpy parser from
  ``data.root``, ``data.root/fashion-mnist`` or :data:`FASHION_MNIST_SYSTEM_DIR`
  (Debian package ``dataset-fashion-mnist``). 60 000 train / 10 000 test images, 28×28 grey.
* ``digits`` — scikit-learn's bundled 8×8 digits (offline), upsampled to 32×32; a fixed stratified
  split of 1347 train / 450 val images.
* ``imagefolder`` — ``torchvision.datasets.ImageFolder`` on ``data.root/train`` and ``data.root/val``; its
  native side is the model's (:func:`model_input_size`), since its images come in any size.
* ``synthetic`` — generated in memory for benchmarking without data (:func:`synthetic_arrays`), shaped by
  ``data.synthetic.*``; the same for the same ``seed``.

Images are PIL images (mode ``L`` for one-channel sets) until ``ToTensor``; Mixup/CutMix are applied
on batches by the trainer, not here. A failed load leaves no directory behind (torchvision's CIFAR download
creates ``data.root`` before it fails).
"""

from __future__ import annotations

import dataclasses
import gzip
import random
import shutil
import socket
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from torchvision import transforms as T

from ..models.hybrid_vit import BACKBONES
from .config import AugmentConfig, DataConfig, ModelConfig, SyntheticConfig

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs the raw idx files."""

FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "val_images": "t10k-images-idx3-ubyte.gz",
    "val_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_URL = "https://github.com/zalandoresearch/fashion-mnist (data/fashion/)"

DOWNLOAD_TIMEOUT_S = 20.0
"""Socket timeout around torchvision's CIFAR download, so an offline machine fails fast."""

DIGITS_VAL_SIZE = 450

HYBRID_IMG_SIZE = 32
"""The input side our hybrid backbones are built for (the CIFAR stem)."""

TIMM_DEFAULT_IMG_SIZE = 224
"""timm's default input side, for a timm model whose pretrained config declares none."""


class DatasetNotFoundError(FileNotFoundError):
    """The data set's files are not where we looked; the message says where and how to get them."""


@dataclass(frozen=True)
class DatasetInfo:
    """Facts about a data set: classes, channels, native side and normalisation stats; ``source`` says where
    :func:`build_datasets` read the images from."""

    name: str
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple
    std: tuple
    source: str = ""


_INFOS: dict[str, DatasetInfo] = {
    # Per-pixel statistics over the respective training sets.
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    # Computed over the 60 000 training images: 0.28604 / 0.35302.
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,)),
    # Computed over the 1347 training images after scaling 0-16 -> 0-255 and bilinear 8 -> 32
    # upsampling: 0.30550 / 0.32341 (tests/test_data.py recomputes them).
    "digits": DatasetInfo("digits", 10, 1, 32, (0.3055,), (0.3234,)),
    # num_classes is found when the folders are read (build_datasets); the side is the model's (dataset_info).
    "imagefolder": DatasetInfo("imagefolder", 0, 3, 0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # Shaped by data.synthetic (dataset_info); about these stats by construction (see synthetic_arrays).
    "synthetic": DatasetInfo("synthetic", 0, 0, 0, (0.5,), (0.25,)),
}

SYNTHETIC_NOISE = 64
"""Half-width (in uint8 levels) of the uniform per-pixel noise on each synthetic class prototype."""


def model_input_size(model: str) -> int:
    """The input side ``model`` is built for: 32 px for our ``hybrid_vit_*``, else the timm model's
    ``pretrained_cfg`` input size (timm's 224 when it declares none)."""
    if model in BACKBONES:
        return HYBRID_IMG_SIZE
    import timm

    try:
        size = timm.models.get_pretrained_cfg_value(model, "input_size")
    except RuntimeError:  # no pretrained config registered (an unknown name fails later, naming model.name)
        size = None
    return int(size[-1]) if size else TIMM_DEFAULT_IMG_SIZE


def dataset_info(name: str, model: str = ModelConfig.name, synthetic: SyntheticConfig | None = None) -> DatasetInfo:
    """Facts about data set ``name`` as input to ``model``: ``imagefolder`` images come in any size, so their
    native side is the model's (:func:`model_input_size`); its num_classes is 0 until build time. The
    ``synthetic`` set's shape and classes are ``synthetic``'s (default: :class:`SyntheticConfig`'s)."""
    try:
        info = _INFOS[name]
    except KeyError:
        raise ValueError(f"data.dataset: unknown data set {name!r} (known: {', '.join(_INFOS)})") from None
    if name == "imagefolder":
        info = dataclasses.replace(info, img_size=model_input_size(model))
    if name == "synthetic":
        syn = synthetic or SyntheticConfig()
        info = dataclasses.replace(info, num_classes=syn.classes, in_chans=syn.channels, img_size=syn.size,
                                   mean=info.mean * syn.channels, std=info.std * syn.channels)
    return info


# --------------------------------------------------------------------------------------- transforms
def build_transforms(info: DatasetInfo, aug: AugmentConfig, img_size: int, train: bool) -> T.Compose:
    """Train or eval transform from PIL image to normalised tensor (``img_size`` 0 = native side)."""
    size = img_size or info.img_size
    ops: list[Callable] = []
    if train and aug.random_resized_crop:  # timm's and torchvision's ImageNet default: scale (0.08, 1)
        ops.append(T.RandomResizedCrop(size, antialias=True))
    elif size != info.img_size or info.name == "imagefolder":  # imagefolder images come in any size
        ops.append(T.Resize((size, size), antialias=True))
    if train:
        if aug.crop_padding > 0:
            ops.append(T.RandomCrop(size, padding=aug.crop_padding))
        if aug.hflip:
            ops.append(T.RandomHorizontalFlip())
        if aug.randaugment_ops > 0:
            ops.append(T.RandAugment(num_ops=aug.randaugment_ops, magnitude=aug.randaugment_magnitude))
        if aug.autoaugment:
            ops.append(T.AutoAugment(T.AutoAugmentPolicy.CIFAR10))
    ops += [T.ToTensor(), T.Normalize(info.mean, info.std)]
    if train and aug.random_erasing > 0:
        ops.append(T.RandomErasing(p=aug.random_erasing, value="random"))
    return T.Compose(ops)


# ------------------------------------------------------------------------------ in-memory data sets
class ArrayDataset(Dataset):
    """uint8 images ``(N, H, W)`` or ``(N, H, W, C)`` held in memory; yields ``(transform(PIL), label)``."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], transform: Callable | None = None,
                 classes: Sequence[str] | None = None):
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"images must be uint8 (N, H, W[, C]), got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.targets = [int(t) for t in labels]
        self.transform = transform
        self.classes = list(classes) if classes is not None else sorted(set(self.targets))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (``.gz`` or raw): big-endian header, magic ``0 0 dtype ndim``, then the dims."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise ValueError(f"{path}: unknown idx element type 0x{data[2]:02x}")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(dtypes[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but {len(data) - header} bytes follow")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` as an idx file (gzip when ``path`` ends in ``.gz``); the inverse of :func:`read_idx`."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
             np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}
    arr = np.asarray(array)
    if arr.dtype not in codes:
        raise ValueError(f"idx cannot hold dtype {arr.dtype}")
    header = bytes([0, 0, codes[arr.dtype], arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    payload = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(payload)


def _fashion_mnist_dir(root: Path) -> Path:
    searched = [root, root / "fashion-mnist", FASHION_MNIST_SYSTEM_DIR]
    for d in searched:
        if all((d / name).is_file() for name in FASHION_MNIST_FILES.values()):
            return d
    raise DatasetNotFoundError(
        f"Fashion-MNIST not found: looked for {', '.join(FASHION_MNIST_FILES.values())} in "
        f"{', '.join(str(d) for d in searched)}; run `apt-get install dataset-fashion-mnist` or download "
        f"the four files from {FASHION_MNIST_URL} into {root}")


def _load_fashion_mnist(root: Path, train_tf: Callable, val_tf: Callable):
    d = _fashion_mnist_dir(root)
    arrays = {k: read_idx(d / name) for k, name in FASHION_MNIST_FILES.items()}
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]
    return (ArrayDataset(arrays["train_images"], arrays["train_labels"], train_tf, classes),
            ArrayDataset(arrays["val_images"], arrays["val_labels"], val_tf, classes), str(d.resolve()))


def digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn digits as uint8 32×32 images: ``(train_x, train_y, val_x, val_y)``, fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    small = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(a).resize((32, 32), Image.BILINEAR)) for a in small])
    idx_tr, idx_va = train_test_split(np.arange(len(big)), test_size=DIGITS_VAL_SIZE, stratify=d.target,
                                      random_state=0)
    return big[idx_tr], d.target[idx_tr], big[idx_va], d.target[idx_va]


def synthetic_arrays(cfg: SyntheticConfig, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A learnable synthetic data set as uint8 ``(train_x, train_y, val_x, val_y)``, images ``(N, H, W)`` for
    one channel and ``(N, H, W, C)`` otherwise. Each class has a smooth prototype (uniform 4×4 levels in
    [0, 255], bilinearly upsampled); an image is its class's prototype plus integer noise uniform in
    ±:data:`SYNTHETIC_NOISE` per pixel, clipped to [0, 255]. Labels are uniform. Everything follows from
    ``seed`` (NumPy's PCG64); integer noise keeps the generation cheap."""
    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.random((cfg.classes, cfg.channels, 4, 4), dtype=np.float32) * 255)
    protos = torch.nn.functional.interpolate(low, size=(cfg.size, cfg.size), mode="bilinear", align_corners=False)
    protos = protos.round().to(torch.int16).permute(0, 2, 3, 1).numpy()  # (classes, H, W, C)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, cfg.classes, n)
        images = np.empty((n, cfg.size, cfg.size, cfg.channels), dtype=np.uint8)
        for i in range(0, n, 4096):  # in chunks: int16 copies of all images at once would double the memory
            part = labels[i:i + 4096]
            noise = rng.integers(-SYNTHETIC_NOISE, SYNTHETIC_NOISE + 1, size=(len(part), *images.shape[1:]), dtype=np.int16)
            images[i:i + 4096] = np.clip(protos[part] + noise, 0, 255)
        return (images[..., 0].copy() if cfg.channels == 1 else images), labels

    return (*draw(cfg.train_images), *draw(cfg.val_images))


def _outermost_missing(path: Path) -> Path | None:
    """The outermost directory of ``path`` (``path`` itself included) that does not exist yet, or None."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            break
        missing = p
    return missing


def _load_cifar(name: str, root: Path, download: bool, train_tf: Callable, val_tf: Callable):
    from torchvision import datasets

    cls, folder = (datasets.CIFAR10, "cifar-10-batches-py") if name == "cifar10" else \
        (datasets.CIFAR100, "cifar-100-python")
    created = _outermost_missing(root.resolve())  # what torchvision's download would create
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        train = cls(str(root), train=True, download=download, transform=train_tf)
        val = cls(str(root), train=False, download=False, transform=val_tf)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        if created is not None:  # a failed load writes nothing: remove the directories the download made
            shutil.rmtree(created, ignore_errors=True)
        reason = f"download failed ({type(e).__name__}: {e})" if download else "download disabled"
        reason = " ".join(reason.split())
        raise DatasetNotFoundError(
            f"{'CIFAR-10' if name == 'cifar10' else 'CIFAR-100'} not found in {root.resolve()} ({folder}/ missing or corrupt; {reason}); run with "
            f"data.download=true on a machine with internet, or copy {folder}/ into {root.resolve()}") from None
    finally:
        socket.setdefaulttimeout(old)
    return train, val, str(root.resolve() / folder)


def _load_imagefolder(root: Path, train_tf: Callable, val_tf: Callable):
    from torchvision import datasets

    missing = [str(root / s) for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise DatasetNotFoundError(f"imagefolder: {' and '.join(missing)} not found; put one sub-folder per "
                                   f"class under {root}/train and {root}/val")
    try:
        train = datasets.ImageFolder(str(root / "train"), transform=train_tf)
        val = datasets.ImageFolder(str(root / "val"), transform=val_tf)
    except FileNotFoundError as e:
        raise DatasetNotFoundError(f"imagefolder: {' '.join(str(e).split())}") from None
    if val.class_to_idx != train.class_to_idx:
        raise ValueError(f"imagefolder: {root}/val has classes {val.classes} but {root}/train has {train.classes}")
    return train, val, str(root.resolve())


def _subset(ds: Dataset, n: int, seed: int) -> Dataset:
    """A fixed random subset of ``n`` items (the same for the same seed); ``n`` 0 or too large = all."""
    if n <= 0 or n >= len(ds):
        return ds
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return Subset(ds, sorted(perm.tolist()))


def build_datasets(cfg_data: DataConfig, aug: AugmentConfig, seed: int, model: str = ModelConfig.name
                   ) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Train and val data sets with their transforms for ``model``, and the :class:`DatasetInfo` (num_classes
    and source filled in; ``img_size`` is the native side, which ``data.img_size`` 0 selects)."""
    info = dataset_info(cfg_data.dataset, model, cfg_data.synthetic)
    root = Path(cfg_data.root).expanduser()
    train_tf = build_transforms(info, aug, cfg_data.img_size, train=True)
    val_tf = build_transforms(info, aug, cfg_data.img_size, train=False)
    if info.name in ("cifar10", "cifar100"):
        train, val, source = _load_cifar(info.name, root, cfg_data.download, train_tf, val_tf)
    elif info.name == "fashion-mnist":
        train, val, source = _load_fashion_mnist(root, train_tf, val_tf)
    elif info.name == "digits":
        xtr, ytr, xva, yva = digits_arrays()
        train, val, source = ArrayDataset(xtr, ytr, train_tf), ArrayDataset(xva, yva, val_tf), "scikit-learn's bundled digits"
    elif info.name == "synthetic":
        xtr, ytr, xva, yva = synthetic_arrays(cfg_data.synthetic, seed)
        syn = cfg_data.synthetic
        names = [str(c) for c in range(syn.classes)]
        train, val = ArrayDataset(xtr, ytr, train_tf, names), ArrayDataset(xva, yva, val_tf, names)
        source = f"generated ({syn.train_images} + {syn.val_images} images, {syn.channels}×{syn.size}², {syn.classes} classes, seed {seed})"
    else:
        train, val, source = _load_imagefolder(root, train_tf, val_tf)
        info = dataclasses.replace(info, num_classes=len(train.classes))
    info = dataclasses.replace(info, source=source)
    return _subset(train, cfg_data.train_subset, seed), _subset(val, cfg_data.val_subset, seed + 1), info


# ------------------------------------------------------------------------------------------ loaders
def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy and ``random`` from the worker's torch seed."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def build_loaders(train_ds: Dataset, val_ds: Dataset, batch_size: int, eval_batch_size: int, workers: int,
                  seed: int, drop_last: bool, distributed: bool = False
                  ) -> tuple[DataLoader, DataLoader, Sampler | None]:
    """Train loader (seeded shuffle), val loader (in order) and the train ``DistributedSampler`` or None.

    The shuffle order and the workers' seeds come from ``seed`` (plus the rank when distributed); with
    ``workers=0`` the augmentations draw from the global torch RNG, so seed it (``torch.manual_seed``).
    When ``distributed``, the trainer must call ``sampler.set_epoch(epoch)`` every epoch. The val loader is
    not sharded here: the trainer shards it per rank without padding and sums the counts.
    """
    rank = torch.distributed.get_rank() if distributed and torch.distributed.is_initialized() else 0
    gen = torch.Generator().manual_seed(seed + rank)
    # Workers are not persistent: each epoch starts new workers seeded from the loader's generator, which
    # the trainer reseeds per epoch, so a resumed run draws exactly the augmentations of an uninterrupted one.
    common = dict(num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=False,
                  worker_init_fn=seed_worker if workers > 0 else None)
    sampler = DistributedSampler(train_ds, shuffle=True, seed=seed, drop_last=drop_last) if distributed else None
    train = DataLoader(train_ds, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                       drop_last=drop_last, generator=gen, **common)
    val = DataLoader(val_ds, batch_size=eval_batch_size, shuffle=False, drop_last=False, **common)
    return train, val, sampler
