import torch
from timm.layers import Attention

from tokendrop.models import attend


def explicit_attention(attn, x, key_bias=None):
    """Independent reference: the full attention matrix, written out."""
    B, T, C = x.shape
    H = attn.num_heads
    D = C // H
    qkv = x @ attn.qkv.weight.T
    if attn.qkv.bias is not None:
        qkv = qkv + attn.qkv.bias
    q, k, v = qkv.reshape(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / D ** 0.5
    if key_bias is not None:
        logits = logits + key_bias[:, None, None, :]
    A = logits.softmax(-1)
    out = (A @ v).transpose(1, 2).reshape(B, T, C) @ attn.proj.weight.T + attn.proj.bias
    return out, A


def test_cls_row_equals_explicit_matrix():
    torch.manual_seed(1)
    attn = Attention(48, num_heads=6, qkv_bias=True).eval()
    x = torch.randn(3, 17, 48)
    out, sal = attend(attn, x, cls_row=True)
    ref_out, A = explicit_attention(attn, x)
    torch.testing.assert_close(sal, A.mean(1)[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert not sal.requires_grad


def test_key_bias_and_proportional_attention():
    torch.manual_seed(2)
    attn = Attention(24, num_heads=3).eval()
    x = torch.randn(2, 9, 24)
    bias = torch.randn(2, 9)
    out, sal = attend(attn, x, key_bias=bias, cls_row=True)
    ref_out, A = explicit_attention(attn, x, bias)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sal, A.mean(1)[:, 0], atol=1e-5, rtol=0)
    # log(size) bias: a token of size 2 acts on every query like two copies of itself
    dup = torch.cat([x, x[:, -1:]], dim=1)
    out_dup, _ = attend(attn, dup)
    size = torch.ones(2, 9)
    size[:, -1] = 2
    out_size, _ = attend(attn, x, key_bias=size.log())
    torch.testing.assert_close(out_size, out_dup[:, :9], atol=1e-5, rtol=1e-5)
