"""SiT token slimming (Zong et al., "Self-slimmed Vision Transformer", ECCV 2022), as benchmarked in "Which
Tokens to Use?" (Haurum et al., ICCVW 2023): before the block, a small MLP gives every token a logit per
output slot; each output token is the softmax-over-tokens combination of the raw tokens."""

from __future__ import annotations

import torch
from torch import nn

from ..reduction.base import SiteInputs
from ..reduction.registry import register_reducer
from .dynamicvit import init_new_module
from .soft_merge import SoftMerger


@register_reducer("sit")
class SiT(SoftMerger):
    """Token slimming of the ``N`` patch tokens ``z`` entering the block into ``keep`` tokens:
    ``W = Linear_{C/2→K}(GELU(Linear_{C→C/2}(LN(z))))`` (B, N, K), ``A = softmax(W·s)`` over the tokens
    (a learned scalar ``s``, initialised to 1), output ``Aᵀ z`` on the raw tokens, in slot order.

    Linears trunc-normal(0.02) with zero bias, LayerNorm eps 1e-5 with weight 1 and bias 0 (the
    reference's init of new modules). Arg-max bookkeeping, slots and ``prop_attn`` as
    :class:`~tokendrop.methods.soft_merge.SoftMerger`. Train and eval are identical. Build per site:
    ``attach(model, "sit", ...)`` or ``lambda f: SiT(f.dim, f.keep)``.
    """

    def __init__(self, dim: int, keep: int, tokens_in: int | None = None, prop_attn: bool = False) -> None:
        super().__init__(dim, keep, tokens_in, prop_attn, min_dim=2)
        self.mlp = nn.Sequential(nn.LayerNorm(dim, eps=1e-5), nn.Linear(dim, dim // 2), nn.GELU(),
                                     nn.Linear(dim // 2, keep))
        init_new_module(self.mlp)
        self.scale = nn.Parameter(torch.ones(1, 1, 1))

    def extra_macs(self, n_in: int, keep: int, dim: int, num_heads: int) -> int:
        """The two Linears of the weight MLP (all slots) and the combination ``Aᵀ z``."""
        hidden = dim // 2
        return n_in * dim * hidden + n_in * hidden * self.slots + keep * n_in * dim

    def forward(self, x: torch.Tensor, keep: int, inputs: SiteInputs) -> torch.Tensor:
        state = inputs.state
        self.check(keep, state, x)
        z = x[:, state.num_prefix:]
        log_weights = (self.mlp(z)[..., :keep] * self.scale).log_softmax(dim=1)  # (B, N, K), over tokens
        return self.record(state, x, log_weights.exp().transpose(1, 2) @ z, log_weights)
