"""EViT (Liang et al., ICLR 2022) as in "Which Tokens to Use?" (seed 004): Top-K by CLS attention plus
one fused token that takes the attention-weighted sum of the pruned tokens."""

from __future__ import annotations

import torch

from ..reduction.base import Reducer, SiteInputs
from ..reduction.registry import register_reducer


@register_reducer("evit")
class EViT(Reducer):
    """Keep the ``keep`` patch tokens the CLS token attends to most (head mean ``a``) and fuse the rest
    into one token ``f = Σ_pruned a_j x_j``.

    * The weights ``a_j`` are **not** renormalised (they sum to less than 1), as in both the reference
      and EViT's own code; ``f`` has gradient through ``a`` (``cls_attention_grad``) and through ``x``.
    * Output ``[prefix, kept (descending a), f]``: ``keep + 1`` patch tokens. At a later site the fused
      token competes like any other token and may be kept or fused again.
    * ``state.assignment`` maps every absorbed patch to the fused token, whose ``size`` counts them.
      Sizes here are bookkeeping only: unless an earlier site already introduced sizes (ToMe), EViT
      turns proportional attention off, so later blocks see the fused token as an ordinary token.
    * No parameters; training and evaluation behave the same. Default position ``inside`` the block
      (after the attention residual, before the MLP), using that block's own attention.

    EViT's own code warms the keep rate up with a cosine from 1 to ``r``; that is just a schedule::

        td.attach(model, "evit", blocks=[3, 6, 9], schedule=td.Cosine(start, end, initial=0.0, final=1 - r))

    (it also takes ``ceil(r·N)`` of the tokens entering each site, ``relative_to="entering"``, where the
    reference takes ``int(P·r^s)`` of the original patches, ``relative_to="original"``).
    """

    needs = frozenset({"cls_attention_grad"})

    def output_count(self, n_in: int, keep: int) -> int:
        return keep + 1 if keep < n_in else n_in

    def extra_macs(self, n_in: int, keep: int, dim: int, num_heads: int) -> int:
        """The fused token ``Σ a_j x_j`` (computed over every patch token, zero weight on the kept ones)."""
        return n_in * dim

    def forward(self, x: torch.Tensor, keep: int, inputs: SiteInputs) -> torch.Tensor:
        state = inputs.state
        n = x.shape[1] - state.num_prefix
        if keep >= n:
            return x
        weight = inputs.cls_attention_grad  # (B, N), with gradient
        present = state.patch_mask()
        if present is not None:  # absent (padding) tokens rank last and weigh nothing
            weight = weight * present
        with torch.no_grad():
            rank = weight.detach() if present is None else weight.detach().masked_fill(~present, -torch.inf)
            order = rank.argsort(dim=1, descending=True, stable=True)  # kept: the first `keep`
            dst = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=x.device).clamp_max(keep).expand_as(order))
        patches = x[:, state.num_prefix:]
        kept = torch.gather(patches, 1, order[:, :keep, None].expand(-1, -1, x.shape[-1]))
        pruned = (dst == keep).to(patches.dtype) * weight.to(patches.dtype)  # a_j on pruned tokens, 0 elsewhere
        fused = (pruned.unsqueeze(-1) * patches).sum(dim=1, keepdim=True)
        if state.size is None:
            state.size_bias = False
        return state.replace(x, torch.cat([kept, fused], dim=1), dst)
