"""Token-reduction methods, one file each, registered by name with
:func:`tokendrop.reduction.registry.register_reducer` (importing this package registers them all)."""

from .evit import EViT
from .topk import TopK

__all__ = ["EViT", "TopK"]
