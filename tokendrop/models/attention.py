"""Self-attention on ``F.scaled_dot_product_attention`` that can also hand out what token reducers need —
the CLS row of the attention, per-head value norms, head-mean keys, attention column sums — without
keeping the ``T×T`` matrix.

It runs with the weights of a timm ``Attention`` module (ours and timm's ViT/DeiT alike), so patching a
block never copies or re-creates parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
import torch.nn.functional as F
from torch import nn

POLICY_EPS = 1e-6
"""DynamicViT's softmax-with-policy epsilon."""

COLSUM_CHUNK = 256
"""Queries per chunk when summing attention columns (bounds the transient memory to chunk × T)."""


def attend(attn: nn.Module, x: torch.Tensor, key_bias: torch.Tensor | None = None,
           policy: torch.Tensor | None = None, query_mask: torch.Tensor | None = None,
           needs: Collection[str] = (),
           logit_bias: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Multi-head self-attention of ``x`` (B, T, C) with the parameters of timm ``Attention`` ``attn``.

    ``key_bias`` (B, T), optional, is added to every attention logit of the matching key: the most
    negative value removes a key, ``log(size)`` is ToMe's proportional attention.
    ``policy`` (B, T) in [0, 1], optional, is DynamicViT's training-time soft mask: query ``i`` weights key
    ``j`` by ``policy_j`` (1 for ``j = i``), ``attn = (e ⊙ P + ε/T) / (Σ e ⊙ P + ε)`` in float32 — an
    explicit ``T × T`` path, used only while a policy is active.
    ``logit_bias``, optional, is called with the (normed) queries and keys (B, H, T, D) and returns an
    additive logit bias (B, H or 1, T, T) per query and key (TPC-ViT's κ-nearest-key stabiliser).
    ``needs`` names extra outputs, returned in a dict over all T tokens: ``cls_attention`` (B, T, mean over
    heads, detached, float32), ``cls_attention_grad`` (the same with gradient), ``cls_attention_heads``
    (B, H, T), ``value_norms`` (B, H, T), ``keys`` (B, T, D, mean over heads), ``attention_colsum`` (B, T:
    attention received by each key, summed over heads and over the queries present in ``query_mask``),
    ``attention`` (B, H, T, T: the whole matrix, float32 — only for methods that need it).
    The CLS row costs O(T·d); the column sums run in query chunks. All are taken before attention dropout.
    """
    B, T, C = x.shape
    H, D = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    # Cast to the attention's dtype, keeping absent keys finite there (a fully masked row must not be NaN).
    bias = None if key_bias is None else key_bias[:, None, None, :].float()
    if logit_bias is not None:
        extra = logit_bias(q, k).float()
        bias = extra if bias is None else bias + extra
    mask = None if bias is None else bias.clamp_min(torch.finfo(q.dtype).min).to(q.dtype)
    if policy is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        out = _policy_attention(q, k, v, attn.scale, mask, policy).to(v.dtype)
    extras = _extras(q, k, v, attn.scale, mask, policy, query_mask, needs)
    out = out.transpose(1, 2).reshape(B, T, H * D)
    norm = getattr(attn, "norm", None)  # timm's optional scale-norm
    if norm is not None:
        out = norm(out)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(x).sigmoid()
    out = attn.proj_drop(attn.proj(out))
    return out, extras


def _policy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None,
                      policy: torch.Tensor) -> torch.Tensor:
    """DynamicViT's softmax with policy (float32), then ``attn @ v``."""
    return _policy_softmax(_logits(q, k, scale, mask), policy, torch.arange(q.shape[2], device=q.device)) @ v.float()


def _logits(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """float32 attention logits ``q·kᵀ·scale + bias`` for the given queries."""
    logits = (q.float() * scale) @ k.float().transpose(-2, -1)
    return logits if mask is None else logits + mask.float()


def _policy_softmax(logits: torch.Tensor, policy: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Softmax over keys weighted by ``policy``, a query always attending to itself. ``rows`` are the
    token indices of the query rows of ``logits`` (B, H, R, T)."""
    T = logits.shape[-1]
    weight = policy.float()[:, None, None, :].expand(-1, 1, rows.numel(), -1)
    self_key = torch.zeros(rows.numel(), T, device=logits.device, dtype=torch.bool)
    self_key[torch.arange(rows.numel(), device=logits.device), rows] = True
    weight = torch.where(self_key, torch.ones_like(weight), weight)
    e = (logits - logits.amax(dim=-1, keepdim=True)).exp() * weight
    return (e + POLICY_EPS / T) / (e.sum(dim=-1, keepdim=True) + POLICY_EPS)


def _softmax_rows(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None,
                  policy: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """(B, H, R, T) float32 attention probabilities of the query rows ``rows``, as the block computes them."""
    logits = _logits(q[:, :, rows], k, scale, mask)
    return logits.softmax(dim=-1) if policy is None else _policy_softmax(logits, policy, rows)


def _extras(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None,
            policy: torch.Tensor | None, query_mask: torch.Tensor | None, needs: Collection[str]) -> dict[str, torch.Tensor]:
    """The outputs named in ``needs`` (see :func:`attend`)."""
    out: dict[str, torch.Tensor] = {}
    needs = frozenset(needs)
    if not needs:
        return out
    cls_row = torch.zeros(1, dtype=torch.long, device=q.device)
    if "cls_attention_grad" in needs:
        heads = _softmax_rows(q, k, scale, mask, policy, cls_row)[:, :, 0]  # (B, H, T), with gradient
        out["cls_attention_grad"] = heads.mean(dim=1)
        heads = heads.detach()
    elif needs & {"cls_attention", "cls_attention_heads"}:
        with torch.no_grad():
            heads = _softmax_rows(q, k, scale, mask, policy, cls_row)[:, :, 0]
    if "cls_attention" in needs:
        out["cls_attention"] = heads.mean(dim=1)
    if "cls_attention_heads" in needs:
        out["cls_attention_heads"] = heads
    with torch.no_grad():
        if "value_norms" in needs:
            out["value_norms"] = v.float().norm(dim=-1)
        if "keys" in needs:
            out["keys"] = k.mean(dim=1)
        if "attention" in needs:
            out["attention"] = _softmax_rows(q, k, scale, mask, policy, torch.arange(q.shape[2], device=q.device))
        if "attention_colsum" in needs:
            out["attention_colsum"] = _attention_colsum(q, k, scale, mask, policy, query_mask)
    return out


def _attention_colsum(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None,
                      policy: torch.Tensor | None, query_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T) attention each key receives, summed over heads and present queries, in query chunks."""
    B, H, T, _ = q.shape
    total = torch.zeros(B, T, device=q.device)
    for start in range(0, T, COLSUM_CHUNK):
        rows = torch.arange(start, min(T, start + COLSUM_CHUNK), device=q.device)
        probs = _softmax_rows(q, k, scale, mask, policy, rows)  # (B, H, R, T)
        if query_mask is not None:
            probs = probs * query_mask[:, None, rows, None].float()
        total += probs.sum(dim=(1, 2))
    return total
