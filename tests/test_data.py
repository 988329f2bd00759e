"""Data sets, transforms and loaders (CPU, offline)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokendrop.train import data as D
from tokendrop.train.config import AugmentConfig, DataConfig

HAVE_FMNIST = all((D.FASHION_MNIST_SYSTEM_DIR / f).is_file() for f in D.FASHION_MNIST_FILES.values())
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="apt-get install dataset-fashion-mnist")

NO_AUG = AugmentConfig(crop_padding=0, hflip=False, randaugment_ops=0, random_erasing=0.0)


@pytest.fixture(scope="module")
def fmnist():
    return D.build_datasets(DataConfig(dataset="fashion-mnist", root="/nonexistent-root"), NO_AUG, seed=0)


@needs_fmnist
def test_fashion_mnist_from_debian_dir(fmnist):
    train, val, info = fmnist
    assert (len(train), len(val)) == (60000, 10000)
    assert (info.num_classes, info.in_chans, info.img_size) == (10, 1, 28)
    for ds in (train, val):
        assert set(ds.targets) == set(range(10))
    x, y = train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
    batch = torch.stack([train[i][0] for i in range(0, 60000, 60)])  # 1000 images
    assert abs(batch.mean().item()) < 0.05
    assert abs(batch.std().item() - 1.0) < 0.05


@needs_fmnist
def test_fashion_mnist_stats_match_data(fmnist):
    hist = np.bincount(fmnist[0].images.ravel(), minlength=256).astype(np.float64)
    v = np.arange(256) / 255.0
    mean = (hist * v).sum() / hist.sum()
    std = np.sqrt((hist * (v - mean) ** 2).sum() / hist.sum())
    info = D.dataset_info("fashion-mnist")
    assert abs(mean - info.mean[0]) < 1e-3 and abs(std - info.std[0]) < 1e-3


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, dtype, suffix):
    arr = (np.arange(2 * 3 * 5) * 7 % 251).reshape(2, 3, 5).astype(dtype)
    path = tmp_path / f"x-idx3-ubyte{suffix}"
    D.write_idx(path, arr)
    back = D.read_idx(path)
    assert back.shape == arr.shape and back.dtype == arr.dtype
    np.testing.assert_array_equal(back, arr)


def test_idx_parser_reads_handwritten_header(tmp_path):
    # magic 0x00000801 (uint8, 1 dim), length 3, then the bytes — written by hand, not by write_idx.
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 4, 2, 9]))
    np.testing.assert_array_equal(D.read_idx(path), [4, 2, 9])
    path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 4, 4, 2, 9]))  # truncated
    with pytest.raises(ValueError, match="bytes"):
        D.read_idx(path)


def test_fashion_mnist_from_root_subdir(tmp_path):
    sub = tmp_path / "fashion-mnist"
    sub.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 5)):
        D.write_idx(sub / D.FASHION_MNIST_FILES[f"{split}_images"], rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        D.write_idx(sub / D.FASHION_MNIST_FILES[f"{split}_labels"], (np.arange(n) % 10).astype(np.uint8))
    train, val, _ = D.build_datasets(DataConfig(dataset="fashion-mnist", root=str(tmp_path)), NO_AUG, 0)
    assert (len(train), len(val)) == (12, 5)
    assert val[3][1] == 3


def test_fashion_mnist_missing(tmp_path, monkeypatch):
    missing_sys = tmp_path / "no-such-system-dir"
    monkeypatch.setattr(D, "FASHION_MNIST_SYSTEM_DIR", missing_sys)
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(D.DatasetNotFoundError) as e:
        D.build_datasets(DataConfig(dataset="fashion-mnist", root=str(root)), NO_AUG, 0)
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert "\n" not in msg
    for d in (root, root / "fashion-mnist", missing_sys):
        assert str(d) in msg
    assert "apt-get install dataset-fashion-mnist" in msg


@pytest.mark.parametrize("name,folder", [("cifar100", "cifar-100-python"), ("cifar10", "cifar-10-batches-py")])
def test_cifar_missing_no_download(tmp_path, name, folder):
    with pytest.raises(D.DatasetNotFoundError) as e:
        D.build_datasets(DataConfig(dataset=name, root=str(tmp_path), download=False), NO_AUG, 0)
    msg = str(e.value)
    assert str(tmp_path.resolve()) in msg and folder in msg and "\n" not in msg
    assert "data.download=true" in msg


def test_cifar_download_failure_is_reported(tmp_path, monkeypatch):
    """A failing download (simulated: no network is touched) becomes a DatasetNotFoundError."""
    import socket
    import urllib.error

    from torchvision.datasets import CIFAR100

    def offline(*args, **kwargs):
        assert socket.getdefaulttimeout() == D.DOWNLOAD_TIMEOUT_S
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(CIFAR100, "download", offline)
    original = socket.getdefaulttimeout()
    socket.setdefaulttimeout(3.5)
    try:
        with pytest.raises(D.DatasetNotFoundError, match="download failed.*URLError"):
            D.build_datasets(DataConfig(dataset="cifar100", root=str(tmp_path), download=True), NO_AUG, 0)
        assert socket.getdefaulttimeout() == 3.5  # restored
    finally:
        socket.setdefaulttimeout(original)


def test_digits():
    train, val, info = D.build_datasets(DataConfig(dataset="digits"), AugmentConfig(), 0)
    assert (len(train), len(val)) == (1347, 450)
    assert (info.num_classes, info.in_chans, info.img_size) == (10, 1, 32)
    assert train[0][0].shape == (1, 32, 32) and val[0][0].shape == (1, 32, 32)
    assert set(val.targets) == set(range(10))
    n_tr, n_va = np.bincount(train.targets, minlength=10), np.bincount(val.targets, minlength=10)
    assert np.all(np.abs(n_va - 450 * (n_tr + n_va) / 1797) <= 1)  # stratified
    # The split is fixed: the same images whatever the seed.
    again, _, _ = D.build_datasets(DataConfig(dataset="digits"), AugmentConfig(), 123)
    np.testing.assert_array_equal(train.images, again.images)


def test_digits_stats_match_data():
    xtr = D.digits_arrays()[0].astype(np.float64) / 255.0
    info = D.dataset_info("digits")
    assert abs(xtr.mean() - info.mean[0]) < 1e-3 and abs(xtr.std() - info.std[0]) < 1e-3


def test_subsets_deterministic():
    cfg = DataConfig(dataset="digits", train_subset=100, val_subset=30)
    a_tr, a_va, _ = D.build_datasets(cfg, NO_AUG, seed=7)
    b_tr, b_va, _ = D.build_datasets(cfg, NO_AUG, seed=7)
    c_tr, _, _ = D.build_datasets(cfg, NO_AUG, seed=8)
    assert (len(a_tr), len(a_va)) == (100, 30)
    assert a_tr.indices == b_tr.indices and a_va.indices == b_va.indices
    assert a_tr.indices != c_tr.indices
    assert len(set(a_tr.indices)) == 100
    big = DataConfig(dataset="digits", train_subset=10**6, val_subset=0)
    tr, va, _ = D.build_datasets(big, NO_AUG, seed=7)
    assert (len(tr), len(va)) == (1347, 450)


@pytest.mark.parametrize("mode,info_name", [("L", "fashion-mnist"), ("RGB", "cifar100")])
@pytest.mark.parametrize("auto", [False, True])
def test_train_transforms_run(mode, info_name, auto):
    info = D.dataset_info(info_name)
    aug = AugmentConfig(crop_padding=4, hflip=True, randaugment_ops=0 if auto else 2, randaugment_magnitude=15,
                        autoaugment=auto, random_erasing=1.0)
    shape = (info.img_size, info.img_size) + (() if mode == "L" else (3,))
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    for size in (0, 40):
        tf = D.build_transforms(info, aug, size, train=True)
        names = [type(t).__name__ for t in tf.transforms]
        assert ("AutoAugment" in names) == auto and ("RandAugment" in names) != auto
        assert names[-1] == "RandomErasing" and ("Resize" in names) == (size == 40)
        side = size or info.img_size
        for _ in range(20):
            x = tf(Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)))
            assert x.shape == (info.in_chans, side, side) and torch.isfinite(x).all()
    ev = D.build_transforms(info, aug, 0, train=False)
    assert [type(t).__name__ for t in ev.transforms] == ["ToTensor", "Normalize"]


def test_random_resized_crop_replaces_the_resize():
    info = D.dataset_info("imagefolder", "deit_tiny_patch16_224")
    aug = dataclasses.replace(NO_AUG, random_resized_crop=True)
    tf = D.build_transforms(info, aug, 0, train=True)
    assert [type(t).__name__ for t in tf.transforms] == ["RandomResizedCrop", "ToTensor", "Normalize"]
    crop = tf.transforms[0]
    assert (crop.size, crop.scale, crop.ratio) == ((224, 224), (0.08, 1.0), (3 / 4, 4 / 3))  # the ImageNet default
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8))
    assert tf(img).shape == (3, 224, 224)
    ev = D.build_transforms(info, aug, 0, train=False)  # evaluation resizes as before
    assert [type(t).__name__ for t in ev.transforms] == ["Resize", "ToTensor", "Normalize"]


def test_dataset_info():
    assert D.dataset_info("cifar100").mean == (0.5071, 0.4867, 0.4408)
    assert D.dataset_info("cifar100").std == (0.2675, 0.2565, 0.2761)
    assert D.dataset_info("cifar10").num_classes == 10
    with pytest.raises(dataclasses.FrozenInstanceError):
        D.dataset_info("digits").num_classes = 3
    with pytest.raises(ValueError, match="unknown"):
        D.dataset_info("mnist")


def _batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_loader_determinism():
    aug = AugmentConfig(randaugment_ops=2, random_erasing=0.25)
    train, val, _ = D.build_datasets(DataConfig(dataset="digits", train_subset=96, val_subset=40), aug, 0)
    runs = []
    # (loader seed, global torch seed): the order must follow the loader seed alone; the augmentations
    # draw from the global RNG when workers=0.
    for seed, global_seed in ((3, 100), (3, 100), (3, 200), (4, 100)):
        tl, vl, sampler = D.build_loaders(train, val, 16, 32, workers=0, seed=seed, drop_last=True)
        assert sampler is None and tl.pin_memory == torch.cuda.is_available()
        torch.manual_seed(global_seed)
        runs.append((_batches(tl), _batches(vl)))
    (a_tr, a_va), (b_tr, b_va), (g_tr, _), (c_tr, c_va) = runs
    assert len(a_tr) == 6 and len(a_va) == 2 and a_va[1][0].shape[0] == 8
    for (xa, ya), (xb, yb) in zip(a_tr + a_va, b_tr + b_va):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for (_, ya), (_, yg) in zip(a_tr, g_tr):  # same loader seed, other global RNG: same order
        assert torch.equal(ya, yg)
    assert not all(torch.equal(ya, yc) for (_, ya), (_, yc) in zip(a_tr, c_tr))  # another seed, another order
    for (_, ya), (_, yc) in zip(a_va, c_va):  # val is never shuffled
        assert torch.equal(ya, yc)
    # Two epochs of one loader differ in order.
    tl, _, _ = D.build_loaders(train, val, 16, 32, workers=0, seed=3, drop_last=False)
    assert [y.tolist() for _, y in tl] != [y.tolist() for _, y in tl]


def test_loader_workers_deterministic():
    train, val, _ = D.build_datasets(DataConfig(dataset="digits", train_subset=32, val_subset=8),
                                     AugmentConfig(randaugment_ops=2), 0)
    out = []
    for _ in range(2):
        tl, vl, _ = D.build_loaders(train, val, 8, 8, workers=1, seed=5, drop_last=False)
        assert not tl.persistent_workers and tl.worker_init_fn is D.seed_worker  # fresh, reseedable workers each epoch
        out.append(torch.cat([x for x, _ in tl]))
        del tl, vl
    assert torch.equal(out[0], out[1])


# ------------------------------------------------------------------------------------- own images
def _image_folder(root, size=(50, 40)):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


@pytest.mark.parametrize("model, img_size, side", [
    ("hybrid_vit_tiny", 0, 32),          # our hybrids are built for 32 px
    ("hybrid_vit_ptd", 0, 32),
    ("deit_tiny_patch16_224", 0, 224),   # a timm model: its pretrained input size
    ("vit_base_patch16_384", 0, 384),
    ("hybrid_vit_tiny", 48, 48),         # data.img_size wins
])
def test_imagefolder_native_side_is_the_models(tmp_path, model, img_size, side):
    root = _image_folder(tmp_path / "pets")
    train, val, info = D.build_datasets(DataConfig(dataset="imagefolder", root=str(root), img_size=img_size), NO_AUG, 0,
                                        model)
    assert info.img_size == (side if img_size == 0 else 32)  # the native side; data.img_size overrides it
    assert train[0][0].shape == val[0][0].shape == (3, side, side)
    assert info.num_classes == 2 and info.source == str(root.resolve())
    # the other data sets keep their own native side whatever the model
    assert D.dataset_info("fashion-mnist", model).img_size == 28 and D.dataset_info("cifar100", model).img_size == 32


def test_many_tokens_notice(capsys):
    from tokendrop.train.config import load_config
    from tokendrop.train.trainer import MANY_TOKENS, build_run_model

    cfg = load_config("fashion_mnist_baseline")  # hybrid_vit_tiny: stem stride 4
    model = build_run_model(cfg, 10, 3, 224)
    err = capsys.readouterr().err.strip().splitlines()
    tokens = (224 // 4) ** 2
    assert tokens > MANY_TOKENS and model.patch_embed.num_patches == tokens
    assert len(err) == 1 and f"{tokens} tokens per image at 224 px" in err[0]
    assert "--set data.img_size=N (e.g. 32: about 64 tokens)" in err[0]
    build_run_model(cfg, 10, 3, 128)  # (128 / 4)² = 1024: not more than the limit
    build_run_model(cfg, 10, 3, 32)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------- where, and no writes
@needs_fmnist
def test_source_says_which_directory(tmp_path):
    _, _, info = D.build_datasets(DataConfig(dataset="fashion-mnist", root=str(tmp_path / "nonexistent")), NO_AUG, 0)
    assert info.source == str(D.FASHION_MNIST_SYSTEM_DIR)
    assert D.build_datasets(DataConfig(dataset="digits"), NO_AUG, 0)[2].source == "scikit-learn's bundled digits"


def _offline(monkeypatch):
    """torchvision's downloader fails as offline, after it has created the root (no network touched)."""
    import urllib.error

    import torchvision.datasets.utils as tv_utils

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(tv_utils, "_get_redirect_url", refuse)
    monkeypatch.setattr(tv_utils, "_urlretrieve", refuse)


