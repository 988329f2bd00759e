"""tokendrop — train and run Vision Transformers faster by reducing the tokens they process.

    import tokendrop as td
    model = td.build_model("hybrid_vit_ptd", num_classes=100)
    td.attach(model, td.TopK("cls_attention"), blocks=[0],
              schedule=td.Curriculum(40, 140, final=0.35, gamma=2.0), when="train")
    td.set_epoch(model, epoch)   # once per epoch in the training loop
"""

from .models import BACKBONES, build_model
from .reduction import (
    Constant, Cosine, Curriculum, Linear, Reducer, Schedule, Step, TokenState, TopK, attach, aux_loss, detach,
    expected_patch_tokens, keep_count, last_reduction, make_schedule, prepare_step, set_epoch, sites,
)

__version__ = "0.1.0"

__all__ = [
    "BACKBONES", "Constant", "Cosine", "Curriculum", "Linear", "Reducer", "Schedule", "Step", "TokenState", "TopK",
    "attach", "aux_loss", "build_model", "detach", "expected_patch_tokens", "keep_count", "last_reduction", "make_schedule",
    "prepare_step", "set_epoch", "sites",
]
