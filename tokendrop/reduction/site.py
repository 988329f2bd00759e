"""A reduction site: a (reducer, schedule) placed in one transformer block, and the block forward that
runs it.

Blocks are patched in place by swapping their class for a subclass with :meth:`ReducingBlock.forward`
(the weights stay where they are); the site is registered as the block's submodule ``token_site`` so a
learned reducer's parameters are saved as ``blocks.{i}.token_site.reducer.*``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..models.attention import attend
from .base import Reducer, SiteInputs
from .schedules import Schedule, keep_count, truncate
from .state import SiteRecord, TokenState

When = Literal["train", "eval", "always"]
Position = Literal["inside", "before"]


class Registry:
    """Plain-Python bookkeeping shared by the sites of one model (not a module: it holds no weights)."""

    def __init__(self, num_prefix: int, grid: tuple[int, int]) -> None:
        self.num_prefix = num_prefix
        self.grid = grid
        self.sites: list[Site] = []  # sorted by block index
        self.state = TokenState(num_prefix, grid)
        self.suspended = False  # full-token pass (gradient saliency)

    def begin(self) -> None:
        """Start the bookkeeping of a new forward pass."""
        self.state = TokenState(self.num_prefix, self.grid)


class Site(nn.Module):
    """One reduction step: ``reducer`` applied in block ``block`` with ``schedule`` giving the drop ratio.

    ``when``: active in training only (PTD/CTD), at evaluation only (post-hoc pruning) or always.
    ``position``: ``inside`` the block between the attention residual and the MLP (seeds 000/001, Top-K,
    EViT, ToMe) or ``before`` the block. ``relative_to``: keep count over the patch tokens entering the
    site, or over the original patches (``int(P·∏(1−d))``, seed 004's protocol).
    ``always_reduce``: run the reducer even when it keeps every token (measures the saliency overhead;
    the reference skips it at d = 0).
    """

    def __init__(self, block: int, reducer: Reducer, schedule: Schedule, registry: Registry, when: When = "train",
                 position: Position = "inside", relative_to: str = "entering", always_reduce: bool = False) -> None:
        super().__init__()
        self.block = block
        self.reducer = reducer
        self.schedule = schedule
        self.when = when
        self.position = position
        self.relative_to = relative_to
        self.always_reduce = always_reduce
        self.epoch = 0.0
        self.gradient: torch.Tensor | None = None  # pending gradient saliency (B, P), consumed by one forward
        self.capture = False  # record the tokens at the site (for gradient saliency)
        self.captured: torch.Tensor | None = None
        self.__dict__["registry"] = registry  # not a submodule

    def extra_repr(self) -> str:
        return (f"block={self.block}, schedule={self.schedule!r}, when={self.when!r}, position={self.position!r}, "
                f"relative_to={self.relative_to!r}")

    @property
    def drop_ratio(self) -> float:
        """Drop ratio at the current epoch."""
        return self.schedule(self.epoch)

    def is_active(self, training: bool) -> bool:
        """Whether the site reduces in the current mode."""
        if self.registry.suspended:
            return False
        return self.when == "always" or (self.when == "train") == training

    def target_keep(self, n_entering: int, state: TokenState) -> int:
        """Patch tokens to keep (plain int) given ``n_entering`` patch tokens; advances ``state.keep_fraction``."""
        d = self.drop_ratio
        state.keep_fraction *= 1.0 - d
        if self.relative_to == "original":
            return min(n_entering, max(1, truncate(state.num_patches * state.keep_fraction)))
        return keep_count(n_entering, d)

    def reduce(self, x: torch.Tensor, keep: int, state: TokenState, cls_attention: torch.Tensor | None) -> torch.Tensor:
        """Apply the reducer and record what it kept."""
        n_in = x.shape[1] - state.num_prefix
        if self.reducer.needs_gradient:
            if self.gradient is None:
                raise RuntimeError(f"block {self.block}: gradient saliency missing — call "
                                   "tokendrop.prepare_step(model, images, targets, loss_fn) before each training forward")
            gradient, self.gradient = self.gradient, None
        else:
            gradient = None
        out = self.reducer(x, keep, SiteInputs(state, cls_attention, gradient))
        state.records.append(SiteRecord(self.block, self.position, n_in, out.shape[1] - state.num_prefix, state.source))
        return out


class ReducingBlock:
    """Mixin placed before a timm ``Block`` class: the same computation, with the site's reduction."""

    token_site: Site

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        site = self.token_site
        registry = site.registry
        if registry.sites[0] is site:
            registry.begin()
        state = registry.state
        if attn_mask is not None or is_causal:
            raise NotImplementedError("token reduction does not support attention masks from the caller")
        n_in = x.shape[1] - state.num_prefix
        keep = n_in
        active = site.is_active(self.training)
        if active:
            keep = site.target_keep(n_in, state)
        reduce = active and (keep < n_in or site.always_reduce)
        if site.capture and site.position == "before":
            site.captured = x
        if reduce and site.position == "before":
            x = site.reduce(x, keep, state, None)
        need_cls = reduce and site.position == "inside" and site.reducer.needs_cls_attention
        attn_out, cls_row = attend(self.attn, self.norm1(x), state.attention_bias(), cls_row=need_cls)
        x = x + self.drop_path1(self.ls1(attn_out))
        if site.capture and site.position == "inside":
            site.captured = x
        if reduce and site.position == "inside":
            x = site.reduce(x, keep, state, None if cls_row is None else cls_row[:, state.num_prefix:])
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


_PATCHED: dict[type, type] = {}


def patched_class(cls: type) -> type:
    """The reducing subclass of block class ``cls`` (created once per class)."""
    if cls not in _PATCHED:
        _PATCHED[cls] = type(f"Reducing{cls.__name__}", (ReducingBlock, cls), {"_original_class": cls})
    return _PATCHED[cls]
