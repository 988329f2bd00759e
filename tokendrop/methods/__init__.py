"""Token-reduction methods, one file each, registered by name with
:func:`tokendrop.reduction.registry.register_reducer` (importing this package registers them all)."""

from .dpcknn import DPCKNN
from .kmedoids import KMedoids
from .tome import ToMe
from .topk import TopK

__all__ = ["TopK"]
