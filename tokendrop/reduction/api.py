"""Public entry points: attach reduction sites to a ViT, move their schedules, prepare gradient saliency."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterable, Union

import torch
from torch import nn

from .base import ATTENTION_INPUTS, Reducer, SiteFacts
from .registry import reducer as build_reducer
from .schedules import Constant, Schedule
from .site import Position, ReducingBlock, Registry, Site, When, patched_class
from .state import TokenState

_REGISTRY_ATTR = "_tokendrop_registry"
_EXTENSIONS_ATTR = "_tokendrop_extensions"
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


ReducerSpec = Union[Reducer, str, Callable[[SiteFacts], Reducer]]


def attach(model: nn.Module, reducer: ReducerSpec, blocks: Iterable[int] = (0,), schedule: Schedule | None = None,
           when: When = "train", position: Position | None = None, relative_to: str = "entering",
           always_reduce: bool = False) -> nn.Module:
    """Add a reduction site with ``reducer`` and ``schedule`` to each block index in ``blocks`` (0-based).

    ``reducer`` is a :class:`Reducer` (each further block gets its own copy), a registered method name
    (``"topk"``; arguments through :func:`tokendrop.reducer`), or a factory called once per site with its
    :class:`SiteFacts` (block, width, heads, tokens entering, keep count at the schedule's current epoch)
    for learned reducers whose shapes depend on the site. ``position=None`` takes the reducer's
    ``default_position``. Works on our backbones and on timm ``VisionTransformer`` models (DeiT, distilled
    DeiT, register tokens, LayerScale, qk-norm); every block is patched in place, weights untouched.
    Returns ``model``. Attaching twice to one block is an error; :func:`detach` undoes everything.
    """
    if when not in ("train", "eval", "always"):
        raise ValueError(f"when: {when!r} is not one of train, eval, always")
    if position not in (None, "inside", "before"):
        raise ValueError(f"position: {position!r} is not one of inside, before")
    if relative_to not in ("entering", "original"):
        raise ValueError(f"relative_to: {relative_to!r} is not one of entering, original")
    if isinstance(reducer, str):
        reducer = build_reducer(reducer)
    if not (isinstance(reducer, Reducer) or callable(reducer)):
        raise TypeError(f"reducer: expected a tokendrop Reducer, a method name or a factory, got {type(reducer).__name__}")
    schedule = schedule if schedule is not None else Constant(1.0)
    base = _unwrap(model)
    model_blocks = getattr(base, "blocks", None)
    if not isinstance(model_blocks, nn.Sequential | nn.ModuleList):
        raise TypeError(f"{type(base).__name__}: expected a ViT with a `blocks` sequence (ours or timm's VisionTransformer)")
    blocks = list(blocks)
    if not blocks:
        raise ValueError("blocks: give at least one block index")
    depth = len(model_blocks)
    for b in blocks:
        if not isinstance(b, int) or not 0 <= b < depth:
            raise ValueError(f"blocks: index {b!r} is outside the allowed range [0, {depth - 1}]")
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"blocks: {blocks} names a block twice")
    for i, block in enumerate(model_blocks):
        missing = [p for p in _BLOCK_PARTS if not hasattr(block, p)]
        if missing or not hasattr(block.attn, "qkv"):
            raise TypeError(f"block {i} ({type(block).__name__}) is not a timm pre-norm ViT Block (missing {missing or ['attn.qkv']})")
    if extensions(base):
        raise ValueError(f"model: a whole-model controller ({type(extensions(base)[0]).__name__}) is attached; "
                         "tokendrop.detach(model) first")
    reg = _registry(base, create=True)
    taken = [b for b in blocks if b in reg.site_at]
    if taken:
        raise ValueError(f"blocks: block {taken[0]} already has a reduction site (detach first)")
    added: list[Site] = []
    try:
        for i, b in enumerate(sorted(blocks)):
            if isinstance(reducer, Reducer):
                red = reducer if i == 0 else copy.deepcopy(reducer)
            else:
                red = reducer(_site_facts(base, reg, b, schedule, when, relative_to))
                if not isinstance(red, Reducer):
                    raise TypeError(f"reducer: the factory returned {type(red).__name__}, not a tokendrop Reducer")
            _check_placement(base, red, b, position or red.default_position)
            site = Site(b, red, schedule, reg, when, position or red.default_position, relative_to, always_reduce)
            site.train(model_blocks[b].training)  # a new site takes the model's mode (train/eval)
            model_blocks[b].token_site = site
            reg.add(site)
            added.append(site)
    except Exception:
        for site in added:  # all or nothing
            reg.remove(site)
            del model_blocks[site.block].token_site
        if not reg.sites:
            del base.__dict__[_REGISTRY_ATTR]
        raise
    for i, block in enumerate(model_blocks):  # every block carries the token state
        if not isinstance(block, ReducingBlock):
            block.__class__ = patched_class(type(block))
            block.token_block = i
            block.__dict__["token_registry"] = reg
    return model


def _check_placement(base: nn.Module, reducer: Reducer, block: int, position: str) -> None:
    """One-line errors for a reducer that cannot work at ``position`` of ``block`` of ``base``."""
    if position not in ("inside", "before"):
        raise ValueError(f"position: {type(reducer).__name__}.default_position {position!r} is not inside or before")
    attention_needs = sorted(reducer.needs & ATTENTION_INPUTS)
    if position == "before" and attention_needs:
        raise ValueError(f"position: 'before' has no attention to hand {type(reducer).__name__} "
                         f"({', '.join(attention_needs)}); use position='inside'")
    if "prev_attention_colsum" in reducer.needs and block == 0:
        raise ValueError(f"blocks: {type(reducer).__name__} uses the previous block's attention; block 0 has none")
    if reducer.needs & {"cls_attention", "cls_attention_grad", "cls_attention_heads"} and getattr(base, "cls_token", None) is None:
        raise ValueError(f"reducer: {type(reducer).__name__} scores by CLS attention but {type(base).__name__} has no class token")


def _site_facts(base: nn.Module, reg: Registry, block: int, schedule: Schedule, when: str, relative_to: str) -> SiteFacts:
    """What a factory learns about the site it builds for, with the sites attached so far before it."""
    training = when != "eval"
    state = TokenState(reg.num_prefix, reg.grid)
    n = state.num_patches
    for site in reg.sites:
        if site.block < block:
            keep, reduce = site.plan(n, state, training)
            n = site.reducer.output_count(n, keep) if reduce else n
    probe = Site(block, Reducer(), schedule, reg, when, "inside", relative_to)
    probe.epoch = reg.sites[0].epoch if reg.sites else 0.0
    attn = base.blocks[block].attn
    return SiteFacts(block, int(attn.qkv.in_features), int(attn.num_heads), n, probe.target_keep(n, state))


def add_extension(model: nn.Module, extension: nn.Module) -> None:
    """Register a whole-model controller that patched ``model`` itself (e.g. TPC-ViT's halting): its
    ``aux_loss`` is collected by :func:`aux_loss` and its ``undo(model)`` is called by :func:`detach`."""
    _unwrap(model).__dict__.setdefault(_EXTENSIONS_ATTR, []).append(extension)


def extensions(model: nn.Module) -> list[nn.Module]:
    """The whole-model controllers registered with :func:`add_extension`."""
    return list(_unwrap(model).__dict__.get(_EXTENSIONS_ATTR, ()))


def detach(model: nn.Module) -> nn.Module:
    """Remove every reduction site and whole-model controller, restoring the original classes. Returns ``model``."""
    base = _unwrap(model)
    for extension in base.__dict__.pop(_EXTENSIONS_ATTR, ()):
        extension.undo(base)
    reg = _registry(base)
    if reg is None:
        return model
    for block in base.blocks:
        if isinstance(block, ReducingBlock):
            block.__class__ = block._original_class
            if "token_site" in block._modules:
                del block.token_site
            del block.token_block, block.__dict__["token_registry"]
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
    """Sum of the auxiliary losses that learned reducers (``reducer.aux_loss``) and whole-model controllers
    (``extension.aux_loss``) left during the last forward (0.0 when none); each is cleared once read. The
    training loop adds it to the task loss."""
    total: torch.Tensor | float = 0.0
    for holder in [*(site.reducer for site in sites(model)), *extensions(model)]:
        loss = getattr(holder, "aux_loss", None)
        if loss is not None:
            total = total + loss
            holder.aux_loss = None
    return total


@dataclass(frozen=True)
class SitePlan:
    """What a site will do at the current epoch, without a forward pass."""

    site: Site
    tokens_in: int  # patch tokens entering
    keep: int  # the schedule's target
    tokens_out: int  # patch tokens leaving: the reducer's output_count (an upper bound where counts vary)
    reduces: bool  # whether the reducer runs at all
    keep_fraction: float = 1.0  # the token state's keep fraction after this site's target (TokenState.keep_fraction)


def _plan(reg: Registry, training: bool, state: TokenState | None = None) -> list[SitePlan]:
    """Every site's :class:`SitePlan` at the current epoch, in block order."""
    state = state if state is not None else TokenState(reg.num_prefix, reg.grid)
    n, out = state.num_patches, []
    for site in reg.sites:
        keep, reduce = site.plan(n, state, training)
        n_out = site.reducer.output_count(n, keep) if reduce else n
        out.append(SitePlan(site, n, keep, n_out, reduce, state.keep_fraction))
        n = n_out
    return out


def expected_patch_tokens(model: nn.Module, training: bool = True) -> list[int]:
    """Patch tokens leaving each site for the current epoch (plain ints, no forward pass). Radial scores
    keep whole rings and sampling methods keep fewer, so the real count can differ; see
    :func:`last_reduction`."""
    reg = _registry(model)
    return [] if reg is None else [p.tokens_out for p in _plan(reg, training)]


def step_signature(model: nn.Module, training: bool = True) -> tuple:
    """What a training forward's computation depends on beyond its inputs, for the current epoch: each
    site's block, target, output count and whether it runs, and the keep fraction where the reducer reads
    it (:attr:`Reducer.reads_keep_fraction`). Steps with equal signatures and input shapes run the same
    kernels, so one captured CUDA graph serves them all; keep counts are integers, so a per-step
    curriculum changes the signature at most once per token."""
    reg = _registry(model)
    if reg is None:
        return ()
    return tuple((p.site.block, p.keep, p.tokens_out, p.reduces,
                  p.keep_fraction if p.site.reducer.reads_keep_fraction else None) for p in _plan(reg, training))


def capture_blockers(model: nn.Module) -> list[str]:
    """Why a training step through ``model``'s sites cannot be captured in a CUDA graph (one phrase per
    site whose reducer is not :attr:`Reducer.capturable`; empty when it can be)."""
    return [f"block {s.block}: {type(s.reducer).__name__} (gradient saliency or a private generator)"
            for s in sites(model) if not s.reducer.capturable]


def site_plans(model: nn.Module, training: bool = True) -> list[SitePlan]:
    """What every site does at the current epoch (for MAC counting and logging)."""
    reg = _registry(model)
    return [] if reg is None else _plan(reg, training)


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
    grad_sites = [p.site for p in plan if "gradient" in p.site.reducer.needs and p.reduces]
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
