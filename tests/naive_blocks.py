"""A naive timm ViT forward for the method tests: explicit attention matrices with an additive per-key
logit bias, block by block, written from the pre-norm ViT definition (never calling tokendrop)."""

import copy
import functools

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from timm.models.deit import VisionTransformerDistilled


def deit_tiny(distilled=False, seed=0):
    """A random-weight DeiT-Tiny (P = 196), seeded, in eval mode (a fresh copy: building one is slow)."""
    return copy.deepcopy(_deit_tiny(distilled, seed))


@functools.lru_cache(maxsize=None)
def _deit_tiny(distilled, seed):
    torch.manual_seed(seed)
    name = "deit_tiny_distilled_patch16_224" if distilled else "deit_tiny_patch16_224"
    return timm.create_model(name, pretrained=False).eval()


def small_vit(distilled=False, img_size=32, depth=12, seed=0):
    """A small random-weight timm ViT (patch 4, width 48, 3 heads), seeded, in eval mode."""
    torch.manual_seed(seed)
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    return cls(img_size=img_size, patch_size=4, embed_dim=48, depth=depth, num_heads=3, num_classes=5).eval()


def images(size=224, batch=2, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def embed(model, x):
    """Tokens entering block 0 (prefix tokens first)."""
    return model.norm_pre(model._pos_embed(model.patch_embed(x)))


def attention(block, x, bias=None):
    """The block's attention residual with explicit probabilities: returns ``(x + attn, probs (B,H,T,T),
    keys (B,H,T,D))``; ``bias`` (B, T) is added to every logit of its key."""
    a = block.attn
    B, T, C = x.shape
    H = a.num_heads
    D = C // H
    y = block.norm1(x)
    q, k, v = (y @ a.qkv.weight.T + a.qkv.bias).reshape(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) * D ** -0.5
    if bias is not None:
        logits = logits + bias[:, None, None, :]
    probs = logits.softmax(dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(B, T, C) @ a.proj.weight.T + a.proj.bias
    return x + out, probs, k


def mlp(block, x):
    return x + block.mlp(block.norm2(x))


def head(model, x):
    return model.forward_head(model.norm(x))
