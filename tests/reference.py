"""Independent reference formulas the tests compare the library against (written from the seeds)."""

import torch
import torch.nn.functional as F


def drop_ratio(t, ts=40, te=140, d0=0.0, d1=0.35, gamma=2.0):
    """Seed 000 §2.2's d(t), case by case."""
    if t < ts:
        return d0
    if t >= te:
        return d1
    return d0 + ((t - ts) / (te - ts)) ** gamma * (d1 - d0)


# ------------------------------------------------------------------ a naive timm ViT forward, by hand
def vit_embed(model, images):
    """Patch tokens of a timm ViT with the class token prepended and position embeddings added."""
    w, b = model.patch_embed.proj.weight, model.patch_embed.proj.bias
    x = F.conv2d(images, w, b, stride=w.shape[-1]).flatten(2).transpose(1, 2)
    cls = model.cls_token.expand(x.shape[0], -1, -1)
    return torch.cat([cls, x], dim=1) + model.pos_embed


def vit_block(block, x, policy=None):
    """One pre-norm block with an explicit attention matrix. ``policy`` (B, T): DynamicViT's training
    softmax — key j weighted by policy_j except on the diagonal, ``(e·P + 1e-6/T) / (Σ e·P + 1e-6)``."""
    a = block.attn
    B, T, C = x.shape
    H = a.num_heads
    D = C // H
    y = F.layer_norm(x, (C,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
    q, k, v = (y @ a.qkv.weight.T + a.qkv.bias).reshape(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) * D ** -0.5
    if policy is None:
        attn = logits.softmax(-1)
    else:
        eye = torch.eye(T)
        weight = policy[:, None, None, :] * (1 - eye) + eye
        e = (logits - logits.max(-1, keepdim=True).values).exp() * weight
        attn = (e + 1e-6 / T) / (e.sum(-1, keepdim=True) + 1e-6)
    x = x + ((attn @ v).transpose(1, 2).reshape(B, T, C) @ a.proj.weight.T + a.proj.bias)
    y = F.layer_norm(x, (C,), block.norm2.weight, block.norm2.bias, block.norm2.eps)
    return x + F.gelu(y @ block.mlp.fc1.weight.T + block.mlp.fc1.bias) @ block.mlp.fc2.weight.T + block.mlp.fc2.bias


def vit_head(model, x):
    """Logits from the class token after the final norm."""
    n = model.norm
    return F.layer_norm(x, x.shape[-1:], n.weight, n.bias, n.eps)[:, 0] @ model.head.weight.T + model.head.bias
