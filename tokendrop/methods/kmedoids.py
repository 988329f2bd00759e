"""K-Medoids token clustering as benchmarked in "Which Tokens to Use?" (Haurum et al., ICCVW 2023): weighted
K-Medoids on the residual stream before the block; the medoid tokens themselves go on."""

from __future__ import annotations

import torch

from ..reduction.base import Reducer, SiteInputs
from ..reduction.registry import register_reducer
from ..reduction.state import TokenState
from .clustering import check_clusters, nearest_centre, pairwise_distances, replace_by_clusters

#: Cost of a token outside a cluster when choosing that cluster's medoid (the reference's constant × N).
OUTSIDE_COST = 1e6


def k_medoids(z: torch.Tensor, weight: torch.Tensor, k: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted K-Medoids of the tokens ``z`` (B, N, C) with token weights ``weight`` (B, N).

    Start from the ``k`` heaviest tokens (descending weight). Each iteration assigns every token to its
    nearest medoid, then makes the medoid of cluster ``k`` its member ``i`` with the smallest
    ``weight_i · Σ_j ‖z_i − z_j‖`` (the sum runs over *all* tokens); a cluster left empty gets token 0.
    Returns ``(medoids (B, k), assignment (B, N))``, the assignment recomputed after the last iteration.
    """
    with torch.no_grad():
        dist = pairwise_distances(z.float())
        n = z.shape[1]
        cost = weight * dist.sum(dim=-1)  # (B, N)
        medoids = weight.topk(k, dim=1, largest=True, sorted=True).indices
        slots = torch.arange(k, device=z.device)[None, :, None]
        for _ in range(iters):
            member = nearest_centre(dist, medoids).unsqueeze(1) == slots  # (B, k, N)
            medoids = torch.where(member, cost.unsqueeze(1), OUTSIDE_COST * n).argmin(dim=-1)  # empty → 0
        return medoids, nearest_centre(dist, medoids)


@register_reducer("kmedoids")
class KMedoids(Reducer):
    """Cluster the patch tokens entering the block into ``keep`` clusters by K-Medoids weighted with the
    attention each token received in the previous block (summed over heads and queries), and keep the
    medoid tokens in cluster-slot order (gradient flows through them only).

    The state's ``assignment`` maps every original patch to its cluster, sizes are cluster sizes, and
    each output token's ``source`` is its medoid's own patch (the cluster centre). Proportional attention
    is off (the reference has none): sizes are recorded, not used as a logit bias. No parameters; train
    and eval are identical.
    """

    needs = frozenset({"prev_attention_colsum"})
    default_position = "before"

    def __init__(self, iters: int = 3) -> None:
        super().__init__()
        if not (isinstance(iters, int) and iters >= 1):
            raise ValueError(f"iters: {iters!r} is outside the allowed range [1, inf)")
        self.iters = iters

    def extra_repr(self) -> str:
        return f"iters={self.iters}"

    def begin_forward(self, state: TokenState, x: torch.Tensor, training: bool) -> None:
        state.size_bias = False

    def extra_macs(self, n_in: int, keep: int, dim: int, num_heads: int) -> int:
        """The pairwise distances ``‖z_i − z_j‖`` of the patch tokens (the iterations only add and compare)."""
        return n_in * n_in * dim

    def forward(self, x: torch.Tensor, keep: int, inputs: SiteInputs) -> torch.Tensor:
        state = inputs.state
        check_clusters("kmedoids", keep, state, x)
        z = x[:, state.num_prefix:]
        medoids, assignment = k_medoids(z, inputs.prev_attention_colsum.float(), keep, self.iters)
        tokens = torch.gather(z, 1, medoids.unsqueeze(-1).expand(-1, -1, z.shape[-1]))
        return replace_by_clusters(state, x, tokens, assignment, medoids)
