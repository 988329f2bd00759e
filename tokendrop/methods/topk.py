"""Top-K token pruning: keep the ``k`` patch tokens with the highest score — Progressive / Curriculum Token
Drop (CLS attention, gradient and random scores) and the Top-K and fixed radial patterns of "Which Tokens
to Use?" (Haurum et al., 2023)."""

from __future__ import annotations

import torch

from ..reduction.base import Reducer, SiteInputs
from ..reduction.registry import register_reducer
from .scores import RADIAL, SCORES, ScoreContext, ring_keep_count, score_tokens


@register_reducer("topk")
class TopK(Reducer):
    """Keep the top-``k`` patch tokens by ``score`` (see :mod:`tokendrop.methods.scores`).

    Kept tokens come in descending score order (``torch.topk(sorted=True)``, as the PTD reference and the
    "Which Tokens to Use?" code). Radial scores keep whole distance rings, so the kept count can differ
    slightly from ``k``; the ring count is chosen on the first sample and applied to all. Radial scores act
    ``before`` the block by default (their mask already applies to that block's attention in the
    reference); the others act ``inside``, between the attention residual and the MLP.
    """

    def __init__(self, score: str = "cls_attention") -> None:
        super().__init__()
        if score not in SCORES:
            raise ValueError(f"score: unknown score {score!r} (allowed: {', '.join(SCORES)})")
        self.score = score
        self.needs = frozenset({score} & {"cls_attention", "gradient"})
        self.default_position = "before" if score in RADIAL else "inside"

    def extra_repr(self) -> str:
        return f"score={self.score!r}"

    def forward(self, x: torch.Tensor, keep: int, inputs: SiteInputs) -> torch.Tensor:
        state = inputs.state
        ctx = ScoreContext(x=x, source=state.current_source(x), grid=state.grid,
                           cls_attention=inputs.cls_attention, gradient=inputs.gradient)
        with torch.no_grad():
            scores = score_tokens(self.score, ctx)
            if self.score in RADIAL:
                keep = ring_keep_count(-scores[0], keep)
                idx = torch.argsort(-scores, dim=1, stable=True)[:, :keep]
            else:
                idx = scores.topk(keep, dim=1, largest=True, sorted=True).indices
        return state.select(x, idx)
