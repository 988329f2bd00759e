"""Public entry points: attach reduction sites to a ViT, move their schedules, prepare gradient saliency."""

from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch
from torch import nn

from .base import Reducer
from .schedules import Constant, Schedule
from .site import Position, ReducingBlock, Registry, Site, When, patched_class
from .state import TokenState

_REGISTRY_ATTR = "_tokendrop_registry"
_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _registry(model: nn.Module, create: bool = False) -> Registry | None:
    model = _unwrap(model)
    reg = model.__dict__.get(_REGISTRY_ATTR)
    if reg is None and create:
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        if grid is None:
            raise TypeError(f"{type(model).__name__}: expected a ViT with patch_embed.grid_size (ours or timm's VisionTransformer)")
        reg = Registry(int(getattr(model, "num_prefix_tokens", 1)), tuple(int(g) for g in grid))
        model.__dict__[_REGISTRY_ATTR] = reg
    return reg


def attach(model: nn.Module, reducer: Reducer, blocks: Iterable[int] = (0,), schedule: Schedule | None = None,
           when: When = "train", position: Position = "inside", relative_to: str = "entering",
           always_reduce: bool = False) -> nn.Module:
    """Add a reduction site with ``reducer`` and ``schedule`` to each block index in ``blocks`` (0-based).

    Works on our backbones and on timm ``VisionTransformer`` models (DeiT, distilled DeiT, register
    tokens, LayerScale, qk-norm); blocks are patched in place, weights untouched. Each block gets its
    own copy of ``reducer`` when several blocks are given. ``schedule`` defaults to keeping every token.
    Returns ``model``. Attaching twice to one block is an error; :func:`detach` undoes everything.
    """
    if when not in ("train", "eval", "always"):
        raise ValueError(f"when: {when!r} is not one of train, eval, always")
    if position not in ("inside", "before"):
        raise ValueError(f"position: {position!r} is not one of inside, before")
    if relative_to not in ("entering", "original"):
        raise ValueError(f"relative_to: {relative_to!r} is not one of entering, original")
    if not isinstance(reducer, Reducer):
        raise TypeError(f"reducer: expected a tokendrop Reducer, got {type(reducer).__name__}")
    if position == "before" and reducer.needs_cls_attention:
        raise ValueError("position: 'before' has no attention to score with; use position='inside' for this reducer")
    schedule = schedule if schedule is not None else Constant(1.0)
    base = _unwrap(model)
    model_blocks = getattr(base, "blocks", None)
    if not isinstance(model_blocks, nn.Sequential | nn.ModuleList):
        raise TypeError(f"{type(base).__name__}: expected a ViT with a `blocks` sequence (ours or timm's VisionTransformer)")
    if reducer.needs_cls_attention and getattr(base, "cls_token", None) is None:
        raise ValueError(f"reducer: {type(reducer).__name__} scores by CLS attention but {type(base).__name__} has no class token")
    blocks = list(blocks)
    if not blocks:
        raise ValueError("blocks: give at least one block index")
    depth = len(model_blocks)
    for b in blocks:
        if not isinstance(b, int) or not 0 <= b < depth:
            raise ValueError(f"blocks: index {b!r} is outside the allowed range [0, {depth - 1}]")
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"blocks: {blocks} names a block twice")
    reg = _registry(base, create=True)
    for b in blocks:
        block = model_blocks[b]
        if isinstance(block, ReducingBlock):
            raise ValueError(f"blocks: block {b} already has a reduction site (detach first)")
        missing = [p for p in _BLOCK_PARTS if not hasattr(block, p)]
        if missing or not hasattr(block.attn, "qkv"):
            raise TypeError(f"block {b} ({type(block).__name__}) is not a timm pre-norm ViT Block (missing {missing or ['attn.qkv']})")
    for i, b in enumerate(blocks):
        red = reducer if i == 0 else copy.deepcopy(reducer)
        site = Site(b, red, schedule, reg, when, position, relative_to, always_reduce)
        block = model_blocks[b]
        block.token_site = site
        block.__class__ = patched_class(type(block))
        reg.sites.append(site)
    reg.sites.sort(key=lambda s: s.block)
    return model


