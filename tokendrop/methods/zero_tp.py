"""Zero-TP — Zero-TPrune (Wang, Dedhia & Jha, CVPR 2024): training-free pruning by importance on the
attention graph (weighted PageRank) and by similarity of keys.

No official code was found, so this is a reconstruction from the paper's description as quoted by TNT
(seed 002) and by third parties, following the project's research notes (zoo-spec §13). Every choice
those sources leave open is a constructor argument; the defaults are the notes' recommendation."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..reduction.base import Reducer, SiteInputs
from ..reduction.registry import register_reducer

ORDERS = ("similarity_first", "importance_first")
STAGES = ("both", "importance", "similarity")


def default_iterations(block: int) -> int:
    """WPR rounds by depth for a 12-block ViT, as TNT ran Zero-TP (layers 1/3/6/9/11 → 30/5/5/1/1) and
    the paper's ranges (30–50 in the first three layers, 5–10 in the middle, 1 in the last three)."""
    return 30 if block < 3 else 5 if block < 9 else 1


def weighted_pagerank(attention: torch.Tensor, iterations: int, present: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head importance (B, H, T) of every token: ``s⁰ = 1/T`` over the present tokens, then
    ``s ← Aᵀ s`` ``iterations`` times on each head's row-stochastic attention ``A`` (B, H, T, T): a token
    is important when important tokens attend to it (no damping)."""
    B, H, T, _ = attention.shape
    weight = torch.ones(B, T, device=attention.device) if present is None else present.float()
    s = (weight / weight.sum(dim=1, keepdim=True))[:, None, :].expand(B, H, T)
    for _ in range(iterations):
        s = (s.unsqueeze(-2) @ attention).squeeze(-2) * weight[:, None, :]
    return s


def head_filter(s: torch.Tensor, low: float, high: float, present: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H) heads whose importance is neither too flat nor too peaked (VHF): the variance over the
    present tokens of ``T·s`` (the importance scaled to mean 1, so the range does not depend on the token
    count) lies in ``[low, high]``. An image where no head passes keeps all of them."""
    weight = torch.ones_like(s[:, 0]) if present is None else present.float()
    count = weight.sum(dim=1)[:, None]  # (B, 1)
    scaled = s * count[:, :, None]
    mean = (scaled * weight[:, None]).sum(dim=-1) / count
    var = ((scaled - mean[..., None]) ** 2 * weight[:, None]).sum(dim=-1) / count
    keep = (var >= low) & (var <= high)
    return keep | ~keep.any(dim=1, keepdim=True)


def rms_importance(s: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """(B, T) importance ``sqrt(mean over the kept heads of s_h²)`` (the root mean square, EIR)."""
    w = heads.float()[..., None]
    return ((s ** 2 * w).sum(dim=1) / w.sum(dim=1)).sqrt()


def similar_tokens(keys: torch.Tensor, importance: torch.Tensor, candidates: torch.Tensor, r: int) -> torch.Tensor:
    """(B, N) bool: the ``r`` tokens to prune by similarity among ``candidates`` (B, N) bool, each image
    the same count. The candidates sorted by importance split into the more important half (⌊n/2⌋,
    group B) and the rest (group A); each A token's score is its largest cosine similarity of keys to a
    B token, and the ``r`` A tokens with the largest scores go."""
    n = int(candidates[0].sum())
    order = importance.masked_fill(~candidates, -torch.inf).argsort(dim=1, descending=True, stable=True)[:, :n]
    half = n // 2
    group_b, group_a = order[:, :half], order[:, half:]
    unit = F.normalize(keys.float(), dim=-1)
    rows_a, rows_b = (torch.gather(unit, 1, g[..., None].expand(-1, -1, unit.shape[-1])) for g in (group_a, group_b))
    best = (rows_a @ rows_b.transpose(1, 2)).amax(dim=-1)  # (B, |A|): each A token's most similar B token
    pruned = torch.gather(group_a, 1, best.topk(r, dim=1).indices)
    return torch.zeros_like(candidates).scatter_(1, pruned, True)


@register_reducer("zero_tp")
class ZeroTP(Reducer):
    """Training-free Zero-TPrune (reconstructed — no official code exists; see the module docstring).

    At the site, after the block's attention (position ``inside``), on the whole attention ``A_h``
    (prefix tokens included, the graph of all tokens):

    1. **WPR** — weighted PageRank per head, ``s_h ← A_hᵀ s_h`` from ``1/T``, ``iterations`` rounds
       (``None``: 30 in blocks 0–2, 5 in blocks 3–8, 1 from block 9, for 12-block ViTs; the paper's
       single-layer setting is 50);
    2. **VHF** — keep the heads whose importance variance (of ``T·s_h``, mean 1) lies in
       ``head_variance`` = ``(low, high)`` (third-party quote of the paper: [0.01, 0.7]; the paper's
       scale is unverified); ``None`` keeps every head;
    3. **EIR** — importance ``I = sqrt(mean_kept-heads s_h²)``; prefix tokens are never pruned;
    4. **S-stage** — partition by importance (the more important half vs the rest) and prune the
       ``similar`` least-important-half tokens whose head-mean keys are most cosine-similar to the other
       half (TNT ran Zero-TP with ``s = 25`` on DeiT);
    5. **I-stage** — keep the top ``keep`` by ``I``.

    ``order``: ``"similarity_first"`` (S then I over all tokens, the notes' recommendation) or
    ``"importance_first"`` (I keeps ``keep + s``, then S prunes ``s`` of them — TNT's counting).
    ``s`` is capped so exactly ``keep`` tokens remain. ``stages``: ``"both"``, ``"importance"`` (I only)
    or ``"similarity"`` (S only, removing all ``n − keep`` by similarity, at most half of the tokens —
    TNT's layers 1 and 11). Kept tokens stay in their order. No parameters; training and evaluation
    behave the same (gradient flows through the kept tokens only).
    """

    needs = frozenset({"attention", "keys"})

    def __init__(self, iterations: int | Mapping[int, int] | None = None, head_variance: tuple[float, float] | None = (0.01, 0.7),
                 similar: int = 25, order: str = "similarity_first", stages: str = "both") -> None:
        super().__init__()
        if iterations is not None and not _positive_int(iterations) and not (
                isinstance(iterations, Mapping) and all(_positive_int(v) for v in iterations.values())):
            raise ValueError(f"iterations: {iterations!r} must be a whole number >= 1, a mapping block -> such a "
                             "number, or None (by depth)")
        if head_variance is not None:
            low, high = _pair(head_variance)
            if not (math.isfinite(low) and math.isfinite(high) and 0.0 <= low <= high):
                raise ValueError(f"head_variance: {head_variance!r} must be (low, high) with 0 <= low <= high, or None")
            head_variance = (low, high)
        if not (isinstance(similar, int) and not isinstance(similar, bool) and similar >= 0):
            raise ValueError(f"similar: {similar!r} must be a whole number >= 0")
        if order not in ORDERS:
            raise ValueError(f"order: {order!r} is not one of {', '.join(ORDERS)}")
        if stages not in STAGES:
            raise ValueError(f"stages: {stages!r} is not one of {', '.join(STAGES)}")
        self.iterations = dict(iterations) if isinstance(iterations, Mapping) else iterations
        self.head_variance = head_variance
        self.similar = similar
        self.order = order
        self.stages = stages

    def extra_repr(self) -> str:
        return (f"iterations={self.iterations!r}, head_variance={self.head_variance!r}, similar={self.similar}, "
                f"order={self.order!r}, stages={self.stages!r}")

    def rounds(self, block: int) -> int:
        """WPR rounds at ``block``."""
        if isinstance(self.iterations, dict):
            return self.iterations.get(block, default_iterations(block))
        return self.iterations if self.iterations is not None else default_iterations(block)

    def similar_count(self, n: int, keep: int) -> int:
        """Tokens pruned by similarity when ``keep`` of ``n`` remain (capped so the I-stage can keep ``keep``)."""
        if self.stages == "importance":
            return 0
        if self.stages == "similarity":
            return min(n - keep, (n + 1) // 2)
        if self.order == "similarity_first":
            return min(self.similar, n - keep, (n + 1) // 2)
        return min(self.similar, n - keep, keep)  # S on keep + s tokens: at most its less important half

    def output_count(self, n_in: int, keep: int) -> int:
        return n_in - self.similar_count(n_in, keep) if self.stages == "similarity" else keep

    def importance(self, attention: torch.Tensor, block: int, num_prefix: int,
                   present: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N) importance of the patch tokens: WPR, VHF and EIR on the whole attention (B, H, T, T)."""
        if present is not None:
            present = torch.cat([present.new_ones(present.shape[0], num_prefix), present], dim=1)
        s = weighted_pagerank(attention.float(), self.rounds(block), present)
        heads = torch.ones_like(s[:, :, 0], dtype=torch.bool)
        if self.head_variance is not None:
            heads = head_filter(s, *self.head_variance, present)
        return rms_importance(s, heads)[:, num_prefix:]

    def forward(self, x: torch.Tensor, keep: int, inputs: SiteInputs) -> torch.Tensor:
        state = inputs.state
        n = x.shape[1] - state.num_prefix
        present = state.patch_mask()
        with torch.no_grad():
            importance = self.importance(inputs.attention, inputs.block, state.num_prefix, present)
            if present is not None:  # absent (padding) tokens rank last
                importance = importance.masked_fill(~present, -1.0)
            r = self.similar_count(n, keep)
            alive = torch.ones_like(importance, dtype=torch.bool)
            if self.order == "importance_first" and self.stages == "both":
                alive = _top(importance, keep + r)
            if r > 0:
                alive &= ~similar_tokens(inputs.keys, importance, alive, r)
            if self.stages != "similarity":
                alive = _top(importance.masked_fill(~alive, -torch.inf), keep)
            idx = torch.nonzero(alive)[:, 1].reshape(x.shape[0], -1)  # ascending: kept tokens stay in order
        return state.select(x, idx)


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) bool marking the ``k`` highest scores of each row."""
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.topk(k, dim=1).indices, True)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _pair(value: object) -> tuple[float, float]:
    try:
        low, high = value  # type: ignore[misc]
        return float(low), float(high)
    except (TypeError, ValueError):
        raise ValueError(f"head_variance: {value!r} must be (low, high) with 0 <= low <= high, or None") from None
