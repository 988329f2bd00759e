"""DPC-KNN token clustering with the CTM token weight (TCFormer, Zeng et al., CVPR 2022), as benchmarked in
"Which Tokens to Use?" (Haurum et al., ICCVW 2023): density-peak clustering of the residual stream before
the block, then a learned-weight average per cluster."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..reduction.base import Reducer, SiteInputs
from ..reduction.registry import register_reducer
from ..reduction.state import TokenState
from .clustering import check_clusters, nearest_centre, pairwise_distances, replace_by_clusters

NOISE = 1e-6
"""Scale of the uniform noise added to the densities (breaks ties, as the reference)."""
MERGE_EPS = 1e-6
"""Added to each cluster's weight sum before dividing (the reference's)."""


def dpc_knn(z: torch.Tensor, clusters: int, k: int, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k-nearest-neighbour densities of the tokens ``z`` (B, N, C).

    With ``D = ‖z_i − z_j‖ / √C``: density ``ρ_i = exp(−mean of D² to the k nearest tokens (itself
    included)) + noise_i``; ``δ_i`` = distance to the nearest denser token (the image's largest distance
    for the densest one). The ``clusters`` tokens with the highest ``ρ·δ`` are the centres (descending);
    every token joins its nearest centre, each centre its own cluster.
    Returns ``(centres (B, K), assignment (B, N))``.
    """
    with torch.no_grad():
        B, n, C = z.shape
        dist = pairwise_distances(z.float()) / math.sqrt(C)
        knn = dist.topk(min(k, n), dim=-1, largest=False).values
        density = (-knn.pow(2).mean(dim=-1)).exp() + noise
        denser = density.unsqueeze(1) > density.unsqueeze(2)  # [b, i, j]: ρ_j > ρ_i
        farthest = dist.flatten(1).max(dim=-1).values[:, None, None]
        delta = torch.where(denser, dist, farthest).min(dim=-1).values
        centres = (delta * density).topk(clusters, dim=1, largest=True, sorted=True).indices
        assignment = nearest_centre(dist, centres)
        assignment.scatter_(1, centres, torch.arange(clusters, device=z.device).expand(B, clusters))
        return centres, assignment


def weighted_cluster_mean(z: torch.Tensor, weight: torch.Tensor, assignment: torch.Tensor, clusters: int) -> torch.Tensor:
    """(B, K, C) ``x_k = Σ_{i∈k} w_i z_i / (Σ_{i∈k} w_i + 1e-6)`` for tokens ``z`` (B, N, C), weights (B, N)."""
    B, _, C = z.shape
    num = z.new_zeros(B, clusters, C).scatter_add(1, assignment.unsqueeze(-1).expand_as(z), z * weight.unsqueeze(-1))
    den = weight.new_zeros(B, clusters).scatter_add(1, assignment, weight)
    return num / (den + MERGE_EPS).unsqueeze(-1)


@register_reducer("dpcknn")
class DPCKNN(Reducer):
    """Cluster the ``N`` patch tokens entering the block into ``keep`` clusters by DPC-KNN (``k``
    neighbours) and replace each cluster by the average of its tokens weighted by the learned
    ``w = exp(Linear_{C→1}(z))`` — the CTM token weight; the Linear (``dim`` = C) learns through the merge
    only. Output tokens come in centre order (descending density × distance score).

    Sizes from earlier merges do not weight the average (the reference's CTM ignores them; the learned
    weight sees the tokens). The density noise ``1e-6·U(0, 1)`` is drawn from ``generator`` (a CPU
    ``torch.Generator``; each site's copy starts from its state) or else the global RNG. The state's
    ``assignment`` maps every patch to its cluster, sizes are cluster sizes, and each output token's
    ``source`` is its centre's patch. Proportional attention is off (the reference has none). Train and
    eval behave the same. Build per site: ``attach(model, lambda f: DPCKNN(f.dim), ...)``.
    """

    default_position = "before"

    def __init__(self, dim: int, k: int = 5, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not (isinstance(dim, int) and dim >= 1):
            raise ValueError(f"dim: {dim!r} is outside the allowed range [1, inf)")
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"k: {k!r} is outside the allowed range [1, inf)")
        self.k = k
        self.generator = generator
        self.score = nn.Linear(dim, 1)
        nn.init.trunc_normal_(self.score.weight, std=0.02)
        nn.init.zeros_(self.score.bias)


    @property
    def capturable(self) -> bool:  # noqa: D102 — the density noise comes from a CPU generator
        return self.generator is None and super().capturable
    def extra_repr(self) -> str:
        return f"k={self.k}"

    def begin_forward(self, state: TokenState, x: torch.Tensor, training: bool) -> None:
        state.size_bias = False

    def noise(self, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        """``1e-6·U(0, 1)`` of ``shape``, from ``self.generator`` when set."""
        if self.generator is None:
            return NOISE * torch.rand(shape, device=device)
        return NOISE * torch.rand(shape, generator=self.generator, device=self.generator.device).to(device)

    def extra_macs(self, n_in: int, keep: int, dim: int, num_heads: int) -> int:
        """Pairwise distances of the patch tokens, the token-weight Linear and the weighted merge."""
        return n_in * n_in * dim + 2 * n_in * dim

    def forward(self, x: torch.Tensor, keep: int, inputs: SiteInputs) -> torch.Tensor:
        state = inputs.state
        n = check_clusters("dpcknn", keep, state, x)
        z = x[:, state.num_prefix:]
        centres, assignment = dpc_knn(z, keep, self.k, self.noise((x.shape[0], n), x.device))
        weight = self.score(z).squeeze(-1).exp()
        tokens = weighted_cluster_mean(z, weight, assignment, keep)
        return replace_by_clusters(state, x, tokens, assignment, centres)
