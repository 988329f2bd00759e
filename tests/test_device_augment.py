"""RandAugment and AutoAugment on the device (tokendrop.train.device_augment) on the CPU: each op against
torchvision's functional tensor op with the same image and parameters, the policies' draws against a naive
per-sample re-implementation of torchvision's samplers, a drawn batch against torchvision's ops with the
drawn parameters, and the device loader with the policies on."""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter

import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import AutoAugment, AutoAugmentPolicy, InterpolationMode, RandAugment

from tokendrop.train import data as D
from tokendrop.train import device_augment as A
from tokendrop.train import gpu_pipeline as G
from tokendrop.train.config import AugmentConfig, DataConfig

CPU = torch.device("cpu")
NEAREST = InterpolationMode.NEAREST


def images(n: int, c: int, h: int = 26, w: int = 31, seed: int = 0) -> torch.Tensor:
    """Random uint8 images; the first is flat, the second black on its left half, the third low-contrast
    (the edge cases of autocontrast, equalize and solarize)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, h, w), generator=gen, dtype=torch.uint8)
    x[0] = 77
    x[1, :, :, : w // 2] = 0
    x[2] = torch.randint(100, 104, (c, h, w), generator=gen, dtype=torch.uint8)
    return x


def reference(img: torch.Tensor, name: str, m: float) -> torch.Tensor:
    """One image through torchvision's functional tensor op with the parameters RandAugment passes."""
    geometric = dict(scale=1.0, interpolation=NEAREST, fill=None)
    if name == "ShearX":
        return TF.affine(img, angle=0.0, translate=[0, 0], shear=[math.degrees(math.atan(m)), 0.0], center=[0, 0],
                         **geometric)
    if name == "ShearY":
        return TF.affine(img, angle=0.0, translate=[0, 0], shear=[0.0, math.degrees(math.atan(m))], center=[0, 0],
                         **geometric)
    if name == "TranslateX":
        return TF.affine(img, angle=0.0, translate=[int(m), 0], shear=[0.0, 0.0], **geometric)
    if name == "TranslateY":
        return TF.affine(img, angle=0.0, translate=[0, int(m)], shear=[0.0, 0.0], **geometric)
    calls = {
        "Identity": lambda: img,
        "Rotate": lambda: TF.rotate(img, m, interpolation=NEAREST, fill=None),
        "Brightness": lambda: TF.adjust_brightness(img, 1.0 + m),
        "Color": lambda: TF.adjust_saturation(img, 1.0 + m),
        "Contrast": lambda: TF.adjust_contrast(img, 1.0 + m),
        "Sharpness": lambda: TF.adjust_sharpness(img, 1.0 + m),
        "Posterize": lambda: TF.posterize(img, int(m)),
        "Solarize": lambda: TF.solarize(img, m),
        "AutoContrast": lambda: TF.autocontrast(img),
        "Equalize": lambda: TF.equalize(img),
        "Invert": lambda: TF.invert(img),
    }
    return calls[name]()


MAGNITUDES = {  # eight per op, negative ones for the signed ops; RandAugment's bin ends included
    "ShearX": [-0.3, -0.17, -0.01, 0.0, 0.05, 0.1, 0.22, 0.3],
    "TranslateX": [-14.05, -9.0, -2.5, -0.9, 0.0, 1.2, 3.7, 14.05],
    "Rotate": [-30.0, -17.0, -5.0, -1.0, 2.0, 12.5, 21.0, 30.0],
    "Brightness": [-0.9, -0.6, -0.33, -0.03, 0.0, 0.27, 0.6, 0.9],
    "Posterize": [8, 7, 6, 5, 4, 3, 1, 0],
    "Solarize": [255.0, 246.5, 200.0, 170.0, 128.0, 99.5, 10.0, 0.0],
}
for _name, _like in (("ShearY", "ShearX"), ("TranslateY", "TranslateX"), ("Color", "Brightness"),
                     ("Contrast", "Brightness"), ("Sharpness", "Brightness")):
    MAGNITUDES[_name] = MAGNITUDES[_like]
for _name in ("Identity", "AutoContrast", "Equalize", "Invert"):
    MAGNITUDES[_name] = [0.0] * 8


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", A.OP_NAMES)
def test_every_op_equals_torchvisions_functional_op(name, channels):
    x = images(8, channels)
    mags = torch.tensor(MAGNITUDES[name], dtype=torch.float32)
    mixed = A.OPS[name](x, mags)  # each sample its own magnitude
    assert mixed.dtype == torch.uint8 and mixed.shape == x.shape
    for k in range(8):
        ref = reference(x[k], name, float(mags[k]))
        assert (mixed[k].int() - ref.int()).abs().max() <= 1, (name, k)
    for m in MAGNITUDES[name][::3]:  # one magnitude for the whole batch
        same = A.OPS[name](x, torch.full((8,), m, dtype=torch.float32))
        for k in range(8):
            assert (same[k].int() - reference(x[k], name, m).int()).abs().max() <= 1, (name, m, k)


