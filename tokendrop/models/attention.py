"""Self-attention on ``F.scaled_dot_product_attention`` that can also return the CLS row of the
attention matrix without materialising the ``N×N`` matrix.

It runs with the weights of a timm ``Attention`` module (ours and timm's ViT/DeiT alike), so patching a
block never copies or re-creates parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attend(attn: nn.Module, x: torch.Tensor, key_bias: torch.Tensor | None = None,
           cls_row: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Multi-head self-attention of ``x`` (B, T, C) with the parameters of timm ``Attention`` ``attn``.

    ``key_bias`` (B, T), optional, is added to every attention logit of the matching key: a mask
    (``-inf`` removes a key) or ToMe's proportional attention (``log(size)``).
    With ``cls_row=True`` also returns the attention that token 0 (CLS) pays to every token,
    averaged over heads, shape (B, T): ``mean_h softmax(q_0·Kᵀ/√d + bias)`` — O(T·d) extra work.
    The saliency is taken before attention dropout and is detached from the graph.
    """
    B, T, C = x.shape
    H, D = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    mask = None if key_bias is None else key_bias[:, None, None, :].to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    saliency = None
    if cls_row:
        with torch.no_grad():
            # float32 even under autocast: one row, O(T·d), and the ranking stays that of full precision
            logits = (q[:, :, :1].float() * attn.scale) @ k.float().transpose(-2, -1)  # (B, H, 1, T)
            if mask is not None:
                logits = logits + mask.float()
            saliency = logits.softmax(dim=-1).mean(dim=1)[:, 0]
    out = out.transpose(1, 2).reshape(B, T, H * D)
    norm = getattr(attn, "norm", None)  # timm's optional scale-norm
    if norm is not None:
        out = norm(out)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(x).sigmoid()
    out = attn.proj_drop(attn.proj(out))
    return out, saliency
