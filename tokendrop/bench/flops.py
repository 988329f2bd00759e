"""Multiply-accumulate (MAC) counting for ViT-style models, two independent ways.

* :func:`count_macs` / :func:`count_train_macs` *measure* MACs by running the model
  under :class:`torch.utils.flop_counter.FlopCounterMode`.
* :func:`analytic_macs` *computes* forward MACs in closed form from the module
  sizes and per-block token counts (see :func:`block_token_counts`).

Both count the same set of operations: matrix multiplies (linear / mm / bmm /
matmul), convolutions and scaled-dot-product attention (QK^T and AV).
Elementwise and normalisation work (LayerNorm, BatchNorm, GELU/ReLU, softmax,
bias / residual / LayerScale / positional-embedding adds, pooling) is counted by
neither, so the two agree up to those exclusions.

One MAC = one multiply + one add = 2 FLOPs; FlopCounterMode counts FLOPs, so the
measured numbers are divided by two.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

__all__ = [
    "SDPA_CPU_FLOP_MAPPING",
    "flop_counter",
    "count_macs",
    "count_train_macs",
    "analytic_macs",
    "block_token_counts",
    "conv_out_size",
]

_aten = torch.ops.aten


def _as_4d(shape: Iterable[int]) -> tuple[int, ...]:
    """Left-pad a (…, seq, dim) shape with ones to 4-D (batch, heads, seq, dim)."""
    s = tuple(int(v) for v in shape)
    if len(s) > 4:  # fold extra leading batch dims into the batch dim
        b = 1
        for v in s[:-3]:
            b *= v
        s = (b, *s[-3:])
    return (1,) * (4 - len(s)) + s


def _sdpa_cpu_flop(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any,
                   out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of ``aten._scaled_dot_product_flash_attention_for_cpu`` (QK^T + AV)."""
    return sdpa_flop_count(_as_4d(query_shape), _as_4d(key_shape), _as_4d(value_shape))


def _sdpa_cpu_backward_flop(grad_out_shape: Any, query_shape: Any, key_shape: Any,
                            value_shape: Any, *args: Any, out_shape: Any = None,
                            **kwargs: Any) -> int:
    """FLOPs of ``aten._scaled_dot_product_flash_attention_for_cpu_backward``."""
    return sdpa_backward_flop_count(_as_4d(grad_out_shape), _as_4d(query_shape),
                                    _as_4d(key_shape), _as_4d(value_shape))


def _torch_counts(op: Any) -> bool:
    """Whether torch's own FlopCounterMode has a formula for ``op`` (keyed by packet or overload)."""
    return op in flop_registry or getattr(op, "default", None) in flop_registry


def _build_cpu_mapping() -> dict[Any, Callable[..., int]]:
    mapping: dict[Any, Callable[..., int]] = {}
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu_flop),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_cpu_backward_flop)):
        op = getattr(_aten, name, None)
        if op is not None and not _torch_counts(op):
            mapping[op] = formula
    return mapping


#: ``custom_mapping`` for FlopCounterMode adding the CPU flash-attention kernels where the installed
#: torch has no formula of its own (up to torch 2.14 they count as 0 FLOPs; torch 2.15 counts them,
#: and then this mapping is empty, so nothing is counted twice).
#: Formulas receive shapes (FlopCounterMode wraps them with ``shape_wrapper``).
SDPA_CPU_FLOP_MAPPING: dict[Any, Callable[..., int]] = _build_cpu_mapping()


def flop_counter(display: bool = False) -> FlopCounterMode:
    """A FlopCounterMode that also counts SDPA on the CPU (forward and backward)."""
    return FlopCounterMode(display=display, custom_mapping=dict(SDPA_CPU_FLOP_MAPPING))


def count_macs(model: nn.Module, inputs: torch.Tensor) -> int:
    """Measured MACs of one forward pass of ``model(inputs)`` (whole batch).

    Runs under ``torch.no_grad()`` and :func:`flop_counter`; returns FLOPs // 2.
    Counts matmul/linear/conv/SDPA only; elementwise ops (LayerNorm, BatchNorm,
    GELU, softmax, adds) are not counted. The model's train/eval mode is left as is.
    """
    counter = flop_counter()
    with torch.no_grad(), counter:
        model(inputs)
    return int(counter.get_total_flops()) // 2


def count_train_macs(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> int:
    """Measured MACs of forward + backward of cross-entropy loss (whole batch).

    The model is put in train mode for the step (its previous mode is restored
    afterwards) and its gradients are zeroed (set to ``None``) afterwards. Counts
    matmul/linear/conv/SDPA only, like :func:`count_macs`; elementwise ops are not
    counted.
    """
    was_training = model.training
    model.train()
    counter = flop_counter()
    try:
        with torch.enable_grad(), counter:
            logits = model(inputs)
            loss = F.cross_entropy(logits, targets)
            loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return int(counter.get_total_flops()) // 2


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) == 1:
            return int(v[0]), int(v[0])
        return int(v[0]), int(v[1])
    return int(v), int(v)


