"""TPC-ViT's stabiliser (Eqs. 15–18 of seed 003): each query attends only to its κ nearest keys.

It is expressed as an additive logit bias for :func:`tokendrop.models.attention.attend`: 0 at the κ keys
nearest to each query (per head, among the present keys), the most negative value elsewhere — the same as
a softmax over the gathered κ keys. The ranking needs every query–key distance (the cost of ``QKᵀ``), so
it saves no arithmetic here; ``κ ≥`` present keys is exactly dense attention.
"""

from __future__ import annotations

import torch

__all__ = ["METRICS", "neighbour_bias"]

METRICS = ("euclidean", "dot")


def neighbour_bias(q: torch.Tensor, k: torch.Tensor, kappa: int, key_mask: torch.Tensor | None = None,
                   metric: str = "euclidean", shared: bool = False) -> torch.Tensor:
    """(B, H, T, T) float32 bias — or (B, 1, T, T) with ``shared`` — keeping the ``min(κ, T)`` nearest
    present keys of every query. ``q``, ``k``: (B, H, T, D); ``key_mask`` (B, T) True = present.

    ``metric="euclidean"`` ranks by ``‖q − k‖²`` (the paper), ``"dot"`` by ``q·k``; ``shared`` ranks by the
    sum over heads (one key set for all heads). No gradient flows through the selection."""
    with torch.no_grad():
        qf, kf = q.float(), k.float()
        score = qf @ kf.transpose(-2, -1)  # larger = nearer
        if metric == "euclidean":  # −‖q−k‖² up to ‖q‖², which is constant along a query's row
            score = 2.0 * score - kf.square().sum(-1)[:, :, None, :]
        if shared:
            score = score.sum(dim=1, keepdim=True)
        if key_mask is not None:
            score = score.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        idx = score.topk(min(kappa, score.shape[-1]), dim=-1).indices
        bias = torch.full_like(score, torch.finfo(torch.float32).min)
        return bias.scatter_(-1, idx, 0.0)
