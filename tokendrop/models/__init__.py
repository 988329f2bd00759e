"""Backbones (registered with timm on import) and the attention they share with patched timm ViTs."""

from .attention import attend
from .hybrid_vit import BACKBONES, ConvStem, build_model

__all__ = ["BACKBONES", "ConvStem", "attend", "build_model"]
