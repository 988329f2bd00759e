"""Per-forward token bookkeeping shared by every block of a model with reduction sites.

One :class:`TokenState` lives from the model's first block to its head. It says, for the current token
sequence ``(B, prefix + N, C)``:

* ``source[b, j]`` — an original patch (row-major on ``grid``) that patch token ``j`` stands for: the patch
  itself after pruning, the smallest patch index of its members after merging (or the centre patch a
  hard clustering names);
* ``assignment[b, p]`` — for every original patch ``p``, the current patch token carrying it, or −1 when
  it was pruned (the full patch → token map; merges carry every patch somewhere);
* ``size[b, t]`` — how many original tokens token ``t`` stands for (prefix included; ``None`` = all 1).
  When set and ``size_bias`` is on (the default; a merging method may turn it off), attention adds
  ``log(size)`` to each key's logits (ToMe's proportional attention);
* ``key_mask[b, t]`` — ``True`` where token ``t`` is present. Absent tokens (padding for per-image counts,
  masked patterns) are ignored as keys by every later attention; ``None`` = all present;
* ``policy[b, t]`` — a soft, differentiable keep decision in [0, 1] (DynamicViT in training): attention
  weights key ``j`` by ``policy_j``, except that a token always attends to itself;
* ``scratch`` — per-forward values a method shares between its own sites, keyed by the method's name
  (e.g. how many DynamicViT sites take part, to split its ratio loss); fresh every forward.

Reducers change the state only through :meth:`TokenState.select`, :meth:`TokenState.replace` and
:meth:`TokenState.merge`, so provenance and sizes stay right by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SiteRecord:
    """What one site did in the last forward (for analysis and logging)."""

    block: int
    position: str
    tokens_in: int  # patch tokens entering the site
    kept: int  # patch token slots leaving it (the largest per-image count when counts vary)
    source: torch.Tensor  # (B, kept): an original patch index of every output token (see TokenState)
    assignment: torch.Tensor  # (B, P): output token carrying each original patch, −1 if none
    kept_per_image: torch.Tensor | None = None  # (B,) present patch tokens per image, where counts vary
    size: torch.Tensor | None = None  # (B, kept): original patches per output token, where merged


@dataclass
class TokenState:
    """Token bookkeeping of one forward pass (see the module docstring for the fields)."""

    num_prefix: int
    grid: tuple[int, int]
    source: torch.Tensor | None = None
    assignment: torch.Tensor | None = None
    size: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None
    policy: torch.Tensor | None = None
    size_bias: bool = True  # add log(size) to the attention logits (proportional attention) once sizes exist
    keep_fraction: float = 1.0  # product of (1 − d) over the sites passed; for relative_to="original"
    prev_attention_colsum: torch.Tensor | None = None  # (B, T) of the last block that was asked for it
    scratch: dict[str, Any] = field(default_factory=dict)  # per-forward values a method shares across its sites
    records: list[SiteRecord] = field(default_factory=list)

    @property
    def num_patches(self) -> int:
        """Patch tokens of the unreduced image."""
        return self.grid[0] * self.grid[1]

    @property
    def trivial(self) -> bool:
        """True while attention needs nothing from the state (no sizes, masks or policy)."""
        return (self.size is None or not self.size_bias) and self.key_mask is None and self.policy is None

    # ----------------------------------------------------------------------------------- views
    def current_source(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N) original patch index of each current patch token of ``x`` (B, prefix+N, C)."""
        if self.source is None:
            n = x.shape[1] - self.num_prefix
            return torch.arange(n, device=x.device).expand(x.shape[0], n)
        return self.source

    def current_assignment(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P) current patch token carrying each original patch (−1: none)."""
        if self.assignment is None:
            return torch.arange(self.num_patches, device=x.device).expand(x.shape[0], self.num_patches)
        return self.assignment

    def patch_mask(self) -> torch.Tensor | None:
        """(B, N) presence of the current patch tokens, or None when all are present."""
        return None if self.key_mask is None else self.key_mask[:, self.num_prefix:]

    def attention_bias(self, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """Additive per-key logit bias (B, T) in ``dtype``: ``log(size)``, and the most negative finite value
        at absent keys (finite, so a row with every key absent stays a uniform row, never NaN)."""
        size = self.size if self.size_bias else None
        if size is None and self.key_mask is None:
            return None
        ref = size if size is not None else self.key_mask
        bias = size.log().to(dtype) if size is not None else torch.zeros(ref.shape, dtype=dtype, device=ref.device)
        if self.key_mask is not None:
            bias = bias.masked_fill(~self.key_mask, torch.finfo(dtype).min)
        return bias

    # ------------------------------------------------------------------------------- updates
    def select(self, x: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Keep the prefix tokens and the patch tokens at ``idx`` (B, k), in ``idx`` order.

        ``valid`` (B, k) bool marks padding slots (False) when images keep different counts: the padded
        slots become absent keys (``key_mask``) and carry no patch. ``idx`` must not require grad."""
        p = self.num_prefix
        B, k = idx.shape
        gather_idx = idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        out = torch.cat([x[:, :p], torch.gather(x[:, p:], 1, gather_idx)], dim=1)
        present = torch.gather(self.patch_mask(), 1, idx) if self.key_mask is not None else None
        if valid is not None:
            present = valid if present is None else present & valid
        n = x.shape[1] - p
        slots = torch.arange(k, device=x.device).expand(B, k)
        target = idx if present is None else idx.masked_fill(~present, n)  # padding writes to a spare column
        dst = torch.full((B, n + 1), -1, dtype=torch.long, device=x.device).scatter_(1, target, slots)[:, :n]
        self._remap(x, dst)
        self.source = torch.gather(self.current_source(x), 1, idx)
        if self.size is not None:
            self.size = torch.cat([self.size[:, :p], torch.gather(self.size[:, p:], 1, idx)], dim=1)
        if self.policy is not None:
            self.policy = torch.cat([self.policy[:, :p], torch.gather(self.policy[:, p:], 1, idx)], dim=1)
        if present is not None:
            self.key_mask = torch.cat([self.key_mask[:, :p] if self.key_mask is not None
                                       else present.new_ones(B, p), present], dim=1)
        return out

    def replace(self, x: torch.Tensor, patches: torch.Tensor, dst: torch.Tensor, size: torch.Tensor | None = None,
                present: torch.Tensor | None = None, source: torch.Tensor | None = None) -> torch.Tensor:
        """Replace the patch tokens of ``x`` by ``patches`` (B, M, C) that a method computed. ``dst`` (B, N)
        gives for every current patch token the new token carrying it (its cluster; the arg-max slot of a
        soft merge), or −1 when it is dropped. ``size`` (B, M) overrides the new tokens' sizes (soft merges
        pass their weight sums); by default sizes of the members add up. ``present`` (B, M) marks padding
        slots (False); by default every new token is present. ``source`` (B, M) names the original patch
        each new token stands for (a hard clustering's centre, e.g. from :meth:`current_source` at the
        medoid); by default the smallest patch among its members. The prefix is kept."""
        p = self.num_prefix
        B, n = dst.shape
        m = patches.shape[1]
        carried = dst >= 0
        if self.key_mask is not None:
            carried = carried & self.patch_mask()
        slot = torch.where(carried, dst, torch.full_like(dst, m))  # dropped tokens go to a spare slot
        if size is None:
            old = self.size[:, p:] if self.size is not None else torch.ones(B, n, device=x.device)
            size = old.new_zeros(B, m + 1).scatter_add_(1, slot, old)[:, :m]
        prefix_size = self.size[:, :p] if self.size is not None else size.new_ones(B, p)
        self.size = torch.cat([prefix_size, size.float()], dim=1)
        if source is None:
            src = self.current_source(x).masked_fill(~carried, self.num_patches)
            rep = src.new_full((B, m + 1), self.num_patches).scatter_reduce_(1, slot, src, "amin")[:, :m]
            source = rep.masked_fill(rep == self.num_patches, -1)
        self.source = source
        self._remap(x, slot.masked_fill(slot == m, -1))
        if present is not None or self.key_mask is not None:
            present = present if present is not None else torch.ones(B, m, dtype=torch.bool, device=x.device)
            prefix = self.key_mask[:, :p] if self.key_mask is not None else present.new_ones(B, p)
            self.key_mask = torch.cat([prefix, present], dim=1)
        if self.policy is not None:
            raise RuntimeError("replace: merging while a soft policy is active is not supported")
        return torch.cat([x[:, :p], patches], dim=1)

    def merge(self, x: torch.Tensor, dst: torch.Tensor, n_out: int, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Merge the current patch tokens into ``n_out`` tokens: token ``j`` goes to ``dst[b, j]`` (−1 drops
        it), and each new token is the average of its members weighted by ``size × weight`` (``weight``
        (B, N), default 1: ToMe's size-weighted average). Returns the new sequence."""
        p = self.num_prefix
        B, n = dst.shape
        z = x[:, p:]
        w = self.size[:, p:].to(z.dtype) if self.size is not None else z.new_ones(B, n)  # size-weighted
        if weight is not None:
            w = w * weight.to(z.dtype)
        if self.key_mask is not None:
            w = w * self.patch_mask().to(z.dtype)
        slot = torch.where(dst >= 0, dst, torch.full_like(dst, n_out))
        w = w.masked_fill(dst < 0, 0.0)
        num = z.new_zeros(B, n_out + 1, z.shape[-1]).scatter_add(1, slot.unsqueeze(-1).expand_as(z), z * w.unsqueeze(-1))
        den = z.new_zeros(B, n_out + 1).scatter_add(1, slot, w)
        patches = num[:, :n_out] / den[:, :n_out].clamp_min(torch.finfo(z.dtype).tiny).unsqueeze(-1)
        return self.replace(x, patches, dst)

    def _remap(self, x: torch.Tensor, dst: torch.Tensor) -> None:
        """Update ``assignment`` given the new token ``dst[b, j]`` of every current patch token (−1: dropped)."""
        old = self.current_assignment(x)
        new = torch.gather(dst, 1, old.clamp_min(0))
        self.assignment = new.masked_fill(old < 0, -1)
