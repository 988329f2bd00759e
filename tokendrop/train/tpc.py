"""TPC-ViT in a training run: attaching the controller from the ``tpc`` config section, and the per-epoch
halting statistics of the validation pass (``metrics.csv`` columns, one per block where per-layer).

Columns (block indices 0-based, halting depths 1-based as in the paper's ``M_k``; tokens include CLS):

* ``tpc_active_l{i}`` — mean tokens per image block ``i`` processed;
* ``tpc_halted_l{i}`` — mean tokens per image that halted at block ``i`` (depth ``i + 1``; they sum to
  the token count: the halting-depth histogram);
* ``tpc_depth`` — mean halting depth over all tokens, in ``[1, L]``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..tpc import attach_tpc, last_stats
from .config import Config
from .distributed import all_reduce_sum


def tpc_columns(depth: int) -> list[str]:
    """The ``metrics.csv`` columns of a TPC run on a model of ``depth`` blocks."""
    return ([f"tpc_active_l{i}" for i in range(depth)] + [f"tpc_halted_l{i}" for i in range(depth)]
            + ["tpc_depth"])


def attach_run_tpc(model: nn.Module, cfg: Config) -> None:
    """Attach TPC-ViT as ``cfg.tpc`` says (nothing when it is disabled); errors name the ``tpc.`` key."""
    if not cfg.tpc.enabled:
        return
    try:
        attach_tpc(model, **cfg.tpc.params())
    except ValueError as e:
        raise ValueError(f"tpc.{e}") from None
    except TypeError as e:
        raise ValueError(f"model.name: {cfg.model.name!r} cannot run TPC-ViT ({e})") from None


class TPCMeter:
    """Sums the halting statistics of every forward of one pass (call :meth:`update` after each forward)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.depth = len(model.blocks)
        self.images = 0
        self.tokens = 0
        self.active = torch.zeros(self.depth, dtype=torch.float64)
        self.halted = torch.zeros(self.depth, dtype=torch.float64)
        self.depth_sum = 0.0

    def update(self) -> None:
        """Add the model's last forward."""
        stats = last_stats(self.model)
        depth = stats.depth.cpu()
        self.images += depth.shape[0]
        self.tokens += depth.numel()
        self.active += stats.counts.sum(dim=1).cpu().double()
        self.halted += torch.bincount(depth.flatten() - 1, minlength=self.depth).double()
        self.depth_sum += float(depth.sum())

    def row(self, device: torch.device) -> dict[str, float]:
        """The pass's columns (summed over all processes)."""
        sums = all_reduce_sum([float(self.images), float(self.tokens), self.depth_sum, *self.active.tolist(),
                               *self.halted.tolist()], device)
        images, tokens, depth_sum = sums[:3]
        active, halted = sums[3:3 + self.depth], sums[3 + self.depth:]
        images = max(images, 1.0)
        out = {f"tpc_active_l{i}": a / images for i, a in enumerate(active)}
        out.update({f"tpc_halted_l{i}": h / images for i, h in enumerate(halted)})
        out["tpc_depth"] = depth_sum / max(tokens, 1.0)
        return out