@pytest.mark.parametrize("download", [False, True])
@pytest.mark.parametrize("nested", ["data", "a/b/data"])
def test_failed_cifar_load_leaves_no_directory(tmp_path, monkeypatch, download, nested):
    _offline(monkeypatch)
    root = tmp_path / "work" / nested
    (tmp_path / "work").mkdir()
    with pytest.raises(D.DatasetNotFoundError):
        D.build_datasets(DataConfig(dataset="cifar100", root=str(root), download=download), NO_AUG, 0)
    assert list((tmp_path / "work").iterdir()) == []


def test_failed_cifar_load_keeps_an_existing_root(tmp_path, monkeypatch):
    _offline(monkeypatch)
    root = tmp_path / "data"
    root.mkdir()
    (root / "mine.txt").write_text("keep me")
    with pytest.raises(D.DatasetNotFoundError):
        D.build_datasets(DataConfig(dataset="cifar10", root=str(root), download=True), NO_AUG, 0)
    assert sorted(p.name for p in root.iterdir()) == ["mine.txt"]


@pytest.mark.parametrize("download", ["false", "true"])
def test_failed_train_and_eval_write_nothing(tmp_path, monkeypatch, capsys, download):
    from tokendrop.cli import main
    from tokendrop.train.checkpoint import save_atomic
    from tokendrop.train.config import load_config

    _offline(monkeypatch)
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "nonexistent" / "cifar"
    common = ["--set", f"data.root={missing}", "--set", f"data.download={download}"]
    assert main(["train", "--config", "cifar100_baseline", "--out", "run", *common]) == 1
    assert "CIFAR-100 not found" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    ckpt = tmp_path / "ckpt" / "best.pt"
    save_atomic({"model": {}, "config": load_config("cifar100_baseline").to_dict(), "epoch": 0}, ckpt)
    assert main(["eval", "--checkpoint", str(ckpt), "--device", "cpu", *common]) == 1
    assert "CIFAR-100 not found" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    # the default root, relative to the working directory ("data"), is not created either
    assert main(["eval", "--checkpoint", str(ckpt), "--device", "cpu", "--set", f"data.download={download}"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@needs_fmnist
def test_train_prints_the_data_directory(tmp_path, capsys):
    """The report's case: data.root does not exist, so Fashion-MNIST comes from the system copy — and says so."""
    from tokendrop.cli import main

    args = ["train", "--config", "fashion_mnist_baseline", "--out", str(tmp_path / "run"), "--no-progress",
            "--device", "cpu"]
    for item in ("data.root=/nonexistent/path", "optim.epochs=1", "data.train_subset=64", "data.val_subset=64",
                 "data.workers=0", "optim.batch_size=32", "ema.enabled=false"):
        args += ["--set", item]
    assert main(args) == 0
    err = capsys.readouterr().err.splitlines()
    assert f"data: fashion-mnist from {D.FASHION_MNIST_SYSTEM_DIR}" in err
    assert not Path("/nonexistent/path").exists()


# ------------------------------------------------------------------------------------------ synthetic
def synthetic(**kw) -> DataConfig:
    return DataConfig(dataset="synthetic", synthetic=dataclasses.replace(DataConfig().synthetic, **kw))


def test_synthetic_shape_determinism_and_signal():
    cfg = synthetic(channels=3, size=12, classes=5, train_images=300, val_images=100)
    train, val, info = D.build_datasets(cfg, NO_AUG, seed=3)
    assert (len(train), len(val)) == (300, 100)
    assert (info.num_classes, info.in_chans, info.img_size, len(info.mean)) == (5, 3, 12, 3)
    assert train.images.shape == (300, 12, 12, 3) and train.images.dtype == np.uint8
    assert train[0][0].shape == (3, 12, 12) and set(train.targets) == set(range(5))
    again, _, _ = D.build_datasets(cfg, NO_AUG, seed=3)
    other, _, _ = D.build_datasets(cfg, NO_AUG, seed=4)
    np.testing.assert_array_equal(train.images, again.images)
    assert train.targets == again.targets and not np.array_equal(train.images, other.images)
    # the labels carry the signal: the nearest training class mean classifies the validation images
    x, y = train.images.reshape(300, -1).astype(np.float64), np.array(train.targets)
    means = np.stack([x[y == c].mean(0) for c in range(5)])
    v = val.images.reshape(100, -1).astype(np.float64)
    pred = ((v[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == np.array(val.targets)).mean() > 0.9
    # normalised with stats near the data's own
    scaled = train.images / 255.0
    assert abs(scaled.mean() - info.mean[0]) < 0.1 and abs(scaled.std() - info.std[0]) < 0.1


def test_synthetic_grey_trains_end_to_end(tmp_path, capsys):
    from tokendrop.cli import main

    args = ["train", "--config", "fashion_mnist_baseline", "--out", str(tmp_path / "run"), "--no-progress",
            "--device", "cpu"]
    for item in ("data.dataset=synthetic", "data.synthetic.channels=1", "data.synthetic.size=16",
                 "data.synthetic.classes=4", "data.synthetic.train_images=64", "data.synthetic.val_images=32",
                 "model.name=hybrid_vit_tiny", "optim.epochs=1", "data.workers=0", "optim.batch_size=32",
                 "run.threads=1", "ema.enabled=false"):
        args += ["--set", item]
    assert main(args) == 0
    assert "data: synthetic from generated (64 + 32 images, 1×16², 4 classes, seed 0)" in capsys.readouterr().err
    assert main([*args[:4], str(tmp_path / "bad"), "--set", "data.synthetic.channels=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.synthetic.channels" in err[0]
