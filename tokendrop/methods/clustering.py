"""Pieces shared by the hard-clustering methods (K-Medoids, DPC-KNN): exact pairwise distances, nearest
centres, and handing the clusters to the token state with each output token's centre as its source."""

from __future__ import annotations

import torch

from ..reduction.state import TokenState


def check_clusters(name: str, keep: int, state: TokenState, x: torch.Tensor) -> int:
    """The patch-token count of ``x``; ``ValueError`` for more clusters than tokens, and padded tokens
    (per-image counts from an earlier site) are not supported by the clustering methods."""
    n = x.shape[1] - state.num_prefix
    if not 1 <= keep <= n:
        raise ValueError(f"keep: {keep} clusters for {n} tokens is outside the allowed range [1, {n}] ({name})")
    if state.key_mask is not None:
        raise NotImplementedError(f"{name}: clustering tokens padded to per-image counts is not supported")
    return n


def pairwise_distances(z: torch.Tensor) -> torch.Tensor:
    """(B, N, N) Euclidean distances of the tokens ``z`` (B, N, C), computed exactly (not through the
    matrix-product expansion, whose rounding leaves non-zero self-distances and flips near-tied argmins)."""
    return torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist")


def nearest_centre(dist: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(B, N) index into ``centres`` (B, K) of the nearest centre of every token, by ``dist`` (B, N, N);
    ties go to the first centre."""
    B, n, _ = dist.shape
    return dist.gather(2, centres.unsqueeze(1).expand(B, n, -1)).argmin(dim=-1)


def replace_by_clusters(state: TokenState, x: torch.Tensor, tokens: torch.Tensor, assignment: torch.Tensor,
                        centres: torch.Tensor) -> torch.Tensor:
    """Replace the patch tokens by ``tokens`` (B, K, C), one per cluster. ``assignment`` (B, N) is each
    current token's cluster; ``centres`` (B, K) the current token at each cluster's centre, whose original
    patch becomes the cluster token's ``source`` (so an analysis can treat centres as kept tokens).
    Sizes become the summed sizes of the members (cluster sizes in original patches)."""
    source = torch.gather(state.current_source(x), 1, centres)
    return state.replace(x, tokens, assignment, source=source)