def test_magnitude_bins_equal_torchvisions_augmentation_space():
    for num_bins, size, space in ((31, (11, 14), RandAugment()._augmentation_space(31, (11, 14))),
                                  (10, (32, 28), AutoAugment()._augmentation_space(10, (32, 28)))):
        bins, signed = A.magnitude_bins(num_bins, *size, CPU)
        assert bins.shape == (len(A.OPS), num_bins)
        for k, name in enumerate(A.OP_NAMES):
            values, is_signed = space.get(name, (torch.tensor(0.0), False))  # RandAugment has no Invert
            expected = values.float() if values.ndim else torch.zeros(num_bins)
            assert torch.equal(bins[k], expected), name
            assert bool(signed[k]) == is_signed, name
    assert A.OP_NAMES[:A.RANDAUGMENT_OPS] == list(RandAugment()._augmentation_space(31, (1, 1)))


def naive_randaugment(n: int, num_ops: int, magnitude: int, size: tuple[int, int], rng: random.Random):
    """torchvision's RandAugment.forward's draws, one sample at a time: per round ``(op, magnitude)``."""
    space = RandAugment()._augmentation_space(31, size)
    names = list(space)
    draws = []
    for _ in range(n):
        sample = []
        for _ in range(num_ops):
            name = names[rng.randrange(len(names))]
            values, signed = space[name]
            m = float(values[magnitude]) if values.ndim else 0.0
            sample.append((name, -m if signed and rng.randrange(2) else m))
        draws.append(tuple(sample))
    return draws


def naive_autoaugment(n: int, size: tuple[int, int], rng: random.Random):
    """torchvision's AutoAugment(CIFAR10).forward's draws, one sample at a time: per slot ``(op, magnitude)``,
    Identity where the op is not applied."""
    policy = AutoAugment(AutoAugmentPolicy.CIFAR10)
    space = policy._augmentation_space(10, size)
    draws = []
    for _ in range(n):
        sub = policy.policies[rng.randrange(len(policy.policies))]
        probs, signs = (rng.random(), rng.random()), (rng.randrange(2), rng.randrange(2))
        sample = []
        for i, (name, p, bin_id) in enumerate(sub):
            if probs[i] <= p:
                values, signed = space[name]
                m = float(values[bin_id]) if bin_id is not None else 0.0
                sample.append((name, -m if signed and signs[i] == 0 else m))
            else:
                sample.append(("Identity", 0.0))
        draws.append(tuple(sample))
    return draws


def as_draws(ops: torch.Tensor, mags: torch.Tensor):
    """``(rounds, N)`` indices and magnitudes as per-sample tuples of ``(op name, magnitude)``."""
    return [tuple((A.OP_NAMES[int(o)], float(m)) for o, m in zip(ops[:, k], mags[:, k])) for k in range(ops.shape[1])]


def assert_same_distribution(ours, theirs, keys):
    """Every value's frequency (of ``keys(draw)``) within 5 standard errors between the two samples."""
    a, b = Counter(map(keys, ours)), Counter(map(keys, theirs))
    assert set(a) == set(b)
    for value in a:
        pa, pb = a[value] / len(ours), b[value] / len(theirs)
        p = (a[value] + b[value]) / (len(ours) + len(theirs))
        se = math.sqrt(p * (1 - p) * (1 / len(ours) + 1 / len(theirs)))
        assert abs(pa - pb) < 5 * se + 1e-9, (value, pa, pb)


def test_randaugment_draws_follow_torchvisions_sampling():
    n, size = 20000, (32, 32)
    ops, mags = A.randaugment_params(n, 2, 10, *size, torch.Generator().manual_seed(0))
    assert ops.shape == mags.shape == (2, n)
    ours, theirs = as_draws(ops, mags), naive_randaugment(n, 2, 10, size, random.Random(0))
    for r in range(2):  # each round: the (op, signed magnitude) values and their frequencies
        assert_same_distribution(ours, theirs, lambda d: d[r])
    freq = torch.bincount(ops.flatten(), minlength=A.RANDAUGMENT_OPS).double() / (2 * n)
    assert len(freq) == A.RANDAUGMENT_OPS and (freq - 1 / 14).abs().max() < 0.01
    signed = torch.tensor([A.OP_NAMES[o] in A.SIGNED for o in range(14)])[ops]
    assert abs((mags[signed] < 0).double().mean() - 0.5) < 0.01 and not (mags[~signed] < 0).any()
    space = RandAugment()._augmentation_space(31, size)
    for name, (values, _) in space.items():  # magnitude 10's bin, up to the sign
        chosen = mags[ops == A.OP_NAMES.index(name)].abs()
        assert torch.equal(chosen.unique(), (values[10] if values.ndim else torch.tensor(0.0)).float().view(1))


