"""tokendrop — train and run Vision Transformers faster by reducing the tokens they process.

    import tokendrop as td
    model = td.build_model("hybrid_vit_ptd", num_classes=100)
    td.attach(model, td.TopK("cls_attention"), blocks=[0],
              schedule=td.Curriculum(40, 140, final=0.35, gamma=2.0), when="train")
    td.set_epoch(model, epoch)   # once per epoch in the training loop

Every method is registered by name: ``td.REDUCERS`` lists them, ``td.reducer(name, **kwargs)`` builds one.

The names below are imported on first use, so ``import tokendrop`` (and the command line's ``--help``)
does not load PyTorch. The first ``td.<name>`` imports the models (which register with timm) and every
method (which register by name).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

_EXPORTS = {
    ".methods": ("TopK",),
    ".methods.tome": ("tome",),
    ".tpc": ("attach_tpc",),
    ".models": ("BACKBONES", "build_model"),
    ".reduction": ("Constant", "Cosine", "Curriculum", "Linear", "Reducer", "Remove", "Schedule", "SiteFacts",
                   "SiteInputs", "Step", "TokenState", "attach", "aux_loss", "detach", "expected_patch_tokens",
                   "keep_count", "last_reduction", "make_schedule", "prepare_step", "reducer", "register_reducer",
                   "set_epoch", "sites"),
}
_SUBPACKAGES = ("analysis", "methods", "models", "reduction", "tpc")
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted([*_MODULE_OF, "REDUCERS"])

if TYPE_CHECKING:
    from .methods import TopK
    from .methods.tome import tome
    from .tpc import attach_tpc
    from .models import BACKBONES, build_model
    from .reduction import (
        Constant, Cosine, Curriculum, Linear, Reducer, Remove, Schedule, SiteFacts, SiteInputs, Step, TokenState,
        attach, aux_loss, detach, expected_patch_tokens, keep_count, last_reduction, make_schedule, prepare_step,
        reducer, register_reducer, set_epoch, sites,
    )


def __getattr__(name: str) -> Any:
    """Import what defines ``name`` on first use (PEP 562). ``REDUCERS``: the names of every registered
    method, including ones registered after import."""
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    if name != "REDUCERS" and name not in _MODULE_OF:
        raise AttributeError(f"module 'tokendrop' has no attribute {name!r}")
    for module in _EXPORTS:  # all at once: the models register with timm, the methods by name
        importlib.import_module(module, __name__)
    if name == "REDUCERS":
        from .reduction.registry import reducer_names

        return reducer_names()
    value = getattr(importlib.import_module(_MODULE_OF[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
