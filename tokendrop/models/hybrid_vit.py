"""Hybrid conv-stem Vision Transformers of seeds 000 (PTD) and 001 (CTD), built on timm's ``VisionTransformer``.

The transformer part *is* timm's ``VisionTransformer`` (so state-dict names are timm's and every
token-reduction patch that works on a timm ViT works here); only the patch embedding is replaced by
the seeds' convolutional stem, and the weights are initialised as the seed author's reference does.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import torch
from torch import nn
from timm.layers import trunc_normal_
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer


class ConvStem(nn.Module):
    """Conv3x3–BN–ReLU layers (no conv bias) mapping an image to a grid of ``embed_dim`` tokens.

    ``channels`` lists the hidden widths; ``strides`` the stride of every conv (the last conv outputs
    ``embed_dim``). Output: ``(B, N, embed_dim)`` with ``N = (H / prod(strides)) * (W / prod(strides))``.
    """

    def __init__(self, img_size: int | Sequence[int] = 32, patch_size: int | None = None, in_chans: int = 3,
                 embed_dim: int = 192, channels: Sequence[int] = (64, 128), strides: Sequence[int] = (1, 2, 1),
                 **_: Any) -> None:
        super().__init__()
        if len(strides) != len(channels) + 1:
            raise ValueError(f"strides: need {len(channels) + 1} strides for {len(channels) + 1} convs, got {list(strides)}")
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.stride = 1
        for s in strides:
            self.stride *= s
        if h % self.stride or w % self.stride:
            raise ValueError(f"img_size: {h}x{w} is not divisible by the stem stride {self.stride}")
        widths = [in_chans, *channels, embed_dim]
        layers: list[nn.Module] = []
        for c_in, c_out, s in zip(widths[:-1], widths[1:], strides):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.proj = nn.Sequential(*layers)
        self.img_size = (h, w)
        self.grid_size = (h // self.stride, w // self.stride)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        """Total stride of the stem (timm asks this of its patch embeddings)."""
        return self.stride if as_scalar else (self.stride, self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def init_reference_weights(model: VisionTransformer) -> VisionTransformer:
    """Initialise as the seed author's reference: Linear xavier-uniform (bias 0), conv kaiming-normal
    (fan_out, ReLU), norms weight 1 / bias 0, CLS token and position embedding trunc-normal(0.02)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    trunc_normal_(model.pos_embed, std=0.02)
    trunc_normal_(model.cls_token, std=0.02)
    return model


def _hybrid_vit(*, embed_dim: int, depth: int, num_heads: int, stem_channels: Sequence[int],
                stem_strides: Sequence[int], num_classes: int = 100, in_chans: int = 3, img_size: int = 32,
                drop_rate: float = 0.0, drop_path_rate: float = 0.0, qkv_bias: bool = False,
                mlp_ratio: float = 4.0, **kwargs: Any) -> VisionTransformer:
    """A timm ViT with the conv stem. ``drop_rate`` is the seeds' single dropout ``p``: it is applied
    after the position embedding, the attention projection and in the MLP (the reference has no
    attention-weight dropout and no dropout before the head)."""
    for key in ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    model = VisionTransformer(
        img_size=img_size, patch_size=1, in_chans=in_chans, num_classes=num_classes, embed_dim=embed_dim,
        depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, class_token=True,
        global_pool="token", pos_drop_rate=drop_rate, proj_drop_rate=drop_rate, drop_path_rate=drop_path_rate,
        norm_layer=nn.LayerNorm,  # PyTorch default eps 1e-5, as the reference's nn.LayerNorm
        embed_layer=partial(ConvStem, channels=tuple(stem_channels), strides=tuple(stem_strides)),
        weight_init="skip", **kwargs,
    )
    return init_reference_weights(model)


@register_model
def hybrid_vit_ptd(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Seed 000: stem 3→64 (s1)→128 (s2)→192 (s1), 16×16 = 256 tokens at 32 px, E=192, 6 blocks, 6 heads."""
    return _hybrid_vit(embed_dim=192, depth=6, num_heads=6, stem_channels=(64, 128), stem_strides=(1, 2, 1), **kwargs)


@register_model
def hybrid_vit_ctd(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Seed 001: stem 3→64 (s1)→128 (s2)→384 (s2), 8×8 = 64 tokens at 32 px, E=384, 8 blocks, 6 heads."""
    return _hybrid_vit(embed_dim=384, depth=8, num_heads=6, stem_channels=(64, 128), stem_strides=(1, 2, 2), **kwargs)


@register_model
def hybrid_vit_tiny(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """CPU-friendly demo/test model: stem 3→16 (s2)→32 (s1)→96 (s2), 8×8 = 64 tokens at 32 px
    (7×7 = 49 at 28 px), E=96, 4 blocks, 3 heads, MLP ratio 2."""
    kwargs.setdefault("mlp_ratio", 2.0)
    return _hybrid_vit(embed_dim=96, depth=4, num_heads=3, stem_channels=(16, 32), stem_strides=(2, 1, 2), **kwargs)


BACKBONES = ("hybrid_vit_ptd", "hybrid_vit_ctd", "hybrid_vit_tiny")


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a backbone by name: ours (``hybrid_vit_ptd``, ``hybrid_vit_ctd``, ``hybrid_vit_tiny``) or any
    timm model name (``pretrained`` defaults to False so nothing is downloaded)."""
    import timm

    if name not in BACKBONES and not timm.is_model(name):
        raise ValueError(f"name: unknown model {name!r} (ours: {', '.join(BACKBONES)}; or any timm model name)")
    kwargs.setdefault("pretrained", False)
    return timm.create_model(name, **kwargs)
