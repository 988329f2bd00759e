"""Reduction sites and the block forward that carries one token state through the whole model.

Once a model has a site, *every* block is patched in place by swapping its class for a subclass with
:meth:`ReducingBlock.forward` (weights stay where they are), so merged-token sizes, key masks and soft
policies reach every later block. A block without a site whose state is still trivial runs the original
timm forward unchanged (the fast path). A site is registered as its block's submodule ``token_site``, so
a learned reducer's parameters are saved as ``blocks.{i}.token_site.reducer.*``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..models.attention import attend
from .base import ATTENTION_INPUTS, Reducer, SiteInputs
from .schedules import Schedule, truncate
from .state import SiteRecord, TokenState

When = Literal["train", "eval", "always"]
Position = Literal["inside", "before"]


class Registry:
    """Plain-Python bookkeeping shared by the blocks of one model (not a module: it holds no weights)."""

    def __init__(self, num_prefix: int, grid: tuple[int, int]) -> None:
        self.num_prefix = num_prefix
        self.grid = grid
        self.sites: list[Site] = []  # sorted by block index
        self.site_at: dict[int, Site] = {}
        self.state = TokenState(num_prefix, grid)
        self.suspended = False  # full-token pass (gradient saliency)

    def add(self, site: Site) -> None:
        """Register ``site`` (one per block)."""
        self.sites.append(site)
        self.sites.sort(key=lambda s: s.block)
        self.site_at[site.block] = site

    def remove(self, site: Site) -> None:
        """Unregister ``site``."""
        self.sites.remove(site)
        del self.site_at[site.block]

    def begin(self, x: torch.Tensor, training: bool) -> None:
        """Start the bookkeeping of a new forward pass (called by the model's first block with its input)."""
        self.state = TokenState(self.num_prefix, self.grid)
        for site in self.sites:
            if site.is_active(training):
                site.reducer.begin_forward(self.state, x, training)

    def wants_colsum(self, block: int, training: bool) -> bool:
        """Whether block ``block`` must leave its attention column sums for the next block's site."""
        nxt = self.site_at.get(block + 1)
        return nxt is not None and "prev_attention_colsum" in nxt.reducer.needs and nxt.is_active(training)


def _patch_slice(name: str, value: torch.Tensor, prefix: int) -> torch.Tensor:
    """The patch-token part of an attention extra (token axis last for per-head ones, else axis 1)."""
    if name == "attention":
        return value  # the whole (B, H, T, T) matrix, prefix rows and columns included
    return value[..., prefix:] if name in ("cls_attention_heads", "value_norms") else value[:, prefix:]


class Site(nn.Module):
    """One reduction step: ``reducer`` applied in block ``block`` with ``schedule`` giving the drop ratio.

    ``when``: active in training only (PTD/CTD), at evaluation only (post-hoc pruning) or always.
    ``position``: ``inside`` the block between the attention residual and the MLP (PTD, Top-K, EViT, ToMe)
    or ``before`` the block (clustering methods, radial patterns). ``relative_to``: keep count over the
    patch tokens entering the site, or over the original patches (``int(P·∏(1−d))``, the protocol of
    "Which Tokens to Use?"). ``always_reduce``: run the reducer even when it keeps every token (measures
    the saliency overhead; the reference skips it at d = 0).
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
        """Drop ratio at the current epoch (for a count schedule: of the original patches)."""
        return 1.0 - self.schedule.fraction_kept(self.registry.state.num_patches, self.epoch)

    def is_active(self, training: bool) -> bool:
        """Whether the site reduces in the current mode."""
        if self.registry.suspended:
            return False
        return self.when == "always" or (self.when == "train") == training

    def target_keep(self, n_entering: int, state: TokenState) -> int:
        """Patch tokens to keep (plain int) given ``n_entering`` patch tokens; advances ``state.keep_fraction``."""
        keep = self.schedule.keep(n_entering, self.epoch)
        state.keep_fraction *= self.schedule.fraction_kept(n_entering, self.epoch)
        if self.relative_to == "original":
            keep = max(1, truncate(state.num_patches * state.keep_fraction))
            return keep if self.reducer.keep_is_budget else min(n_entering, keep)
        return keep

    def plan(self, n_in: int, state: TokenState, training: bool) -> tuple[int, bool]:
        """``(keep, reduce)`` for ``n_in`` entering patch tokens: the target count and whether to run."""
        if not self.is_active(training):
            return n_in, False
        keep = self.target_keep(n_in, state)
        return keep, keep < n_in or self.always_reduce or self.reducer.keep_is_budget

    def reduce(self, x: torch.Tensor, keep: int, state: TokenState, extras: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hand the reducer the inputs it declared, apply it and record what it did."""
        p = state.num_prefix
        n_in = x.shape[1] - p
        needs = self.reducer.needs
        given = {name: _patch_slice(name, value, p) for name, value in extras.items() if name in needs}
        if "prev_attention_colsum" in needs:
            colsum = state.prev_attention_colsum
            if colsum is None or colsum.shape[1] != x.shape[1]:
                raise RuntimeError(f"block {self.block}: the previous block's attention column sums do not match "
                                   "the tokens here (another site reduced in between)")
            given["prev_attention_colsum"] = colsum[:, p:]
        if "gradient" in needs:
            if self.gradient is None:
                raise RuntimeError(f"block {self.block}: gradient saliency missing — call "
                                   "tokendrop.prepare_step(model, images, targets, loss_fn) before each training forward")
            gradient, self.gradient = self.gradient.to(x.device), None
            given["gradient"] = torch.gather(gradient, 1, state.current_source(x).clamp_min(0))
        out = self.reducer(x, keep, SiteInputs(state, self.block, self.training, **given))
        mask = state.patch_mask()
        state.records.append(SiteRecord(
            self.block, self.position, n_in, out.shape[1] - p, state.current_source(out), state.current_assignment(out),
            kept_per_image=None if mask is None else mask.sum(dim=1),
            size=None if state.size is None else state.size[:, p:]))
        return out


class ReducingBlock:
    """Mixin placed before a timm ``Block`` class: the same computation, carrying the model's token state
    and running the block's site, if it has one."""

    token_block: int  # block index (a plain attribute)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        registry: Registry = self.__dict__["token_registry"]
        index = self.token_block
        if index == 0:
            registry.begin(x, self.training)
        state = registry.state
        site = registry.site_at.get(index)
        colsum = registry.wants_colsum(index, self.training)
        if site is None and state.trivial and not colsum:
            return self._original_class.forward(self, x, attn_mask, is_causal)
        if attn_mask is not None or is_causal:
            raise NotImplementedError("token reduction does not support attention masks from the caller")
        keep, reduce = site.plan(x.shape[1] - state.num_prefix, state, self.training) if site else (0, False)
        position = site.position if site else None
        if site is not None and site.capture and position == "before":
            site.captured = x
        if reduce and position == "before":
            x = site.reduce(x, keep, state, {})
        needs = set(site.reducer.needs & ATTENTION_INPUTS) if reduce and position == "inside" else set()
        if colsum:
            needs.add("attention_colsum")
        y = self.norm1(x)
        attn_out, extras = attend(self.attn, y, state.attention_bias(), state.policy, state.key_mask, needs)
        if colsum:
            state.prev_attention_colsum = extras.pop("attention_colsum")
        x = x + self.drop_path1(self.ls1(attn_out))
        if site is not None and site.capture and position == "inside":
            site.captured = x
        if reduce and position == "inside":
            x = site.reduce(x, keep, state, extras)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


_PATCHED: dict[type, type] = {}


def patched_class(cls: type) -> type:
    """The reducing subclass of block class ``cls`` (created once per class)."""
    if cls not in _PATCHED:
        _PATCHED[cls] = type(f"Reducing{cls.__name__}", (ReducingBlock, cls), {"_original_class": cls})
    return _PATCHED[cls]
