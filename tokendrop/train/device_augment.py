"""RandAugment and AutoAugment (CIFAR-10 policy) per sample on uint8 ``(N, C, H, W)`` batches, C = 1 or 3.

The ops are torchvision's tensor ops as its policies call them (``autoaugment._apply_op``, nearest
interpolation, fill 0), with one magnitude per sample: the geometric ops build each sample's inverse affine
matrix as ``_get_inverse_affine_matrix`` does and sample the batch with one ``grid_sample``; the colour ops
follow ``_functional_tensor`` (blend, grayscale, 3×3 sharpness kernel, per-channel autocontrast and
equalize). The policies draw, per sample, torchvision's ops, bins and signs from a generator on the
images' device; a round applies each op kind to the samples that chose it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torchvision.transforms import AutoAugment, AutoAugmentPolicy

BOUND = 255
"""The uint8 images' maximum value."""


# ------------------------------------------------------------------------------ geometric ops
def _inverse_affine(angle: Tensor, tx: Tensor, ty: Tensor, shear_x: Tensor, shear_y: Tensor,
                    center: tuple[float, float]) -> Tensor:
    """Per-sample ``_get_inverse_affine_matrix`` (scale 1; degrees; center relative to the image's middle)
    from float64 ``(N,)`` parameters; ``(N, 2, 3)`` float32, as torchvision passes it on."""
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    cx, cy = center
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -torch.cos(rot - sy) * torch.tan(sx) / torch.cos(sy) - torch.sin(rot)
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = -torch.sin(rot - sy) * torch.tan(sx) / torch.cos(sy) + torch.cos(rot)
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = m0 * (-cx - tx) + m1 * (-cy - ty) + cx
    m5 = m3 * (-cx - tx) + m4 * (-cy - ty) + cy
    return torch.stack([m0, m1, m2, m3, m4, m5], 1).view(-1, 2, 3).float()


def _affine(images: Tensor, theta: Tensor) -> Tensor:
    """Sample each image at its inverse matrix ``theta`` (``_gen_affine_grid`` + ``_apply_grid_transform``:
    pixel-centred grid, nearest, zeros outside, ``align_corners=False``)."""
    n, _, h, w = images.shape
    dev = images.device
    base = torch.empty(1, h, w, 3, device=dev)
    base[..., 0] = torch.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, w, device=dev)
    base[..., 1] = torch.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, h, device=dev)[:, None]
    base[..., 2] = 1
    rescaled = theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h], device=dev)
    grid = base.view(1, h * w, 3).expand(n, -1, -1).bmm(rescaled).view(n, h, w, 2)
    out = torch.nn.functional.grid_sample(images.float(), grid, mode="nearest", padding_mode="zeros",
                                          align_corners=False)
    return out.round().to(torch.uint8)


def _shear(images: Tensor, magnitude: Tensor, axis: int) -> Tensor:
    h, w = images.shape[-2:]
    zero = torch.zeros_like(magnitude, dtype=torch.float64)
    degrees = torch.rad2deg(torch.atan(magnitude.double()))
    shear = (degrees, zero) if axis == 0 else (zero, degrees)
    return _affine(images, _inverse_affine(zero, zero, zero, *shear, center=(-0.5 * w, -0.5 * h)))


def shear_x(images: Tensor, magnitude: Tensor) -> Tensor:
    """``ShearX``: shear parallel to x by ``atan(m)`` degrees about the top-left corner."""
    return _shear(images, magnitude, 0)


def shear_y(images: Tensor, magnitude: Tensor) -> Tensor:
    """``ShearY``: shear parallel to y by ``atan(m)`` degrees about the top-left corner."""
    return _shear(images, magnitude, 1)


def _translate(images: Tensor, magnitude: Tensor, axis: int) -> Tensor:
    zero = torch.zeros_like(magnitude, dtype=torch.float64)
    pixels = torch.trunc(magnitude.double())  # int(m)
    shift = (pixels, zero) if axis == 0 else (zero, pixels)
    return _affine(images, _inverse_affine(zero, *shift, zero, zero, center=(0.0, 0.0)))


