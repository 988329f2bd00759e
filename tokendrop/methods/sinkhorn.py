"""Sinkhorn token merging as benchmarked in "Which Tokens to Use?" (Haurum et al., ICCVW 2023): before the
block, an entropic optimal-transport plan between the unit-length tokens and ``K`` learned unit-length
centres; each output token is the plan-weighted sum of the unit tokens."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..reduction.base import SiteInputs
from ..reduction.registry import register_reducer
from .soft_merge import SoftMerger


def log_sinkhorn(scores: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """The log transport weights (B, N, K) of tokens over clusters for similarities ``scores`` (B, N, K),
    in float32.

    Log-space Sinkhorn on ``Z = scoresᵀ / eps`` with the unbalanced marginals ``log μ = log ν = −log(K+N)``
    (no dustbin), from ``u = v = 0``: ``iters`` times ``u = log μ − LSE_n(Z + v)``, then
    ``v = log ν − LSE_k(Z + u)``; the plan is ``exp(Z + u + v + log(K+N))``, so after the last step every
    token's weights sum to 1."""
    logits = scores.transpose(1, 2).float() / eps  # (B, K, N)
    B, K, N = logits.shape
    log_marginal = -math.log(K + N)
    u = logits.new_zeros(B, K, 1)
    v = logits.new_zeros(B, 1, N)
    for _ in range(iters):
        u = log_marginal - torch.logsumexp(logits + v, dim=2, keepdim=True)
        v = log_marginal - torch.logsumexp(logits + u, dim=1, keepdim=True)
    return (logits + u + v - log_marginal).transpose(1, 2)


@register_reducer("sinkhorn")
class Sinkhorn(SoftMerger):
    """Merge the ``N`` patch tokens ``z`` entering the block into ``keep`` tokens: with ``ẑ = z / ‖z‖`` and
    learned centres ``V`` (K, C) (initialised ``randn`` and, at every forward in train and eval, first
    renormalised to unit rows in place without gradient), the plan ``W`` = :func:`log_sinkhorn` of
    ``ẑ Vᵀ`` (``eps``, ``iters``); output ``Wᵀ ẑ`` in centre order — *sums* of unit vectors, so the tokens'
    magnitude is lost (as the reference).

    Arg-max bookkeeping, slots and ``prop_attn`` as :class:`~tokendrop.methods.soft_merge.SoftMerger`
    (with fewer slots than centres, the first ``keep`` centres and ``K = keep`` in the marginals).
    """

    def __init__(self, dim: int, keep: int, tokens_in: int | None = None, eps: float = 1.0, iters: int = 3,
                 prop_attn: bool = False) -> None:
        super().__init__(dim, keep, tokens_in, prop_attn)
        if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps < math.inf):
            raise ValueError(f"eps: {eps!r} is outside the allowed range (0, inf)")
        if not (isinstance(iters, int) and not isinstance(iters, bool) and iters >= 1):
            raise ValueError(f"iters: {iters!r} is outside the allowed range [1, inf)")
        self.eps = float(eps)
        self.iters = iters
        self.centres = nn.Parameter(torch.randn(keep, dim))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}, iters={self.iters}"

    def extra_macs(self, n_in: int, keep: int, dim: int, num_heads: int) -> int:
        """The similarities ``ẑ Vᵀ`` and the weighted sums ``Wᵀ ẑ`` (the normalisations and log-sum-exps are
        elementwise, which no MAC count includes)."""
        return 2 * keep * n_in * dim

    def forward(self, x: torch.Tensor, keep: int, inputs: SiteInputs) -> torch.Tensor:
        state = inputs.state
        self.check(keep, state, x)
        with torch.no_grad():
            self.centres.copy_(F.normalize(self.centres, dim=1))
        unit = F.normalize(x[:, state.num_prefix:], dim=-1)
        log_weights = log_sinkhorn(unit @ self.centres[:keep].T, self.eps, self.iters)  # (B, N, K)
        return self.record(state, x, log_weights.exp().to(unit.dtype).transpose(1, 2) @ unit, log_weights)