def detach(model: nn.Module) -> nn.Module:
    """Remove every reduction site, restoring the original block classes. Returns ``model``."""
    base = _unwrap(model)
    reg = _registry(base)
    if reg is None:
        return model
    for block in base.blocks:
        if isinstance(block, ReducingBlock):
            block.__class__ = block._original_class
            del block.token_site
    del base.__dict__[_REGISTRY_ATTR]
    return model


def sites(model: nn.Module) -> list[Site]:
    """The model's reduction sites, by block index."""
    reg = _registry(model)
    return [] if reg is None else list(reg.sites)


def set_epoch(model: nn.Module, epoch: float) -> None:
    """Move every attached schedule to ``epoch`` (a float allowed, for per-step curricula)."""
    for site in sites(model):
        site.epoch = float(epoch)


def last_reduction(model: nn.Module) -> TokenState | None:
    """Bookkeeping of the last forward: kept counts and the original patch of every kept token per site."""
    reg = _registry(model)
    return None if reg is None else reg.state


def aux_loss(model: nn.Module) -> torch.Tensor | float:
    """Sum of the auxiliary losses that learned reducers left in ``reducer.aux_loss`` during the last
    forward (0.0 when none); each is cleared once read. The training loop adds it to the task loss."""
    total: torch.Tensor | float = 0.0
    for site in sites(model):
        loss = getattr(site.reducer, "aux_loss", None)
        if loss is not None:
            total = total + loss
            site.reducer.aux_loss = None
    return total


def _plan(reg: Registry, training: bool) -> list[tuple[Site, int, int]]:
    """(site, patch tokens entering, patch tokens kept) at the current epoch, without a forward pass."""
    state = TokenState(reg.num_prefix, reg.grid)
    n, out = state.num_patches, []
    for site in reg.sites:
        keep = site.target_keep(n, state) if site.is_active(training) else n
        out.append((site, n, keep))
        n = keep
    return out


def expected_patch_tokens(model: nn.Module, training: bool = True) -> list[int]:
    """Patch tokens after each site for the current epoch (plain ints, no forward pass). Radial scores
    keep whole rings, so their real count can differ slightly; see :func:`last_reduction`."""
    reg = _registry(model)
    return [] if reg is None else [keep for _, _, keep in _plan(reg, training)]


def prepare_step(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> bool:
    """Compute gradient saliency for the next training forward (seed 001's gradient ablation).

    Runs a full-token forward and backward of ``loss_fn(model(images), targets)`` in eval mode (no
    dropout, BatchNorm on running statistics, no buffer updates, no parameter gradients touched), then
    hands each gradient site ``s_i = ‖∂L/∂x_i ⊙ x_i‖₁`` over channels at the site's input. Costs one
    extra forward and backward per step, as the seed reports. Call it on the unwrapped model under DDP.
    Returns False (and does nothing) when no site will drop by gradient saliency in this step.
    """
    base = _unwrap(model)
    reg = _registry(base)
    plan = _plan(reg, training=True) if reg else []
    grad_sites = [s for s, n, keep in plan if s.reducer.needs_gradient and s.is_active(True) and (keep < n or s.always_reduce)]
    if not grad_sites:
        return False
    was_training = base.training
    base.eval()
    reg.suspended = True
    for s in grad_sites:
        s.capture = True
    try:
        with torch.enable_grad():
            loss = loss_fn(base(images), targets)
            captured = [s.captured for s in grad_sites]
            grads = torch.autograd.grad(loss, captured)
        for s, x, g in zip(grad_sites, captured, grads):
            s.gradient = (g * x).abs().sum(dim=-1)[:, reg.num_prefix:].detach().float()
    finally:
        for s in grad_sites:
            s.capture, s.captured = False, None
        reg.suspended = False
        base.train(was_training)
    return True
