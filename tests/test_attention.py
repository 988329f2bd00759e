import pytest
import torch
from timm.layers import Attention

from tokendrop.models import attend
from tokendrop.models.attention import COLSUM_CHUNK


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
    return out, A, k, v


def test_cls_row_equals_explicit_matrix():
    torch.manual_seed(1)
    attn = Attention(48, num_heads=6, qkv_bias=True).eval()
    x = torch.randn(3, 17, 48)
    out, extras = attend(attn, x, needs={"cls_attention", "cls_attention_heads", "value_norms", "keys"})
    ref_out, A, k, v = explicit_attention(attn, x)
    torch.testing.assert_close(extras["cls_attention"], A.mean(1)[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(extras["cls_attention_heads"], A[:, :, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(extras["value_norms"], v.norm(dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(extras["keys"], k.mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert not extras["cls_attention"].requires_grad
    _, none = attend(attn, x)
    assert none == {}


def test_cls_row_with_gradient():
    torch.manual_seed(3)
    attn = Attention(24, num_heads=3).eval()
    x = torch.randn(2, 7, 24, requires_grad=True)
    _, extras = attend(attn, x, needs={"cls_attention_grad"})
    row = extras["cls_attention_grad"]
    _, A, _, _ = explicit_attention(attn, x)
    torch.testing.assert_close(row, A.mean(1)[:, 0], atol=1e-5, rtol=0)
    (row[:, 3] * 2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_attention_colsum_in_chunks(monkeypatch):
    torch.manual_seed(4)
    attn = Attention(24, num_heads=3).eval()
    x = torch.randn(2, 11, 24)
    query_mask = torch.ones(2, 11, dtype=torch.bool)
    query_mask[1, 4:7] = False
    monkeypatch.setattr("tokendrop.models.attention.COLSUM_CHUNK", 4)  # several chunks
    _, extras = attend(attn, x, query_mask=query_mask, needs={"attention_colsum"})
    _, A, _, _ = explicit_attention(attn, x)
    ref = (A * query_mask[:, None, :, None]).sum(dim=(1, 2))
    torch.testing.assert_close(extras["attention_colsum"], ref, atol=1e-5, rtol=1e-5)
    assert COLSUM_CHUNK >= 64


def test_key_bias_and_proportional_attention():
    torch.manual_seed(2)
    attn = Attention(24, num_heads=3).eval()
    x = torch.randn(2, 9, 24)
    bias = torch.randn(2, 9)
    out, extras = attend(attn, x, key_bias=bias, needs={"cls_attention"})
    ref_out, A, _, _ = explicit_attention(attn, x, bias)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(extras["cls_attention"], A.mean(1)[:, 0], atol=1e-5, rtol=0)
    # log(size) bias: a token of size 2 acts on every query like two copies of itself
    dup = torch.cat([x, x[:, -1:]], dim=1)
    out_dup, _ = attend(attn, dup)
    size = torch.ones(2, 9)
    size[:, -1] = 2
    out_size, _ = attend(attn, x, key_bias=size.log())
    torch.testing.assert_close(out_size, out_dup[:, :9], atol=1e-5, rtol=1e-5)


def test_masked_key_equals_removed_and_fully_masked_row_is_finite():
    torch.manual_seed(5)
    attn = Attention(24, num_heads=3).eval()
    x = torch.randn(2, 9, 24)
    keep = [0, 1, 3, 4, 8]
    bias = torch.full((2, 9), torch.finfo(torch.float32).min)
    bias[:, keep] = 0.0
    out_masked, _ = attend(attn, x, key_bias=bias)
    out_removed, _ = attend(attn, x[:, keep])
    torch.testing.assert_close(out_masked[:, keep], out_removed, atol=1e-5, rtol=1e-5)
    everything = torch.full((2, 9), torch.finfo(torch.float32).min)
    out_all, _ = attend(attn, x, key_bias=everything)
    assert torch.isfinite(out_all).all()
    if torch.cuda.is_available():  # bf16: the most negative float32 must not become -inf there
        a = attn.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out_bf16, _ = attend(a, x.cuda(), key_bias=everything.cuda())
        assert torch.isfinite(out_bf16).all()


def naive_policy_attention(attn, x, policy, eps=1e-6):
    """DynamicViT's softmax_with_policy, written from its spec with loops over queries."""
    B, T, C = x.shape
    H = attn.num_heads
    D = C // H
    q, k, v = (x @ attn.qkv.weight.T).reshape(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / D ** 0.5
    rows = []
    for i in range(T):
        P = policy.clone()  # (B, T)
        P[:, i] = policy[:, i] + (1 - policy[:, i])  # a token always attends to itself
        li = logits[:, :, i, :]
        e = (li - li.max(dim=-1, keepdim=True).values).exp() * P[:, None, :]
        rows.append((e + eps / T) / (e.sum(-1, keepdim=True) + eps))
    A = torch.stack(rows, dim=2)
    return (A @ v).transpose(1, 2).reshape(B, T, C) @ attn.proj.weight.T + attn.proj.bias


def test_policy_attention_matches_dynamicvit_formula():
    torch.manual_seed(6)
    attn = Attention(24, num_heads=3, qkv_bias=False).eval()
    x = torch.randn(2, 8, 24)
    policy = torch.tensor([[1, 1, 0, 1, 0, 0, 1, 1], [1, 0, 0, 0, 1, 1, 1, 0]], dtype=torch.float32)
    out, extras = attend(attn, x, policy=policy, needs={"cls_attention"})
    torch.testing.assert_close(out, naive_policy_attention(attn, x, policy), atol=1e-5, rtol=1e-5)
    # present tokens are not influenced by dropped ones (up to the eps floor)
    present = policy[0].bool()
    y = x.clone()
    y[0, ~present] += 5 * torch.randn_like(y[0, ~present])
    out_y, _ = attend(attn, y, policy=policy)
    torch.testing.assert_close(out_y[0, present], out[0, present], atol=1e-4, rtol=1e-4)
    # gradient reaches the policy (straight-through training)
    pol = policy.clone().requires_grad_(True)
    attend(attn, x, policy=pol)[0].sum().backward()
    assert pol.grad is not None and pol.grad.abs().sum() > 0


@pytest.mark.parametrize("needs", [{"keys"}, {"value_norms"}])
def test_extras_are_detached(needs):
    attn = Attention(24, num_heads=3)
    x = torch.randn(1, 5, 24, requires_grad=True)
    _, extras = attend(attn, x, needs=needs)
    assert not next(iter(extras.values())).requires_grad
