"""What the benchmark runs: a backbone whose drop ratio is set directly, fixed input batches and the steps
timed on them — the trainer's own training step (:func:`build_train_step`) and an inference forward."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..models import build_model
from ..reduction import Schedule, attach, expected_patch_tokens, sites
from ..reduction import reducer as build_reducer
from ..train.ema import build_ema
from ..train.optim import adamw_kernel, build_adamw, param_groups
from ..train.graphs import WARMUP_STEPS
from ..train.step import TrainStep
from .flops import attached_macs

__all__ = ["AMP_MODES", "DropProbe", "EMA_RULES", "FixedBatchStep", "FixedDrop", "InferStep", "StepSpec",
           "build_train_step", "config_model", "config_probe", "input_batch", "input_shape"]


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


AMP_MODES = ("auto", "bf16", "off")
EMA_RULES = ("off", "torch_ema", "none")
"""``--ema``: no EMA, or the rule of ``ema.warmup`` (see :mod:`tokendrop.train.ema`)."""


@dataclass
class StepSpec:
    """How :func:`build_train_step` builds the trainer's step: the ``run``/``optim``/``ema`` keys it reads.

    The defaults are ``tokendrop bench``'s (no clipping, no EMA); :meth:`from_config` takes a config's.
    The learning rate does not change a step's cost; the bench's small default keeps the weights near
    their initial values over many timed steps."""

    amp: str = "auto"  # run.amp: auto = bf16 autocast on CUDA, full precision elsewhere
    clip_grad: float = 0.0  # optim.clip_grad; 0 = measure the norm without clipping (as the trainer)
    ema: str = "off"  # off, or ema.warmup's rule: torch_ema, none
    ema_decay: float = 0.9999
    compile: bool = False  # run.compile: torch.compile the network, on CUDA only (as the trainer)
    cuda_graphs: bool = True  # run.cuda_graphs: capture and replay the step, on CUDA only (as the trainer)
    lr: float = 1e-5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    label_smoothing: float = 0.0
    reducer_lr_scale: float = 1.0
    backbone_lr_scale: float = 1.0
    backbone_freeze_epochs: float = 0.0
    trainable: str = "all"

    @classmethod
    def from_config(cls, cfg: Any) -> "StepSpec":
        """The step a config trains with (its cross-entropy without Mixup, and no distillation teacher)."""
        o = cfg.optim
        return cls(cfg.run.amp, o.clip_grad, cfg.ema.warmup if cfg.ema.enabled else "off", cfg.ema.decay,
                   cfg.run.compile, cfg.run.cuda_graphs, o.lr, o.weight_decay, tuple(o.betas), o.label_smoothing, o.reducer_lr_scale,
                   o.backbone_lr_scale, o.backbone_freeze_epochs, o.trainable)

    def describe(self, device: torch.device) -> str:
        """One line: the settings that change what the step runs on ``device``."""
        amp = "bf16" if self.amp == "bf16" or (self.amp == "auto" and device.type == "cuda") else "off"
        kernel = "fused" if adamw_kernel(device)["fused"] else "foreach"
        return (f"tokendrop.train.step.TrainStep: AdamW ({kernel}), amp {amp}, clip-grad {self.clip_grad:g}, "
                f"EMA {self.ema if self.ema == 'off' else f'{self.ema} (decay {self.ema_decay:g})'}, "
                f"compile {'on' if self.compile and device.type == 'cuda' else 'off'}, "
                f"CUDA graphs {'on' if self.cuda_graphs and device.type == 'cuda' else 'off'}")


def build_train_step(model: nn.Module, spec: StepSpec, device: torch.device) -> TrainStep:
    """The trainer's :class:`~tokendrop.train.step.TrainStep` for ``model`` (already on ``device``), built as
    :class:`~tokendrop.train.trainer.Trainer` builds it: EMA by ``build_ema``, AdamW by ``build_adamw`` over
    ``param_groups``, cross-entropy, and the compiled network on CUDA when ``spec.compile``."""
    ema = build_ema(model, spec.ema_decay, spec.ema).to(device) if spec.ema != "off" else None
    groups = param_groups(model, spec.weight_decay, spec.reducer_lr_scale, spec.backbone_lr_scale,
                          spec.backbone_freeze_epochs, spec.trainable)
    optimizer = build_adamw(groups, spec.lr, tuple(spec.betas), device)
    net = torch.compile(model) if spec.compile and device.type == "cuda" else model
    return TrainStep(model, net, optimizer, nn.CrossEntropyLoss(label_smoothing=spec.label_smoothing), device,
                     amp=spec.amp, clip_grad=spec.clip_grad, ema=ema, cuda_graphs=spec.cuda_graphs)


class FixedBatchStep:
    """Call to run ``step`` (a :class:`~tokendrop.train.step.TrainStep`) once on a fixed batch, in train mode."""

    def __init__(self, step: TrainStep, images: torch.Tensor, targets: torch.Tensor) -> None:
        self.step, self.images, self.targets = step, images, targets

    def __call__(self) -> None:
        """One step; with CUDA graphs, the first call at a new keep count also runs that count's warm-up
        steps and capture, so that every timed call is a replay."""
        self.step.net.train()
        graphs = self.step.graphs
        for _ in range(WARMUP_STEPS + 2):
            replays = graphs.replays if graphs is not None else 0
            self.step(self.images, self.targets)
            if graphs is None or graphs.failed or graphs.replays > replays or len(graphs.graphs) >= graphs.max_graphs:
                return


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


def config_probe(cfg: Any) -> tuple[DropProbe, dict]:
    """The config's backbone with a :class:`DropProbe` at its ``token_drop`` sites (block 0 when token drop
    is off), and the ``build_model`` keyword arguments used."""
    td = cfg.token_drop
    model, kwargs = config_model(cfg)
    probe = DropProbe(model, list(td.blocks) if td.enabled else [0], score=td.score, relative_to=td.relative_to,
                      reducer=td.reducer, reducer_args=td.reducer_args)
    return probe, kwargs
