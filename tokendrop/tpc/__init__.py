"""TPC-ViT (seed 003, reconstructed in research/tpc-vit-spec.md): per-token halting over all blocks with a
pause × non-restart break probability, a distribution regulariser, a CLS output weighted by halting weights,
and a κ-nearest-key attention stabiliser.

    import tokendrop as td
    model = td.attach_tpc(td.build_model("hybrid_vit_tiny", num_classes=10), beta=10.0, kappa=32, mode="packed")
    loss = criterion(model(images), targets) + td.aux_loss(model)   # ponder + distribution terms
    stats = td.tpc.last_stats(model)                                 # per-layer counts, halting depths
"""

from .cost import tpc_macs
from .halting import Tracker, avit_target, distribution_loss, distribution_target, halting
from .model import TPCController, TPCStats, attach_tpc, controller, last_stats
from .params import AVIT_COMPAT, TPCParams
from .stabiliser import neighbour_bias

__all__ = [
    "AVIT_COMPAT", "TPCController", "TPCParams", "TPCStats", "Tracker", "attach_tpc", "avit_target", "controller",
    "distribution_loss", "distribution_target", "halting", "last_stats", "neighbour_bias", "tpc_macs",
]
