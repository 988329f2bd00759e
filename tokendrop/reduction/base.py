"""The reducer interface: which tokens survive one reduction step, and what a site hands a reducer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .state import TokenState

#: What a reducer may ask its site for (``Reducer.needs``). Each is computed only when some site asks,
#: and none keeps the ``T × T`` attention matrix:
#:
#: * ``cls_attention`` — (B, N) the CLS row of the block's attention over the patch tokens, mean over
#:   heads, detached (Top-K, EViT's ranking);
#: * ``cls_attention_grad`` — the same row with gradient (EViT's fused token);
#: * ``cls_attention_heads`` — (B, H, N) the CLS row per head, detached (ATS);
#: * ``value_norms`` — (B, H, N) ‖v‖₂ of every patch token per head (ATS);
#: * ``keys`` — (B, N, D) the block's keys of the patch tokens, mean over heads (ToMe's metric);
#: * ``prev_attention_colsum`` — (B, N) attention each patch token received in the *previous* block,
#:   summed over heads and queries (K-Medoids); computed there in query chunks;
#: * ``attention`` — (B, H, T, T) the block's whole attention, prefix tokens included: the one input that
#:   materialises the matrix, for methods that walk the attention graph (Zero-TP's weighted PageRank);
#: * ``gradient`` — (B, N) gradient saliency from :func:`tokendrop.prepare_step`.
#:
#: The attention-derived inputs exist only at ``position="inside"`` (after the block's attention), except
#: ``prev_attention_colsum``, which is only meaningful ``before`` a block.
SITE_INPUTS = ("cls_attention", "cls_attention_grad", "cls_attention_heads", "value_norms", "keys",
               "prev_attention_colsum", "attention", "gradient")
ATTENTION_INPUTS = frozenset({"cls_attention", "cls_attention_grad", "cls_attention_heads", "value_norms", "keys",
                              "attention"})


@dataclass
class SiteInputs:
    """What a site hands its reducer: the token state, where it is, and the inputs it declared."""

    state: TokenState
    block: int = 0
    training: bool = False
    cls_attention: torch.Tensor | None = None
    cls_attention_grad: torch.Tensor | None = None
    cls_attention_heads: torch.Tensor | None = None
    value_norms: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    prev_attention_colsum: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    gradient: torch.Tensor | None = None


@dataclass(frozen=True)
class SiteFacts:
    """What a per-site factory receives to build a reducer whose shapes depend on the site."""

    block: int  # 0-based block index
    dim: int  # token width C
    num_heads: int
    tokens_in: int  # patch tokens entering the site (at the schedule's epoch when attached)
    keep: int  # target keep count there and then


class Reducer(nn.Module):
    """Base class. ``forward(x, keep, inputs)`` takes tokens ``(B, prefix+N, C)`` and a target count of
    patch tokens ``keep`` and returns the reduced tokens, changing ``inputs.state`` only through
    ``select`` / ``replace`` / ``merge`` (so provenance, sizes and masks stay right).

    Class attributes a method sets:

    * ``needs`` — the names from :data:`SITE_INPUTS` the site must compute for it;
    * ``default_position`` — ``"inside"`` (between the attention residual and the MLP) or ``"before"``
      the block, used when ``attach(..., position=None)``;
    * :meth:`output_count` — patch tokens it returns for ``keep`` (an upper bound where counts vary);
    * :meth:`begin_forward` — optional, to set up the token state before block 0;
    * :meth:`extra_macs` — its own arithmetic per image, for honest MAC counts.

    Learned reducers own parameters (saved under ``blocks.{i}.token_site.reducer.*``) and may leave an
    auxiliary loss in ``self.aux_loss`` during a forward for the training loop (:func:`tokendrop.aux_loss`).
    """

    needs: frozenset[str] = frozenset()
    default_position: str = "inside"
    aux_loss: torch.Tensor | None = None

    def begin_forward(self, state: TokenState, x: torch.Tensor, training: bool) -> None:
        """Called by the model's first block at the start of every forward in which this reducer's site is
        active, with the tokens entering block 0 (e.g. to start a soft policy that every block honours)."""

    def output_count(self, n_in: int, keep: int) -> int:
        """Patch tokens leaving the site when ``keep`` of ``n_in`` are asked for (default: ``keep``)."""
        return keep

    def extra_macs(self, n_in: int, keep: int, dim: int, num_heads: int) -> int:
        """Multiply-accumulates per image the method itself spends beyond the site inputs it asked for
        (predictor MLPs, similarity matrices, cluster assignments), for the analytic MAC count."""
        return 0

    #: True when ``keep`` is a budget, not a count (ATS draws ``keep`` samples and keeps the distinct
    #: tokens hit): the site then runs whenever it is active and passes the schedule's target even where
    #: it is not below the tokens entering (``relative_to="original"`` does not cap it).
    keep_is_budget: bool = False

    #: True when the keep fraction (``TokenState.keep_fraction``) enters the computation beyond the keep
    #: count (DynamicViT's ratio loss): a training step captured in a CUDA graph then depends on its value.
    reads_keep_fraction: bool = False

    @property
    def capturable(self) -> bool:
        """Whether a training step through this reducer can be captured in a CUDA graph and replayed:
        not with gradient saliency (its extra forward and backward run between steps) nor with a private
        random generator (a replay would not advance it)."""
        return "gradient" not in self.needs

    def forward(self, x: torch.Tensor, keep: int, inputs: SiteInputs) -> torch.Tensor:
        raise NotImplementedError