def test_autoaugment_draws_follow_torchvisions_sampling():
    n, size = 20000, (32, 32)
    ops, mags = A.autoaugment_params(n, *size, torch.Generator().manual_seed(0))
    assert ops.shape == mags.shape == (2, n)
    ours, theirs = as_draws(ops, mags), naive_autoaugment(n, size, random.Random(0))
    assert_same_distribution(ours, theirs, lambda d: d)  # both slots together: the sub-policy's pairs
    invert = ops == A.OP_NAMES.index("Invert")  # Invert only in sub-policies 0 (p 0.1, slot 0) and 23 (slot 1)
    assert abs(invert[0].double().mean() - 0.1 / 25) < 0.002 and abs(invert[1].double().mean() - 0.1 / 25) < 0.002


@pytest.mark.parametrize("channels", [1, 3])
def test_policies_on_a_batch_equal_torchvisions_ops_with_the_drawn_parameters(channels):
    x = images(96, channels, 24, 28, seed=channels)
    for policy, params in ((lambda gen: A.randaugment(x, 2, 10, gen),
                            lambda gen: A.randaugment_params(96, 2, 10, 24, 28, gen)),
                           (lambda gen: A.randaugment(x, 3, 23, gen),
                            lambda gen: A.randaugment_params(96, 3, 23, 24, 28, gen)),
                           (lambda gen: A.autoaugment(x, gen), lambda gen: A.autoaugment_params(96, 24, 28, gen))):
        out = policy(torch.Generator().manual_seed(3))
        ops, mags = params(torch.Generator().manual_seed(3))  # the same draws
        assert len(ops.unique()) >= 10  # most op kinds in the batch
        for k in range(96):
            ref = x[k]
            for o, m in zip(ops[:, k], mags[:, k]):
                ref = reference(ref, A.OP_NAMES[int(o)], float(m))
            assert (out[k].int() - ref.int()).abs().max() <= 1, k


def digits_train():
    return D.build_datasets(DataConfig(dataset="digits", train_subset=100), AugmentConfig(randaugment_ops=0), 0)


def test_the_device_pipeline_takes_the_policies():
    train, _, info = digits_train()
    randaug, autoaug = AugmentConfig(), AugmentConfig(randaugment_ops=0, autoaugment=True)
    assert randaug.randaugment_ops == 2 and randaug.randaugment_magnitude == 10  # the seeds' recipe
    for aug in (randaug, autoaug):
        assert G.choose_pipeline("gpu", CPU, train, aug, info, 0)[0].shape == (100, 32, 32, 1)


def test_loader_applies_randaugment_after_crop_and_flip_reproducibly():
    train, _, info = digits_train()
    arrays = G.resident_arrays(train)
    aug = AugmentConfig(random_erasing=0.0)  # crop 4, flip, RandAugment(2, 10)
    loader = G.DeviceLoader(arrays, train, info, aug, 32, True, CPU)
    draws = []
    for seed in (9, 9, 10):
        loader.generator.manual_seed(seed)
        draws.append(next(iter(loader))[0])
    x = draws[0]
    assert x.shape == (32, 1, 32, 32) and x.dtype == torch.float32
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    levels = (x * info.std[0] + info.mean[0]) * 255  # normalised uint8 values
    assert (levels - levels.round()).abs().max() < 1e-3 and levels.min() > -1e-3 and levels.max() < 255 + 1e-3
    gen = torch.Generator().manual_seed(9)  # the same draws by hand, in the CPU pipeline's order
    idx = torch.randperm(100, generator=gen)[:32]
    u8 = G.pad_crop(loader.images[idx], *G.crop_params(32, 4, gen, CPU), 4)
    u8 = G.hflip(u8, torch.rand(32, generator=gen) < 0.5)
    u8 = A.randaugment(u8, 2, 10, gen)
    assert torch.equal(x, G.normalize(u8, info.mean, info.std))
    plain = G.DeviceLoader(arrays, train, info, dataclasses.replace(aug, randaugment_ops=0), 32, True, CPU)
    plain.generator.manual_seed(9)  # the same crops and flips without RandAugment: other images
    assert not torch.equal(x, next(iter(plain))[0])


@pytest.mark.parametrize("channels", [1, 3])
def test_a_masked_round_equals_a_gathered_one(channels):
    """CUDA's sync-free rounds (every op on the whole batch, kept where chosen) give the CPU's result."""
    x = images(64, channels, 24, 28, seed=5)
    gen = torch.Generator().manual_seed(4)
    for ops, mags in (A.randaugment_params(64, 2, 10, 24, 28, gen), A.autoaugment_params(64, 24, 28, gen)):
        for round_ops, round_mags in zip(ops, mags):
            torch.testing.assert_close(A.apply_ops(x, round_ops, round_mags, masked=True),
                                       A.apply_ops(x, round_ops, round_mags, masked=False), atol=0, rtol=0)
