"""Top-K token pruning: keep the ``k`` patch tokens with the highest score (seeds 000/001, seed 004's Top-K
and fixed radial patterns)."""

from __future__ import annotations

import torch

from .base import Reducer, SiteInputs
from .scores import RADIAL, SCORES, ScoreContext, ring_keep_count, score_tokens


class TopK(Reducer):
    """Keep the top-``k`` patch tokens by ``score`` (see :mod:`tokendrop.reduction.scores`).

    Kept tokens come in descending score order (``torch.topk(sorted=True)``, as the seeds' reference and
    seed 004's code). Radial scores keep whole distance rings (seed 004 §3.1.1), so the kept count can
    differ slightly from ``k``; the ring count is chosen on the first sample and applied to all.
    """

    def __init__(self, score: str = "cls_attention") -> None:
        super().__init__()
        if score not in SCORES:
            raise ValueError(f"score: unknown score {score!r} (allowed: {', '.join(SCORES)})")
        self.score = score
        self.needs_cls_attention = score == "cls_attention"
        self.needs_gradient = score == "gradient"

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
