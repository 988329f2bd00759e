"""tokendrop — train and run Vision Transformers faster by reducing the tokens they process.

    import tokendrop as td
    model = td.build_model("hybrid_vit_ptd", num_classes=100)
    td.attach(model, td.TopK("cls_attention"), blocks=[0],
              schedule=td.Curriculum(40, 140, final=0.35, gamma=2.0), when="train")
    td.set_epoch(model, epoch)   # once per epoch in the training loop

Every method is registered by name: ``td.REDUCERS`` lists them, ``td.reducer(name, **kwargs)`` builds one.
"""

from typing import Any

from . import methods  # noqa: F401  (registers every method)
from . import tpc
from .methods import TopK
from .models import BACKBONES, build_model
from .reduction import (
    Constant, Cosine, Curriculum, Linear, Reducer, Schedule, SiteFacts, SiteInputs, Step, TokenState, attach, aux_loss,
    detach, expected_patch_tokens, keep_count, last_reduction, make_schedule, prepare_step, reducer, register_reducer, Remove,
    set_epoch, sites,
)
from .reduction.registry import reducer_names
from .tpc import attach_tpc

__version__ = "0.1.0"

__all__ = [
    "BACKBONES", "REDUCERS", "Constant", "Cosine", "Curriculum", "Linear", "Reducer", "Schedule", "SiteFacts",
    "SiteInputs", "Step", "TokenState", "TopK", "attach", "attach_tpc", "aux_loss", "build_model", "detach", "expected_patch_tokens",
    "keep_count", "last_reduction", "make_schedule", "prepare_step", "reducer", "register_reducer", "Remove", "set_epoch", "sites", "tpc",
]


def __getattr__(name: str) -> Any:
    """``REDUCERS``: the names of every registered method, including ones registered after import."""
    if name == "REDUCERS":
        return reducer_names()
    raise AttributeError(f"module 'tokendrop' has no attribute {name!r}")
