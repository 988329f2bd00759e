"""Token-reduction methods, one file each, registered by name with
:func:`tokendrop.reduction.registry.register_reducer` (importing this package registers them all)."""

from .dynamicvit import DynamicViT
from .tnt import TNT
from .topk import TopK

__all__ = ["TopK"]
