"""tokendrop — train and run Vision Transformers faster by reducing the tokens they process.

    import tokendrop as td
    model = td.build_model("hybrid_vit_ptd", num_classes=100)
    td.attach(model, td.TopK("cls_attention"), blocks=[0],
              schedule=td.Curriculum(40, 140, final=0.35, gamma=2.0), when="train")
    td.set_epoch(model, epoch)   # once per epoch in the training loop

The names below are imported on first use, so ``import tokendrop`` (and the command line's ``--help``)
does not load PyTorch; our backbones register with timm when :mod:`tokendrop.models` is imported, which
any ``td.<name>`` does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

_EXPORTS = {
    ".models": ("BACKBONES", "build_model"),
    ".reduction": ("Constant", "Cosine", "Curriculum", "Linear", "Reducer", "Schedule", "Step", "TokenState", "TopK",
                   "attach", "aux_loss", "detach", "expected_patch_tokens", "keep_count", "last_reduction",
                   "make_schedule", "prepare_step", "set_epoch", "sites"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)

if TYPE_CHECKING:
    from .models import BACKBONES, build_model
    from .reduction import (
        Constant, Cosine, Curriculum, Linear, Reducer, Schedule, Step, TokenState, TopK, attach, aux_loss, detach,
        expected_patch_tokens, keep_count, last_reduction, make_schedule, prepare_step, set_epoch, sites,
    )


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first use (PEP 562)."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'tokendrop' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
