"""Analytic forward MACs of TPC-ViT per image, from the per-layer token counts of a forward pass.

The backbone is counted as :func:`tokendrop.bench.flops.analytic_macs` counts a ViT, with each block on the
tokens it processed (``n_l``, prefix included). Overheads are added explicitly: the stabiliser ranks every
query–key pair by distance (``H·n_l²·d`` for ``Q·Kᵀ`` plus ``H·n_l·d`` for ``‖k‖²``) whenever ``κ < n_l``;
its attention itself is dense with the other keys masked, so ``Q·Kᵀ`` and ``A·V`` keep their dense cost.
The gates, product, regulariser and CLS accumulation cost ``4·n_l + C`` per layer. These are the MACs of
packed (or varlen) execution; ``mode="masked"`` computes every token and costs the dense model plus the
same overheads at ``n_l = N``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..bench.flops import analytic_macs
from .model import controller

__all__ = ["tpc_macs"]


def tpc_macs(model: nn.Module, img_size: int | tuple[int, int], counts: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-image MACs (float64 tensors of shape (B,)) under ``backbone``, ``stabiliser``, ``gates`` and
    ``total``, for per-layer token counts ``counts`` (L, B) — by default those of the last forward
    (:attr:`TPCStats.counts`)."""
    ctrl = controller(model)
    if ctrl is None:
        raise ValueError("model: TPC is not attached (tokendrop.attach_tpc)")
    if counts is None:
        if ctrl.stats is None:
            raise ValueError("counts: no forward has run yet; pass counts (L, B) or run the model once")
        counts = ctrl.stats.counts
    blocks = list(model.blocks)
    if counts.dim() != 2 or counts.shape[0] != len(blocks):
        raise ValueError(f"counts: expected shape ({len(blocks)}, B), got {tuple(counts.shape)}")
    columns = counts.cpu().long().T.tolist()  # per image: tokens per layer
    cache: dict[tuple[int, ...], int] = {}
    backbone = [cache.setdefault(tuple(col), analytic_macs(model, img_size, [(n, n) for n in col])) for col in columns]
    kappa = ctrl.params.kappa
    stab, gates = [], []
    for col in columns:
        s = 0
        for block, n in zip(blocks, col):
            width = int(block.attn.qkv.out_features) // 3  # H·d
            if kappa is not None and kappa < n:
                s += n * n * width + n * width  # H·n²·d + H·n·d
        stab.append(s)
        gates.append(sum(4 * n + int(blocks[0].attn.qkv.in_features) for n in col))
    out = {"backbone": torch.tensor(backbone, dtype=torch.float64), "stabiliser": torch.tensor(stab, dtype=torch.float64),
           "gates": torch.tensor(gates, dtype=torch.float64)}
    out["total"] = out["backbone"] + out["stabiliser"] + out["gates"]
    return out