def conv_out_size(size: int, kernel: int, stride: int = 1, padding: int = 0,
                  dilation: int = 1) -> int:
    """Output length of a convolution along one spatial dimension."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _conv2d_macs(conv: nn.Conv2d, h: int, w: int) -> tuple[int, int, int]:
    """(MACs, H_out, W_out) of ``conv`` on an (h, w) input, per image."""
    kh, kw = _pair(conv.kernel_size)
    sh, sw = _pair(conv.stride)
    dh, dw = _pair(conv.dilation)
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            h_out = conv_out_size(h, kh, sh, 0, dh)
            w_out = conv_out_size(w, kw, sw, 0, dw)
        elif conv.padding == "same":  # torch only allows 'same' with stride 1
            h_out, w_out = h, w
        else:
            raise ValueError(f"unsupported conv padding {conv.padding!r}")
    else:
        ph, pw = _pair(conv.padding)
        h_out = conv_out_size(h, kh, sh, ph, dh)
        w_out = conv_out_size(w, kw, sw, pw, dw)
    if h_out <= 0 or w_out <= 0:
        raise ValueError(f"conv {conv} gives empty output for a {h}x{w} input")
    macs = conv.out_channels * (conv.in_channels // conv.groups) * kh * kw * h_out * w_out
    return macs, h_out, w_out


def _patch_embed_macs(patch_embed: nn.Module, img_size: tuple[int, int]) -> int:
    """MACs of the Conv2d layers of ``patch_embed``, walked in module order."""
    h, w = img_size
    total = 0
    for m in patch_embed.modules():
        if isinstance(m, nn.Conv2d):
            macs, h, w = _conv2d_macs(m, h, w)
            total += macs
        elif isinstance(m, nn.Linear):  # e.g. a linear patch projection
            raise ValueError("analytic_macs: Linear layers in patch_embed are not supported")
    return total


def _block_macs(block: nn.Module, n_attn: int, n_mlp: int) -> int:
    """Forward MACs of one pre-norm transformer block, per image."""
    attn = block.attn
    qkv: nn.Linear = attn.qkv
    proj: nn.Linear = attn.proj
    num_heads = int(attn.num_heads)
    attn_dim = qkv.out_features // 3  # A = H * d
    head_dim = int(getattr(attn, "head_dim", attn_dim // num_heads))
    if num_heads * head_dim != attn_dim:
        raise ValueError(f"inconsistent attention sizes: {num_heads} heads x {head_dim} "
                         f"!= qkv.out_features / 3 = {attn_dim}")
    macs = n_attn * qkv.in_features * qkv.out_features  # qkv: C -> 3A
    gate = getattr(attn, "gate", None)
    if isinstance(gate, nn.Linear):  # optional gated attention (extra C -> A linear)
        macs += n_attn * gate.in_features * gate.out_features
    macs += num_heads * n_attn * n_attn * head_dim  # q @ k^T
    macs += num_heads * n_attn * n_attn * head_dim  # softmax(.) @ v
    macs += n_attn * proj.in_features * proj.out_features  # proj: A -> C
    for m in block.mlp.modules():  # fc1, fc2 (and any other linear in the MLP)
        if isinstance(m, nn.Linear):
            macs += n_mlp * m.in_features * m.out_features
    return macs


def block_token_counts(num_tokens: int, num_prefix: int, depth: int, keeps: dict[int, int],
                       before: dict[int, int] | None = None) -> list[tuple[int, int]]:
    """Per-block ``(n_attn, n_mlp)`` token counts, prefix tokens included.

    ``num_tokens`` enters block 0 (patches + prefix). ``keeps[i] = k`` means block ``i`` does an *inside*
    reduction: attention sees the current tokens, then ``k`` patch tokens (plus all ``num_prefix`` prefix
    tokens) go to the MLP and to all later blocks. ``before[i] = k`` means the tokens are reduced to ``k``
    patch tokens *before* block ``i``, so its attention already sees them. Prefix tokens are never dropped.
    """
    before = before or {}
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    if not 0 <= num_prefix <= num_tokens:
        raise ValueError(f"need 0 <= num_prefix ({num_prefix}) <= num_tokens ({num_tokens})")
    bad = [i for i in (*keeps, *before) if not 0 <= i < depth]
    if bad:
        raise ValueError(f"keeps has block indices {bad} outside [0, {depth})")
    both = sorted(set(keeps) & set(before))
    if both:
        raise ValueError(f"block {both[0]} has both an inside and a before reduction")
    out: list[tuple[int, int]] = []
    n = num_tokens
    for i in range(depth):
        for table, where in ((before, "before"), (keeps, "inside")):
            if i in table:
                k = int(table[i])
                if not 0 <= k <= n - num_prefix:
                    raise ValueError(f"block {i}: cannot keep {k} patch tokens out of {n - num_prefix} ({where})")
                if where == "before":
                    n = num_prefix + k
                else:
                    out.append((n, num_prefix + k))
                    n = num_prefix + k
        if len(out) == i:
            out.append((n, n))
    return out


def analytic_macs(model: nn.Module, img_size: int | tuple[int, int],
                  tokens: list[tuple[int, int]] | None = None) -> int:
    """Closed-form forward MACs of a ViT for ONE image.

    Sums: every ``nn.Conv2d`` of ``model.patch_embed`` (walked in module order,
    output sizes from kernel/stride/padding/dilation), and per block ``i`` with
    ``tokens[i] = (n_attn, n_mlp)`` (prefix tokens included): qkv ``n_attn*C*3A``,
    ``QK^T`` and ``AV`` ``H*n_attn^2*d`` each, proj ``n_attn*A*C``, MLP linears on
    ``n_mlp`` tokens; plus the head on one pooled vector (or on every token if the
    model does not pool). ``tokens=None`` means no reduction (every block sees
    ``num_patches + num_prefix_tokens``). Elementwise ops (norms, activations,
    softmax, adds) are not counted, matching :func:`count_macs`.
    """
    if isinstance(img_size, int):
        hw = (img_size, img_size)
    else:
        hw = (int(img_size[0]), int(img_size[1]))
    blocks = list(model.blocks)
    num_prefix = int(getattr(model, "num_prefix_tokens", 0))
    if tokens is None:
        n0 = int(model.patch_embed.num_patches) + num_prefix
        tokens = [(n0, n0)] * len(blocks)
    if len(tokens) != len(blocks):
        raise ValueError(f"tokens has {len(tokens)} entries but the model has "
                         f"{len(blocks)} blocks")

    total = _patch_embed_macs(model.patch_embed, hw)
    for block, (n_attn, n_mlp) in zip(blocks, tokens):
        total += _block_macs(block, int(n_attn), int(n_mlp))

    if getattr(model, "attn_pool", None) is not None:
        raise ValueError("analytic_macs: attention-pooling heads are not supported")
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        n_last = int(tokens[-1][1]) if tokens else int(model.patch_embed.num_patches) + num_prefix
        pool = getattr(model, "global_pool", "token")
        n_head = n_last if pool in ("", None) else 1  # '' = no pooling: per-token head
        total += n_head * head.in_features * head.out_features
    return total


_CLS_ROW_INPUTS = frozenset({"cls_attention", "cls_attention_grad", "cls_attention_heads"})


def site_input_macs(needs: frozenset[str], tokens: int, dim: int, num_heads: int) -> int:
    """MACs per image a site spends computing the inputs a method asked for, with ``tokens`` tokens (prefix
    included) in the block: the CLS row ``q_cls·Kᵀ`` (once, however many CLS-row inputs), the whole
    attention ``Q·Kᵀ`` again, or the previous block's column sums (``Q·Kᵀ`` there). Norms, means and
    softmaxes are elementwise and not counted, as everywhere here."""
    head_dim = dim // num_heads
    macs = num_heads * tokens * head_dim if needs & _CLS_ROW_INPUTS else 0
    for name in ("attention", "prev_attention_colsum"):
        if name in needs:
            macs += num_heads * tokens * tokens * head_dim
    return macs


def attached_macs(model: nn.Module, img_size: int | tuple[int, int], training: bool = True,
                  overhead: bool = True) -> int:
    """Closed-form forward MACs per image with the model's attached reduction sites at their current
    epoch (``training`` selects which sites are active); each site counts the tokens its reducer's
    ``output_count`` says leave it, at its position. ``overhead`` adds what the sites and methods spend
    deciding: the site inputs they ask for (:func:`site_input_macs`) and each method's own
    ``extra_macs`` (predictor MLPs, similarities)."""
    from ..reduction import site_plans

    prefix = int(getattr(model, "num_prefix_tokens", 1))
    plans = site_plans(model, training)
    keeps = {p.site.block: p.tokens_out for p in plans if p.site.position == "inside"}
    before = {p.site.block: p.tokens_out for p in plans if p.site.position == "before"}
    tokens = block_token_counts(model.patch_embed.num_patches + prefix, prefix, len(model.blocks), keeps, before)
    total = analytic_macs(model, img_size, tokens)
    if overhead:
        for p in plans:
            if not p.reduces:
                continue
            attn = model.blocks[p.site.block].attn
            dim, heads = int(attn.qkv.in_features), int(attn.num_heads)
            reducer = p.site.reducer
            n_attn = tokens[p.site.block][0] if p.site.position == "inside" else prefix + p.tokens_in
            total += site_input_macs(reducer.needs, n_attn, dim, heads)
            total += int(reducer.extra_macs(p.tokens_in, p.keep, dim, heads))
    return total