def translate_x(images: Tensor, magnitude: Tensor) -> Tensor:
    """``TranslateX``: shift right by ``int(m)`` pixels."""
    return _translate(images, magnitude, 0)


def translate_y(images: Tensor, magnitude: Tensor) -> Tensor:
    """``TranslateY``: shift down by ``int(m)`` pixels."""
    return _translate(images, magnitude, 1)


def rotate(images: Tensor, magnitude: Tensor) -> Tensor:
    """``Rotate``: ``m`` degrees counter-clockwise about the centre, same size (``F.rotate``)."""
    zero = torch.zeros_like(magnitude, dtype=torch.float64)
    return _affine(images, _inverse_affine(-magnitude.double(), zero, zero, zero, zero, center=(0.0, 0.0)))


# ------------------------------------------------------------------------------ colour ops
def _blend(images: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    """``ratio·images + (1 − ratio)·other`` per sample, clamped and truncated to uint8 (``_blend``)."""
    r = ratio.double().view(-1, 1, 1, 1)
    return (r.float() * images + (1.0 - r).float() * other).clamp(0, BOUND).to(torch.uint8)


def _grayscale(images: Tensor) -> Tensor:
    """``rgb_to_grayscale``: ``(N, 1, H, W)`` uint8 luma (truncated); one-channel images as they are."""
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).to(torch.uint8)[:, None]


def brightness(images: Tensor, magnitude: Tensor) -> Tensor:
    """``Brightness``: ``adjust_brightness(1 + m)``, a blend with black."""
    return _blend(images, torch.zeros_like(images), 1.0 + magnitude.double())


def color(images: Tensor, magnitude: Tensor) -> Tensor:
    """``Color``: ``adjust_saturation(1 + m)``, a blend with the grayscale; one-channel images unchanged."""
    if images.shape[1] == 1:
        return images
    return _blend(images, _grayscale(images), 1.0 + magnitude.double())


def contrast(images: Tensor, magnitude: Tensor) -> Tensor:
    """``Contrast``: ``adjust_contrast(1 + m)``, a blend with the mean of the grayscale."""
    mean = _grayscale(images).float().mean((-3, -2, -1), keepdim=True)
    return _blend(images, mean, 1.0 + magnitude.double())


def sharpness(images: Tensor, magnitude: Tensor) -> Tensor:
    """``Sharpness``: ``adjust_sharpness(1 + m)``, a blend with the 3×3 smoothed image (centre weight 5,
    rounded), whose one-pixel border is the original's."""
    c, h, w = images.shape[1:]
    if h <= 2 or w <= 2:
        return images
    kernel = torch.ones(3, 3, device=images.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / kernel.sum()).expand(c, 1, 3, 3)
    smooth = images.clone()
    smooth[..., 1:-1, 1:-1] = torch.nn.functional.conv2d(images.float(), kernel, groups=c).round().to(torch.uint8)
    return _blend(images, smooth, 1.0 + magnitude.double())


def posterize(images: Tensor, magnitude: Tensor) -> Tensor:
    """``Posterize``: keep the top ``int(m)`` bits of every value."""
    mask = (BOUND << (8 - magnitude.long())) & BOUND
    return images & mask.to(torch.uint8).view(-1, 1, 1, 1)


def solarize(images: Tensor, magnitude: Tensor) -> Tensor:
    """``Solarize``: invert the values ``>= m``."""
    return torch.where(images >= magnitude.float().view(-1, 1, 1, 1), BOUND - images, images)


def autocontrast(images: Tensor, magnitude: Tensor) -> Tensor:
    """``AutoContrast`` (``m`` unused): stretch each channel's min..max to 0..255; flat channels unchanged."""
    low = images.amin((-2, -1), keepdim=True).float()
    high = images.amax((-2, -1), keepdim=True).float()
    flat = high == low
    scale = torch.where(flat, 1.0, BOUND / (high - low))
    return ((images - torch.where(flat, 0.0, low)) * scale).clamp(0, BOUND).to(torch.uint8)


