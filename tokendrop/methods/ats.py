"""ATS — Adaptive Token Sampling (Fayyaz et al., ECCV 2022) as in "Which Tokens to Use?" (seed 004):
inverse transform sampling of the patch tokens from the CLS attention weighted by value norms."""

from __future__ import annotations

import torch

from ..reduction.base import Reducer, SiteInputs
from ..reduction.registry import register_reducer

EPS = 1e-6
"""Added to the score total before normalising (the reference's constant)."""


def sample_points(count: int, device: torch.device | None = None) -> torch.Tensor:
    """The reference's ``count`` sample points ``(2i+1)/(2K)``, ``i < count``, with ``K = count + 1``.

    The reference writes them as a float ``arange`` with an exclusive end, which gives ``K − 1`` points
    for the reference's settings but ``K`` for some ``K`` through rounding; they are generated explicitly
    here, so the top of the CDF is never sampled."""
    k = count + 1
    return (2 * torch.arange(count, device=device, dtype=torch.float32) + 1) / (2 * k)


@register_reducer("ats")
class ATS(Reducer):
    """Sample at most ``keep`` patch tokens per image; a token sampled twice is kept once, so images keep
    different counts (padded to the batch's largest, padding slots absent as keys).

    * Score ``S_j = Σ_h A_h[CLS, j]·‖v_{h,j}‖₂`` over heads; ``p = S / (ΣS + 1e-6)``; ``cdf = cumsum(p)``.
    * The site's ``keep`` is the reference's ``Kmax − 1``: ``Kmax = keep + 1`` counts the CLS token, and
      the ``Kmax − 1 = keep`` explicit points ``t_i = (2i+1)/(2·Kmax)`` are each mapped to the token
      whose cdf is nearest (exact ``|t − cdf|``, ties to the lower index — the first cdf ≥ t is *not*
      the rule). So an image keeps at most ``keep`` patch tokens; :meth:`output_count` is that bound.
    * Kept tokens keep their order (ids ascending). Absent (padding) tokens are never sampled — the
      reference achieves this by adding 0.1 to their cdf, which always puts them farther than the last
      present token.
    * ``keep`` is a sample budget (``keep_is_budget``): the site samples whenever it is active, also
      where fewer tokens than ``keep`` enter (as the reference, whose ``Kmax`` of a stage is fixed).
    * No parameters, deterministic; training and evaluation behave the same. Position ``inside``.
    """

    needs = frozenset({"cls_attention_heads", "value_norms"})
    keep_is_budget = True

    def output_count(self, n_in: int, keep: int) -> int:
        return min(keep, n_in)

    def forward(self, x: torch.Tensor, keep: int, inputs: SiteInputs) -> torch.Tensor:
        # The reference samples inside the attention and computes `attn[ids] @ v` only for the sampled
        # query rows. Row i of the attention output depends on query i alone (all keys stay), and the
        # projection, the residual add and DropPath (one draw per image) act row by row, so computing
        # every row and gathering afterwards — here, after the attention residual — gives the same tokens.
        state = inputs.state
        with torch.no_grad():
            idx, valid = self.sample(inputs.cls_attention_heads, inputs.value_norms, keep, state.patch_mask())
        return state.select(x, idx, valid)

    @staticmethod
    def sample(cls_attention: torch.Tensor, value_norms: torch.Tensor, keep: int,
               present: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampled token ids ``(B, k)`` ascending, padded to the batch's largest count ``k ≤ keep``, and
        their validity mask, from the per-head CLS attention and value norms ``(B, H, N)``."""
        score = (cls_attention.float() * value_norms.float()).sum(dim=1)  # (B, N)
        if present is not None:
            score = score * present
        cdf = torch.cumsum(score / (score.sum(dim=1, keepdim=True) + EPS), dim=1)
        t = sample_points(keep, cdf.device)
        distance = (t[None, :, None] - cdf[:, None, :]).abs()  # (B, keep, N), exact (no mm-based cdist)
        if present is not None:
            distance = distance.masked_fill(~present[:, None, :], torch.inf)
        nearest = distance.argmin(dim=2)  # the first of equal distances
        B, N = cdf.shape
        chosen = torch.zeros(B, N, dtype=torch.bool, device=cdf.device).scatter_(1, nearest, True)
        counts = chosen.sum(dim=1)
        k = int(counts.max())
        idx = torch.argsort((~chosen).to(torch.int8), dim=1, stable=True)[:, :k]  # chosen first, ascending
        valid = torch.arange(k, device=cdf.device) < counts[:, None]
        return idx, valid
