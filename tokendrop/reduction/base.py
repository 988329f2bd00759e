"""The reducer interface: which tokens survive one reduction step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .state import TokenState


@dataclass
class SiteInputs:
    """Everything a site can hand a reducer; a reducer declares what it needs with its flags."""

    state: TokenState
    cls_attention: torch.Tensor | None = None  # (B, N) CLS row over the current patch tokens
    gradient: torch.Tensor | None = None  # (B, P) gradient saliency per original patch


class Reducer(nn.Module):
    """Base class. ``forward(x, keep, inputs)`` takes tokens ``(B, prefix+N, C)`` and a target count of
    patch tokens ``keep`` and returns the reduced tokens, updating ``inputs.state`` (provenance, sizes).

    Flags tell the site what to compute: ``needs_cls_attention`` (the CLS attention row of the block,
    only available inside a block) and ``needs_gradient`` (gradient saliency from
    :func:`tokendrop.prepare_step`). Learned reducers own parameters (saved under the site's name) and
    may expose ``aux_loss`` after a forward for the training loop to add.
    """

    needs_cls_attention: bool = False
    needs_gradient: bool = False

    def forward(self, x: torch.Tensor, keep: int, inputs: SiteInputs) -> torch.Tensor:
        raise NotImplementedError
