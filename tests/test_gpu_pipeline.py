"""The device data pipeline (tokendrop.train.gpu_pipeline) on the CPU: each op against torchvision's
functional op with the same image and parameters, the sampled parameters against torchvision's own
samplers, the loader, the choice of pipeline and its errors, and a resumed run through the trainer."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision import transforms as T

from tokendrop.train import data as D
from tokendrop.train import gpu_pipeline as G
from tokendrop.train.config import AugmentConfig, ConfigError, DataConfig

CPU = torch.device("cpu")
NO_AUG = AugmentConfig(crop_padding=0, hflip=False, randaugment_ops=0, random_erasing=0.0)


def batch(n=6, c=3, h=10, w=12, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_pad_crop_and_flip_equal_torchvision():
    x, pad = batch(), 3
    i, j = torch.tensor([0, 6, 2, 5, 3, 1]), torch.tensor([6, 0, 4, 1, 3, 2])
    out = G.pad_crop(x, i, j, pad)
    for n in range(6):
        ref = TF.crop(TF.pad(x[n], [pad]), int(i[n]), int(j[n]), 10, 12)
        assert torch.equal(out[n], ref)
    flags = torch.tensor([True, False, True, False, False, True])
    flipped = G.hflip(out, flags)
    for n in range(6):
        assert torch.equal(flipped[n], TF.hflip(out[n]) if flags[n] else out[n])


def test_normalize_and_erase_equal_torchvision():
    x = batch(n=3)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = G.normalize(x, mean, std)
    for n in range(3):
        ref = TF.normalize(TF.to_tensor(x[n].permute(1, 2, 0).numpy()), mean, std)
        torch.testing.assert_close(out[n], ref, atol=1e-6, rtol=0)
    params = G.EraseParams(torch.tensor([True, False, True]), torch.tensor([1, 0, 4]), torch.tensor([2, 0, 0]),
                           torch.tensor([3, 2, 6]), torch.tensor([5, 2, 1]))
    values = torch.randn(out.shape)
    erased = G.erase(out, params, values)
    for n in range(3):
        i, j, h, w = (int(t[n]) for t in (params.i, params.j, params.h, params.w))
        ref = TF.erase(out[n], i, j, h, w, values[n, :, i:i + h, j:j + w]) if params.apply[n] else out[n]
        assert torch.equal(erased[n], ref)


def test_sampled_parameters_follow_torchvisions_distributions():
    gen, n = torch.Generator().manual_seed(0), 4000
    i, j = G.crop_params(n, 4, gen, CPU)
    for v in (i, j):  # RandomCrop(32, padding=4): corners uniform in 0..8
        freq = torch.bincount(v, minlength=9).double() / n
        assert v.min() == 0 and v.max() == 8 and (freq - 1 / 9).abs().max() < 0.02
    p = G.erase_params(n, 32, 32, 0.25, gen, CPU)
    assert abs(p.apply.double().mean() - 0.25) < 0.03
    assert bool(((p.i + p.h <= 32) & (p.j + p.w <= 32) & (p.h < 32) & (p.w < 32) & (p.i >= 0) & (p.j >= 0)).all())
    torch.manual_seed(0)  # torchvision's sampler on the same image size, as the reference distribution
    tv = T.RandomErasing(p=0.25, value="random")  # its default scale and ratio
    ref = np.array([tv.get_params(torch.zeros(3, 32, 32), tv.scale, tv.ratio, [0.0])[:4] for _ in range(2000)],
                   dtype=np.float64)
    ours = torch.stack([p.i, p.j, p.h, p.w], 1).double().numpy()
    for col in range(4):  # box corner and size: means within 3 standard errors
        se = np.sqrt(ref[:, col].var() / len(ref) + ours[:, col].var() / n)
        assert abs(ref[:, col].mean() - ours[:, col].mean()) < 3 * se, col
    area = (p.h * p.w).double() / (32 * 32)
    ref_area = ref[:, 2] * ref[:, 3] / (32 * 32)
    assert abs(area.mean().item() - ref_area.mean()) < 0.01


def digits_train(subset: int = 100):
    train, _, info = D.build_datasets(DataConfig(dataset="digits", train_subset=subset), NO_AUG, 0)
    return train, info


def test_loader_batches_are_the_normalised_images_in_a_seeded_order():
    train, info = digits_train()
    arrays = G.resident_arrays(train)
    assert arrays[0].shape == (100, 32, 32, 1) and list(arrays[1]) == [train[k][1] for k in range(100)]
    loader = G.DeviceLoader(arrays, train, info, NO_AUG, 32, True, CPU)
    assert len(loader) == 3 and len(G.DeviceLoader(arrays, train, info, NO_AUG, 32, False, CPU)) == 4
    loader.generator.manual_seed(5)
    batches = list(loader)
    expected = torch.randperm(100, generator=torch.Generator().manual_seed(5))
    for b, (x, y) in enumerate(batches):
        idx = expected[b * 32:(b + 1) * 32]
        ref = torch.stack([train[int(k)][0] for k in idx])  # the CPU pipeline: ToTensor + Normalize
        torch.testing.assert_close(x, ref, atol=1e-6, rtol=0)
        assert y.tolist() == [train[int(k)][1] for k in idx]
    aug = dataclasses.replace(NO_AUG, crop_padding=4, hflip=True, random_erasing=0.5)
    loader = G.DeviceLoader(arrays, train, info, aug, 32, True, CPU)
    draws = []
    for _ in range(2):  # reseeded: the same batches (resume)
        loader.generator.manual_seed(9)
        draws.append(next(iter(loader))[0])
    assert torch.equal(draws[0], draws[1]) and draws[0].shape == (32, 1, 32, 32)


def test_choosing_the_pipeline_and_its_errors(monkeypatch):
    train, info = digits_train()
    assert G.choose_pipeline("cpu", CPU, train, NO_AUG, info, 0) is None
    assert G.choose_pipeline("auto", CPU, train, NO_AUG, info, 0) is None  # auto = gpu on CUDA only
    assert G.choose_pipeline("gpu", CPU, train, NO_AUG, info, 0)[0].shape == (100, 32, 32, 1)
    with pytest.raises(ConfigError, match=r"^data.pipeline: gpu does not support RandomResizedCrop") as e:
        G.choose_pipeline("gpu", CPU, train, dataclasses.replace(NO_AUG, random_resized_crop=True), info, 0)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^data.pipeline: gpu does not support resizing"):
        G.choose_pipeline("gpu", CPU, train, NO_AUG, info, 24)
    assert G.choose_pipeline("auto", CPU, train, AugmentConfig(), info, 24) is None  # auto never fails
    monkeypatch.setattr(G, "free_memory_bytes", lambda device: 100 * 32 * 32 * 2 - 1)  # half of it < the set's bytes
    with pytest.raises(ConfigError, match=r"^data.pipeline: gpu needs 0 MiB .* use data.pipeline=cpu") as e:
        G.choose_pipeline("gpu", CPU, train, NO_AUG, info, 0)
    assert "\n" not in str(e.value)
    monkeypatch.setattr(G, "free_memory_bytes", lambda device: 100 * 32 * 32 * 2)
    assert G.choose_pipeline("gpu", CPU, train, NO_AUG, info, 0) is not None


def test_unsupported_device_pipeline_is_a_one_line_usage_error(tmp_path, capsys):
    from tokendrop.cli import main

    out = tmp_path / "run"
    args = ["train", "--config", "fashion_mnist_ptd", "--out", str(out), "--device", "cpu"]
    for item in ("data.dataset=digits", "data.workers=0", "data.pipeline=gpu", "augment.random_resized_crop=true",
                 "augment.crop_padding=0", "optim.epochs=1"):
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.pipeline: gpu does not support RandomResizedCrop" in err[0]
    assert not out.exists()


def test_trainer_on_the_device_pipeline_resumes_exactly(tmp_path, monkeypatch, capsys):
    from tokendrop.cli import main
    from tokendrop.train import trainer as trainer_mod

    def read_rows(run):
        with open(run / "metrics.csv") as f:
            return list(csv.DictReader(f))

    args = ["--config", "fashion_mnist_baseline", "--no-progress"]
    for item in ("data.dataset=digits", "data.train_subset=64", "data.val_subset=32", "data.workers=0",
                 "optim.batch_size=32", "optim.epochs=2", "run.threads=1", "run.device=cpu", "data.pipeline=gpu",
                 "augment.randaugment_ops=0", "augment.random_erasing=0.25", "model.name=hybrid_vit_tiny"):
        args += ["--set", item]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["train", "--out", str(full), *args]) == 0
    assert "training batches made on cpu" in capsys.readouterr().err
    original = trainer_mod.Trainer._train_epoch

    def interrupted(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(trainer_mod.Trainer, "_train_epoch", interrupted)
    assert main(["train", "--out", str(cut), *args]) == 130
    monkeypatch.setattr(trainer_mod.Trainer, "_train_epoch", original)
    assert main(["train", "--out", str(cut), "--resume", *args]) == 0
    timing = {"epoch_time_sec", "train_imgs_per_sec"}
    a, b = read_rows(full), read_rows(cut)
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in timing} == {k: v for k, v in rb.items() if k not in timing}
