"""Token-reduction methods, one file each, registered by name with
:func:`tokendrop.reduction.registry.register_reducer` (importing this package registers them all)."""

from .ats import ATS
from .dpcknn import DPCKNN
from .dynamicvit import DynamicViT
from .evit import EViT
from .kmedoids import KMedoids
from .patchmerger import PatchMerger
from .sinkhorn import Sinkhorn
from .sit import SiT
from .tnt import TNT
from .tome import ToMe
from .topk import TopK
from .zero_tp import ZeroTP

__all__ = ["ATS", "DPCKNN", "DynamicViT", "EViT", "KMedoids", "PatchMerger", "SiT", "Sinkhorn", "TNT", "ToMe", "TopK",
           "ZeroTP"]
