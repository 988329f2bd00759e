"""What the benchmark runs: a backbone whose drop ratio is set directly, fixed input batches and the steps
timed on them."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models import build_model
from ..reduction import Schedule, attach, expected_patch_tokens, prepare_step, sites
from ..reduction import reducer as build_reducer
from .flops import attached_macs

__all__ = ["DropProbe", "FixedDrop", "InferStep", "TrainStep", "config_model", "input_batch", "input_shape"]


class FixedDrop(Schedule):
    """The drop ratio ``drop`` at every epoch; the benchmark moves ``drop`` between variants.

    Unlike ``Constant(1 − d)`` it returns ``d`` exactly, so the keep count is ``keep_count(N, d)`` —
    the count a curriculum produces at that d — without a float round trip.
    """

    def __init__(self, drop: float = 0.0) -> None:
        self.drop = float(drop)

    def __call__(self, epoch: float) -> float:
        return self.drop


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """``(in_chans, H, W)`` a ViT expects: the first convolution's input channels and ``patch_embed.img_size``."""
    pe = model.patch_embed
    size = getattr(pe, "img_size", None)
    if size is None:
        raise TypeError(f"{type(model).__name__}: patch_embed has no img_size")
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    conv = next((m for m in pe.modules() if isinstance(m, nn.Conv2d)), None)
    return (conv.in_channels if conv is not None else 3), h, w


def input_batch(model: nn.Module, batch_size: int, device: torch.device, seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch ``(images, targets)`` for ``model`` (shape from :func:`input_shape`)."""
    gen = torch.Generator().manual_seed(seed)
    c, h, w = input_shape(model)
    images = torch.randn(batch_size, c, h, w, generator=gen)
    targets = torch.randint(0, max(1, int(getattr(model, "num_classes", 1000))), (batch_size,), generator=gen)
    return images.to(device), targets.to(device)


class DropProbe:
    """A backbone with reduction sites at ``blocks`` whose drop ratio is set directly (one shared
    :class:`FixedDrop`). The method is ``reducer`` (a registered name, default Top-K) with ``reducer_args``
    (default ``score``); every site of the probe uses it at its default position.

    ``when="always"``: the reducer runs in training and in inference, so both can be timed reduced.
    ``always_reduce`` runs saliency and top-k even at d = 0 (nothing dropped): the saliency overhead.
    """

    def __init__(self, model: nn.Module, blocks: Sequence[int], score: str = "cls_attention",
                 relative_to: str = "entering", always_reduce: bool = False, reducer: str = "topk",
                 reducer_args: dict | None = None) -> None:
        self.model = model
        self.schedule = FixedDrop(0.0)
        args = dict(reducer_args or {})
        if reducer == "topk":
            args.setdefault("score", score)
        attach(model, build_reducer(reducer, **args), blocks=list(blocks), schedule=self.schedule, when="always",
               relative_to=relative_to, always_reduce=always_reduce)
        self.blocks = [s.block for s in sites(model)]
        self.needs_gradient = any("gradient" in s.reducer.needs for s in sites(model))

    def set(self, drop: float) -> None:
        """Make every site drop ``drop`` of the patch tokens entering it."""
        self.schedule.drop = float(drop)

    def set_always_reduce(self, on: bool) -> None:
        """Compute saliency and top-k even when nothing is dropped (``on``), or skip them at d = 0."""
        for s in sites(self.model):
            s.always_reduce = bool(on)

    @property
    def num_patches(self) -> int:
        return int(self.model.patch_embed.num_patches)

    def kept(self) -> list[int]:
        """Patch tokens after each site at the current drop ratio (plain ints)."""
        return expected_patch_tokens(self.model, training=True)

    def analytic_macs(self, drop: float | None = None) -> int:
        """Closed-form forward MACs per image at ``drop`` (default: the current drop ratio)."""
        if drop is not None:
            self.set(drop)
        _, h, w = input_shape(self.model)
        return attached_macs(self.model, (h, w))


class TrainStep:
    """One training step on a fixed batch: zero_grad, forward, cross-entropy, backward, AdamW step.

    With a gradient-saliency site, :func:`tokendrop.prepare_step` runs first (its extra forward and
    backward are part of the step, as in training)."""

    def __init__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, lr: float = 1e-5,
                 gradient_saliency: bool = False) -> None:
        self.model, self.images, self.targets = model, images, targets
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        self.gradient_saliency = gradient_saliency

    def __call__(self) -> None:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.gradient_saliency:
            prepare_step(self.model, self.images, self.targets, F.cross_entropy)
        loss = F.cross_entropy(self.model(self.images), self.targets)
        loss.backward()
        self.optimizer.step()


class InferStep:
    """One inference forward on a fixed batch (eval mode, ``torch.inference_mode``)."""

    def __init__(self, model: nn.Module, images: torch.Tensor) -> None:
        self.model, self.images = model, images

    def __call__(self) -> None:
        self.model.eval()
        with torch.inference_mode():
            self.model(self.images)


def config_model(cfg: Any) -> tuple[nn.Module, dict]:
    """The config's backbone (no sites) and the ``build_model`` keyword arguments used."""
    from ..train.data import dataset_info

    info = dataset_info(cfg.data.dataset, cfg.model.name, cfg.data.synthetic)
    num_classes = info.num_classes
    if num_classes == 0:  # imagefolder: read the class folders
        from ..train.data import build_datasets

        data_cfg = dataclasses.replace(cfg.data, download=False)
        num_classes = build_datasets(data_cfg, cfg.augment, cfg.seed)[2].num_classes
    kwargs = {"num_classes": num_classes, "in_chans": info.in_chans, "img_size": cfg.data.img_size or info.img_size,
              "drop_rate": cfg.model.drop_rate, "drop_path_rate": cfg.model.drop_path_rate}
    return build_model(cfg.model.name, **kwargs), kwargs
