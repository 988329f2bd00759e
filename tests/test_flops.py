"""Tests for tokendrop.bench.flops: measured vs closed-form MAC counts."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from timm.models.vision_transformer import Attention, VisionTransformer

from tokendrop.bench.flops import (
    SDPA_CPU_FLOP_MAPPING,
    analytic_macs,
    block_token_counts,
    count_macs,
    count_train_macs,
)


# --------------------------------------------------------------------------- helpers
class ConvStem(nn.Module):
    """Tiny conv stem usable as VisionTransformer ``embed_layer``: 32x32 -> 8x8 tokens.

    Includes a strided, a dilated depthwise and a padded strided conv so that the
    analytic output-size arithmetic is exercised.
    """

    def __init__(self, img_size=32, patch_size=4, in_chans=3, embed_dim=48, bias=True,
                 dynamic_img_pad=False, **kwargs):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, 8, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=1, padding=2, dilation=2, groups=16, bias=False),
            nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, embed_dim, 3, stride=2, padding=1, bias=bias),
        )
        self.grid_size = (img_size // 4, img_size // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def feat_ratio(self, as_scalar=True):
        return 4

    def forward(self, x):
        return self.stem(x).flatten(2).transpose(1, 2)  # (B, N, C)


def small_vit(**kw) -> VisionTransformer:
    args = dict(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3, num_classes=10)
    args.update(kw)
    return VisionTransformer(**args).eval()


class InsideDropBlock(nn.Module):
    """Attention on all tokens, then keep prefix + first ``keep`` patch tokens for the MLP."""

    def __init__(self, block: nn.Module, keep: int, num_prefix: int):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp
        self.keep, self.num_prefix = keep, num_prefix

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        x = x[:, : self.num_prefix + self.keep]
        return x + self.mlp(self.norm2(x))


def rel_err(a: int, b: int) -> float:
    return abs(a - b) / max(abs(b), 1)


# --------------------------------------------------------------------------- hand-written
def test_hand_written_linear_and_attention():
    torch.manual_seed(0)
    B, N, C, H = 1, 5, 8, 2
    d = C // H
    x = torch.randn(B, N, C)
    assert count_macs(nn.Linear(C, 3 * C), x) == N * C * 3 * C  # 960

    attn = Attention(C, num_heads=H, qkv_bias=True).eval()
    attn.fused_attn = True  # force F.scaled_dot_product_attention
    expected = (N * C * 3 * C          # qkv   960
                + H * N * N * d        # q@k^T 200
                + H * N * N * d        # a@v   200
                + N * C * C)           # proj  320
    assert expected == 1680
    assert count_macs(attn, x) == expected
    attn.fused_attn = False  # explicit q @ k^T / attn @ v path
    assert count_macs(attn, x) == expected


def test_hand_written_tiny_vit():
    # img 8, patch 4 -> 4 patches + cls = 5 tokens, C=8, H=2, hidden=32, 10 classes.
    m = VisionTransformer(img_size=8, patch_size=4, embed_dim=8, depth=1, num_heads=2,
                          mlp_ratio=4.0, num_classes=10).eval()
    N, C, H, d, hid = 5, 8, 2, 4, 32
    patch = C * 3 * 4 * 4 * 2 * 2
    block = N * C * 3 * C + 2 * H * N * N * d + N * C * C + N * (C * hid + hid * C)
    head = C * 10
    expected = patch + block + head
    assert expected == 5856
    assert analytic_macs(m, 8) == expected
    assert count_macs(m, torch.randn(1, 3, 8, 8)) == expected


# --------------------------------------------------------------------------- agreement
@pytest.mark.parametrize("batch", [1, 3])
def test_count_matches_analytic_timm_vit(batch):
    torch.manual_seed(0)
    m = small_vit()
    measured = count_macs(m, torch.randn(batch, 3, 32, 32))
    expected = batch * analytic_macs(m, 32)
    assert measured > 0
    assert rel_err(measured, expected) < 0.02
    assert measured == expected  # both count exactly the same op set


def test_count_matches_analytic_non_square_and_avg_pool():
    m = small_vit(img_size=(32, 24), global_pool="avg", class_token=False, mlp_ratio=2.0)
    assert m.patch_embed.num_patches == 8 * 6
    measured = count_macs(m, torch.randn(1, 3, 32, 24))
    assert measured == analytic_macs(m, (32, 24))


def test_count_matches_analytic_conv_stem():
    torch.manual_seed(0)
    m = small_vit(embed_layer=ConvStem)
    assert m.patch_embed.num_patches == 64
    measured = count_macs(m, torch.randn(2, 3, 32, 32))
    expected = 2 * analytic_macs(m, 32)
    assert rel_err(measured, expected) < 0.02
    assert measured == expected
    # The stem convs by hand: 32x32 -> 32x32 -> 16x16 -> 16x16 -> 8x8.
    stem = (8 * 3 * 9 * 32 * 32 + 16 * 8 * 9 * 16 * 16 + 16 * 1 * 9 * 16 * 16
            + 48 * 16 * 9 * 8 * 8)
    no_stem = small_vit()  # same transformer, patchify conv 48*3*4*4*8*8
    assert analytic_macs(m, 32) - stem == analytic_macs(no_stem, 32) - 48 * 3 * 16 * 64


# --------------------------------------------------------------------------- reduction
def test_block_token_counts():
    assert block_token_counts(65, 1, 3, {}) == [(65, 65)] * 3
    assert block_token_counts(65, 1, 3, {0: 32}) == [(65, 33), (33, 33), (33, 33)]
    assert block_token_counts(65, 1, 4, {1: 40, 3: 10}) == [(65, 65), (65, 41), (41, 41), (41, 11)]
    assert block_token_counts(10, 0, 2, {0: 0}) == [(10, 0), (0, 0)]
    with pytest.raises(ValueError):
        block_token_counts(65, 1, 3, {3: 10})  # block index out of range
    with pytest.raises(ValueError):
        block_token_counts(65, 1, 3, {0: 65})  # only 64 patch tokens exist
    with pytest.raises(ValueError):
        block_token_counts(65, 1, 3, {0: 32, 1: 40})  # cannot grow again


def test_analytic_with_reduction_hand_written():
    m = small_vit()  # 64 patches + cls, C=48, H=3, d=16, hidden=192, depth 3
    k = 20
    tokens = block_token_counts(65, 1, 3, {0: k})
    assert tokens == [(65, 21), (21, 21), (21, 21)]
    C, H, d, hid = 48, 3, 16, 192

    def attn(n):
        return n * C * 3 * C + 2 * H * n * n * d + n * C * C

    def mlp(n):
        return n * 2 * C * hid

    expected = (48 * 3 * 4 * 4 * 8 * 8
                + attn(65) + mlp(21)
                + attn(21) + mlp(21)
                + attn(21) + mlp(21)
                + C * 10)
    assert analytic_macs(m, 32, tokens) == expected
    assert analytic_macs(m, 32, tokens) < analytic_macs(m, 32)


def test_count_matches_analytic_with_inside_reduction():
    torch.manual_seed(0)
    m = small_vit()
    m.blocks[1] = InsideDropBlock(m.blocks[1], keep=24, num_prefix=1)
    tokens = block_token_counts(65, 1, 3, {1: 24})
    measured = count_macs(m, torch.randn(1, 3, 32, 32))
    assert measured == analytic_macs(m, 32, tokens)
    assert measured != analytic_macs(m, 32)


def test_token_length_mismatch_raises():
    m = small_vit()
    with pytest.raises(ValueError, match="blocks"):
        analytic_macs(m, 32, [(65, 65)] * 2)
    with pytest.raises(ValueError):
        analytic_macs(m, 32, [])


# --------------------------------------------------------------------------- SDPA on CPU
def test_cpu_sdpa_counted_like_math_backend():
    torch.manual_seed(0)
    m = small_vit()
    assert all(b.attn.fused_attn for b in m.blocks)
    x = torch.randn(2, 3, 32, 32)
    fused = count_macs(m, x)
    with sdpa_kernel(SDPBackend.MATH):
        math = count_macs(m, x)
    assert math > 0
    assert rel_err(fused, math) < 1e-3

    # Ours adds a formula only where torch has none, so no kernel is counted twice (torch 2.15 has one).
    assert not any(op in flop_registry or op.default in flop_registry for op in SDPA_CPU_FLOP_MAPPING)


def test_cpu_sdpa_mapping_is_what_makes_counts_agree():
    """Whatever torch provides plus our mapping counts the fused kernel like the math backend; a wrong
    formula for the fused kernel (here: zero) would break the agreement, so the check can fail."""
    torch.manual_seed(0)
    m = small_vit()
    x = torch.randn(2, 3, 32, 32)
    with sdpa_kernel(SDPBackend.MATH):
        math = count_macs(m, x)
    zero = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda *a, **k: 0}
    broken = FlopCounterMode(display=False, custom_mapping=zero)
    with torch.no_grad(), broken:
        m(x)
    assert math - broken.get_total_flops() // 2 == 2 * 3 * (2 * 3 * 65 * 65 * 16)  # batch * depth * (QK^T + AV)


def test_count_train_macs():
    torch.manual_seed(0)
    m = small_vit()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    fwd = count_macs(m, x)
    train = count_train_macs(m, x, y)
    assert not m.training  # mode restored
    assert all(p.grad is None for p in m.parameters())  # grads zeroed
    # Backward of every matmul/conv is about 2x its forward (the first conv has no
    # input grad; flash-attention backward recomputes the scores), so ~3x in total.
    assert 2.5 * fwd < train < 3.5 * fwd
    with sdpa_kernel(SDPBackend.MATH):
        train_math = count_train_macs(m, x, y)
    # The flash backward recomputes QK^T (one extra B*H*N^2*d per block) vs the math path.
    assert train - train_math == 3 * (2 * 3 * 65 * 65 * 16)
