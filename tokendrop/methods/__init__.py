"""Token-reduction methods, one file each, registered by name with
:func:`tokendrop.reduction.registry.register_reducer` (importing this package registers them all)."""

from .ats import ATS
from .evit import EViT
from .topk import TopK
from .zero_tp import ZeroTP

__all__ = ["ATS", "EViT", "TopK", "ZeroTP"]
