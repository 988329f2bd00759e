"""ToMe — Token Merging (Bolya et al., ICLR 2023): bipartite soft matching on the block's head-mean keys
merges ``r`` patch tokens per site into their most similar partner, size-weighted, with proportional
attention (``log size`` on the key logits) in every later block."""

from __future__ import annotations

import torch
from torch import nn

from ..reduction.api import _unwrap, attach
from ..reduction.base import Reducer, SiteInputs
from ..reduction.registry import register_reducer
from ..reduction.schedules import Remove
from ..reduction.state import TokenState


def merged_count(n: int, keep: int) -> int:
    """Tokens ToMe merges away when ``keep`` of ``n`` patch tokens are asked for: ``r = n − keep``, capped
    at half the tokens (the official cap ``(t − prefix) // 2`` over ``t`` tokens incl. the prefix)."""
    return max(0, min(n - keep, n // 2))


def bipartite_destinations(metric: torch.Tensor, r: int, num_prefix: int) -> torch.Tensor:
    """ToMe's bipartite soft matching as a destination per patch token: (B, N) → new token index.

    The split alternates over the whole sequence, prefix included: patch token ``j`` sits at position
    ``num_prefix + j``; even positions form set A, odd ones set B. Prefix tokens are protected (they are
    never sources or destinations), so only patch tokens are scored. The ``r`` A tokens whose best cosine
    match in B is highest merge into it. New order: the unmerged A tokens ascending, then every B token in
    its original order — the official order with the prefix in front (identical for 1 or 2 prefix tokens).
    """
    B, n, _ = metric.shape
    device = metric.device
    with torch.no_grad():
        first_a = num_prefix % 2  # A: the patches at even positions of the whole sequence, B: the odd ones
        a_idx = torch.arange(first_a, n, 2, device=device)
        b_idx = torch.arange(1 - first_a, n, 2, device=device)
        unit = metric / metric.norm(dim=-1, keepdim=True)
        scores = unit[:, a_idx] @ unit[:, b_idx].transpose(1, 2)  # (B, |A|, |B|)
        node_max, node_idx = scores.max(dim=-1)
        order = node_max.argsort(dim=-1, descending=True)
        src, unmerged = order[:, :r], order[:, r:].sort(dim=-1).values
        n_unm = a_idx.numel() - r
        dst_a = torch.empty_like(order)
        dst_a.scatter_(1, unmerged, torch.arange(n_unm, device=device).expand(B, n_unm))
        dst_a.scatter_(1, src, n_unm + node_idx.gather(1, src))
        dst = torch.empty(B, n, dtype=torch.long, device=device)
        dst[:, a_idx] = dst_a
        dst[:, b_idx] = n_unm + torch.arange(b_idx.numel(), device=device)
    return dst


@register_reducer("tome")
class ToMe(Reducer):
    """Merge ``r = n − keep`` patch tokens (at most half) by bipartite soft matching on the head-mean keys
    of the block's attention, between the attention residual and the MLP, as the official implementation.

    Merged tokens are size-weighted averages (:meth:`TokenState.merge`); sizes stay with the tokens through
    later sites of any method. ``prop_attn=True`` adds ``log size`` to the key logits of every later
    attention (proportional attention); ``False`` turns that off for the whole forward
    (``state.size_bias``). Use it with :class:`~tokendrop.Remove` for ToMe's fixed ``r`` per site (a list
    for a per-epoch curriculum), or with any ratio schedule. No parameters; train and eval are identical.
    """

    needs = frozenset({"keys"})
    default_position = "inside"

    def __init__(self, prop_attn: bool = True) -> None:
        super().__init__()
        self.prop_attn = bool(prop_attn)

    def extra_repr(self) -> str:
        return f"prop_attn={self.prop_attn}"

    def begin_forward(self, state: TokenState, x: torch.Tensor, training: bool) -> None:
        if not self.prop_attn:
            state.size_bias = False

    def output_count(self, n_in: int, keep: int) -> int:
        return n_in - merged_count(n_in, keep)

    def extra_macs(self, n_in: int, keep: int, dim: int, num_heads: int) -> int:
        """The bipartite scores ``A·Bᵀ`` over the patch tokens on head-mean keys of width ``dim / heads``."""
        return (n_in // 2) * (n_in - n_in // 2) * (dim // num_heads)

    def forward(self, x: torch.Tensor, keep: int, inputs: SiteInputs) -> torch.Tensor:
        state = inputs.state
        if state.key_mask is not None:
            raise NotImplementedError("tome: merging tokens padded to per-image counts is not supported")
        n = x.shape[1] - state.num_prefix
        r = merged_count(n, keep)
        if r == 0:
            return x
        return state.merge(x, bipartite_destinations(inputs.keys, r, state.num_prefix), n - r)


def tome(model: nn.Module, r: int | list[int], prop_attn: bool = True) -> nn.Module:
    """Apply ToMe to every block of ``model``, merging ``r`` tokens per block in training and inference —
    the equivalent of the official ``tome.patch.timm(model); model.r = r``. A list ``r`` gives one value
    per epoch (:class:`~tokendrop.Remove`, moved by :func:`~tokendrop.set_epoch`). Returns ``model``."""
    blocks = getattr(_unwrap(model), "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__}: expected a ViT with a `blocks` sequence")
    return attach(model, ToMe(prop_attn), blocks=range(len(blocks)), schedule=Remove(r), when="always")
