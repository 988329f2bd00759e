"""Optimizer parameter groups for training with token reducers: the reducers' own parameters, the parts
that fine-tuning re-learns (head, embeddings) and the backbone, each with its LR scale; the backbone can
be frozen for the first epochs, and training can be limited to the reducers (TNT trains only its α heads).

Groups follow "Which Tokens to Use?" (Haurum et al., 2023, its optimiser set-up): new modules, the head,
``pos_embed`` and ``patch_embed`` at LR × 1 and never frozen; the backbone at LR × ``backbone_lr_scale``
with LR 0 for ``backbone_freeze_epochs`` epochs. Weight decay follows timm: none on 1-D parameters,
biases, the CLS/distillation tokens and the position embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

REDUCER_MARK = ".token_site."
"""Reducer parameters live under ``blocks.{i}.token_site.reducer.*``."""

_NO_DECAY_NAMES = ("cls_token", "dist_token", "reg_token", "pos_embed")
_RELEARNED = ("head.", "head_dist.", "pos_embed", "patch_embed.")


def parameter_role(name: str) -> str:
    """``reducer`` (a reduction site's own parameter), ``new`` (head and embeddings, re-learned when
    fine-tuning) or ``backbone`` (everything else)."""
    if REDUCER_MARK in name:
        return "reducer"
    if name.startswith(_RELEARNED):
        return "new"
    return "backbone"


def no_weight_decay(name: str, ndim: int) -> bool:
    """timm's rule: no decay on 1-D parameters (norms, biases) and on the tokens and position embedding."""
    return ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in _NO_DECAY_NAMES


@dataclass(frozen=True)
class GroupSpec:
    """LR scale and freeze of one role."""

    lr_scale: float
    freeze_epochs: float = 0.0


def param_groups(model: nn.Module, weight_decay: float, reducer_lr_scale: float = 1.0, backbone_lr_scale: float = 1.0,
                 backbone_freeze_epochs: float = 0.0, trainable: str = "all") -> list[dict]:
    """AdamW parameter groups by role (see :func:`parameter_role`) and weight decay. Each group carries
    ``lr_scale``, ``freeze_epochs`` and ``role`` for the LR schedule (:func:`group_lr_factor`).

    ``trainable="reducer"`` sets ``requires_grad=False`` on everything but the reducers' parameters."""
    if trainable not in ("all", "reducer"):
        raise ValueError(f"optim.trainable: {trainable!r} is not one of all, reducer")
    specs = {"reducer": GroupSpec(reducer_lr_scale), "new": GroupSpec(1.0),
             "backbone": GroupSpec(backbone_lr_scale, backbone_freeze_epochs)}
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        role = parameter_role(name)
        if trainable == "reducer" and role != "reducer":
            p.requires_grad_(False)
        if not p.requires_grad:
            continue
        groups.setdefault((role, no_weight_decay(name, p.ndim)), []).append(p)
    if not groups:
        raise ValueError("optim.trainable: no parameter is left to train (the model has no learned reducer)")
    out = []
    for (role, nd), params in sorted(groups.items()):
        spec = specs[role]
        out.append({"params": params, "weight_decay": 0.0 if nd else weight_decay, "role": role,
                    "lr_scale": spec.lr_scale, "freeze_epochs": spec.freeze_epochs})
    return out


def group_lr_factor(group: dict, schedule_factor: float, epoch: float) -> float:
    """The factor on the base LR for ``group`` at ``epoch``: the warmup+cosine ``schedule_factor`` times
    the group's ``lr_scale``, or 0 while the group is frozen."""
    if epoch < group.get("freeze_epochs", 0.0):
        return 0.0
    return schedule_factor * group.get("lr_scale", 1.0)


FUSED_ADAMW_DEVICES = ("cuda", "cpu")
"""Device types that get AdamW's fused kernel. On this project's CPU it takes a quarter of the per-tensor
loop's time (and the foreach kernel more than the loop), so the CPU gets it too."""


def adamw_kernel(device: torch.device) -> dict[str, bool]:
    """AdamW's implementation for ``device``: the fused kernel on CUDA and the CPU, the multi-tensor (foreach)
    one elsewhere."""
    fused = device.type in FUSED_ADAMW_DEVICES
    return {"fused": fused, "foreach": not fused}


def build_adamw(groups: list[dict], lr: float, betas: tuple[float, float], device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``groups`` (see :func:`param_groups`) with :func:`adamw_kernel`'s implementation."""
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **adamw_kernel(device))


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, device: torch.device) -> None:
    """Load an optimizer state dict saved on any device, keeping the implementation chosen for ``device``
    (a state dict carries its own ``fused``/``foreach`` flags, which would otherwise replace ours). A run
    that trained with CUDA graphs saved its LRs as tensors and its groups as capturable; they load as plain
    floats, not capturable (the graphs set both again)."""
    kernel = {**adamw_kernel(device), "capturable": False}
    state = {**state, "param_groups": [{**g, **kernel, "lr": float(g["lr"])} for g in state["param_groups"]]}
    optimizer.load_state_dict(state)