def equalize(images: Tensor, magnitude: Tensor) -> Tensor:
    """``Equalize`` (``m`` unused): each channel through its histogram's LUT (``_scale_channel``): step =
    (pixels − the top value's count) // 255; LUT[v] = (count below v + step // 2) // step; step 0 = unchanged."""
    n, c, h, w = images.shape
    flat = images.reshape(n * c, h * w).long()
    hist = torch.zeros(n * c, BOUND + 1, dtype=torch.long, device=images.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    top = hist.gather(1, flat.amax(1, keepdim=True))
    step = torch.div(h * w - top, BOUND, rounding_mode="floor")
    below = torch.nn.functional.pad(hist.cumsum(1), (1, 0))[:, :-1]
    lut = torch.div(below + step // 2, step.clamp(min=1), rounding_mode="floor").clamp(0, BOUND)
    out = torch.where(step > 0, lut.gather(1, flat), flat)
    return out.to(torch.uint8).view(n, c, h, w)


def invert(images: Tensor, magnitude: Tensor) -> Tensor:
    """``Invert`` (``m`` unused): ``255 − x``."""
    return BOUND - images


def identity(images: Tensor, magnitude: Tensor) -> Tensor:
    """``Identity``: the images as they are."""
    return images


Op = Callable[[Tensor, Tensor], Tensor]
OPS: dict[str, Op] = {
    "Identity": identity, "ShearX": shear_x, "ShearY": shear_y, "TranslateX": translate_x,
    "TranslateY": translate_y, "Rotate": rotate, "Brightness": brightness, "Color": color, "Contrast": contrast,
    "Sharpness": sharpness, "Posterize": posterize, "Solarize": solarize, "AutoContrast": autocontrast,
    "Equalize": equalize, "Invert": invert,
}
"""Every op by torchvision's name; the first 14, in torchvision's order, are RandAugment's."""
OP_NAMES = list(OPS)
RANDAUGMENT_OPS = 14
SIGNED = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness")
"""The ops whose magnitude the policies negate at random."""


# ------------------------------------------------------------------------------ the policies
def magnitude_bins(num_bins: int, height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """torchvision's ``_augmentation_space``: ``(len(OPS), num_bins)`` bin values (0 for the ops without a
    magnitude) and which ops are signed."""
    def linear(hi: float) -> Tensor:
        return torch.linspace(0.0, hi, num_bins, device=device)

    ramps = {"ShearX": linear(0.3), "ShearY": linear(0.3), "TranslateX": linear(150.0 / 331.0 * width),
             "TranslateY": linear(150.0 / 331.0 * height), "Rotate": linear(30.0), "Brightness": linear(0.9),
             "Color": linear(0.9), "Contrast": linear(0.9), "Sharpness": linear(0.9),
             "Posterize": 8 - (torch.arange(num_bins, device=device) / ((num_bins - 1) / 4)).round(),
             "Solarize": torch.linspace(255.0, 0.0, num_bins, device=device)}
    zero = torch.zeros(num_bins, device=device)
    bins = torch.stack([ramps.get(name, zero) for name in OP_NAMES])
    return bins, torch.tensor([name in SIGNED for name in OP_NAMES], device=device)


def randaugment_params(n: int, num_ops: int, magnitude: int, height: int, width: int, gen: torch.Generator,
                       num_bins: int = 31) -> tuple[Tensor, Tensor]:
    """``RandAugment(num_ops, magnitude, num_bins)`` for ``n`` images: per round and sample an op uniform
    over the 14, its bin value at ``magnitude``, negated with probability 1/2 for a signed op. Returns
    ``(num_ops, n)`` op indices into :data:`OPS` and magnitudes."""
    bins, signed = magnitude_bins(num_bins, height, width, gen.device)
    ops = torch.randint(0, RANDAUGMENT_OPS, (num_ops, n), generator=gen, device=gen.device)
    negate = signed[ops] & (torch.randint(0, 2, (num_ops, n), generator=gen, device=gen.device) == 1)
    mags = bins[ops, magnitude]
    return ops, torch.where(negate, -mags, mags)


CIFAR10_POLICY = AutoAugment(AutoAugmentPolicy.CIFAR10).policies
"""torchvision's 25 CIFAR-10 sub-policies: two ``(op, probability, bin or None)`` each."""


def autoaugment_params(n: int, height: int, width: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``AutoAugment(CIFAR10)`` for ``n`` images: per sample a sub-policy uniform over the 25, each of its
    two ops applied with its probability (else Identity) at its bin of 10, signed ops negated when their
    sign draw is 0. Returns ``(2, n)`` op indices into :data:`OPS` and magnitudes."""
    dev = gen.device
    bins, signed = magnitude_bins(10, height, width, dev)
    table = [[(OP_NAMES.index(name), p, 0 if b is None else b) for name, p, b in sub] for sub in CIFAR10_POLICY]
    op_table = torch.tensor([[t[0] for t in sub] for sub in table], device=dev)
    p_table = torch.tensor([[t[1] for t in sub] for sub in table], device=dev)
    bin_table = torch.tensor([[t[2] for t in sub] for sub in table], device=dev)
    policy = torch.randint(0, len(table), (n,), generator=gen, device=dev)
    probs = torch.rand(n, 2, generator=gen, device=dev)
    signs = torch.randint(0, 2, (n, 2), generator=gen, device=dev)
    ops, chosen = op_table[policy], bin_table[policy]
    mags = bins[ops, chosen]
    mags = torch.where(signed[ops] & (signs == 0), -mags, mags)
    applied = probs <= p_table[policy]
    return torch.where(applied, ops, 0).T, torch.where(applied, mags, 0.0).T


def apply_ops(images: Tensor, ops: Tensor, magnitudes: Tensor, masked: bool | None = None) -> Tensor:
    """One round: sample ``k`` gets op ``OP_NAMES[ops[k]]`` at ``magnitudes[k]``. Unmasked (the CPU's
    default), each op kind runs on the samples that chose it; ``masked`` (elsewhere), each runs on the whole
    batch (magnitude 0 where not chosen) and is kept where chosen: more arithmetic, but no host
    synchronisation, so a CUDA pipeline stays queued ahead of the GPU."""
    masked = images.device.type != "cpu" if masked is None else masked
    out = images if masked else images.clone()
    for index, op in enumerate(OPS.values()):
        chosen = ops == index
        if masked:
            out = torch.where(chosen.view(-1, 1, 1, 1), op(images, torch.where(chosen, magnitudes, 0.0)), out)
            continue
        rows = chosen.nonzero()[:, 0]
        if len(rows):
            out[rows] = op(images[rows], magnitudes[rows])
    return out


def apply_rounds(images: Tensor, ops: Tensor, magnitudes: Tensor) -> Tensor:
    """The rounds of ``(rounds, N)`` op indices and magnitudes, in order."""
    for round_ops, round_mags in zip(ops, magnitudes):
        images = apply_ops(images, round_ops, round_mags)
    return images


def randaugment(images: Tensor, num_ops: int, magnitude: int, gen: torch.Generator) -> Tensor:
    """``T.RandAugment(num_ops, magnitude)`` on every sample of a uint8 batch, drawn from ``gen``."""
    n, _, h, w = images.shape
    return apply_rounds(images, *randaugment_params(n, num_ops, magnitude, h, w, gen))


def autoaugment(images: Tensor, gen: torch.Generator) -> Tensor:
    """``T.AutoAugment(CIFAR10)`` on every sample of a uint8 batch, drawn from ``gen``."""
    n, _, h, w = images.shape
    return apply_rounds(images, *autoaugment_params(n, h, w, gen))
