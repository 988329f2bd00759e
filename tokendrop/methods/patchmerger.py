"""PatchMerger (Renggli et al., "Learning to Merge Tokens in Vision Transformers", 2022), as benchmarked in
"Which Tokens to Use?" (Haurum et al., ICCVW 2023): before the block, ``K`` learned queries attend over the
LayerNormed tokens; each output token is its query's attention-weighted mixture of them."""

from __future__ import annotations

import torch
from torch import nn

from ..reduction.base import SiteInputs
from ..reduction.registry import register_reducer
from .soft_merge import SoftMerger


@register_reducer("patchmerger")
class PatchMerger(SoftMerger):
    """Merge the ``N`` patch tokens ``z`` entering the block into ``keep`` tokens: ``y = LN(z)`` (learned,
    eps 1e-5), ``A = softmax(Q yᵀ · scale)`` over the tokens for the learned queries ``Q`` (K, C)
    (initialised ``randn``), output ``A y`` in query order — mixtures of LayerNormed tokens, so the
    residual-stream scale is replaced.

    ``scaled_attention=False`` (the reference's default) uses scale 1; ``True`` uses ``C^-0.5`` (as
    lucidrains' PatchMerger). Arg-max bookkeeping, slots and ``prop_attn`` as
    :class:`~tokendrop.methods.soft_merge.SoftMerger`. Train and eval are identical.
    """

    def __init__(self, dim: int, keep: int, tokens_in: int | None = None, scaled_attention: bool = False,
                 prop_attn: bool = False) -> None:
        super().__init__(dim, keep, tokens_in, prop_attn)
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.queries = nn.Parameter(torch.randn(keep, dim))
        self.scaled_attention = bool(scaled_attention)
        self.attn_scale = dim ** -0.5 if self.scaled_attention else 1.0

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scaled_attention={self.scaled_attention}"

    def extra_macs(self, n_in: int, keep: int, dim: int, num_heads: int) -> int:
        """The query logits ``Q yᵀ`` and the mixture ``A y``."""
        return 2 * keep * n_in * dim

    def forward(self, x: torch.Tensor, keep: int, inputs: SiteInputs) -> torch.Tensor:
        state = inputs.state
        self.check(keep, state, x)
        y = self.norm(x[:, state.num_prefix:])
        log_attn = (self.queries[:keep] @ y.transpose(1, 2) * self.attn_scale).log_softmax(dim=-1)  # (B, K, N)
        return self.record(state, x, log_attn.exp() @ y, log_attn.transpose(1, 2))
