"""Token saliency scores used to rank patch tokens (higher = more important).

Each score maps the site's context to a (B, N) tensor over the N current patch tokens:

- ``cls_attention`` — PTD / CTD: attention the CLS token pays to each patch, mean over heads.
- ``random`` — uniform noise (CTD's random-dropping ablation).
- ``gradient`` — CTD's gradient ablation: ``s_i = ‖∂L/∂x_i ⊙ x_i‖₁`` over channels at the site, from a
  full-token forward/backward on the same batch (see :func:`tokendrop.prepare_step`).
- ``l1`` / ``l2`` / ``linf`` — the fixed radial patterns of "Which Tokens to Use?" §3.1.1: minus the ℓp
  distance of the token's original patch to the image centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RADIAL = ("l1", "l2", "linf")
SCORES = ("cls_attention", "random", "gradient", *RADIAL)


@dataclass
class ScoreContext:
    """What a site hands to a score function."""

    x: torch.Tensor  # (B, prefix+N, C) tokens at the site
    source: torch.Tensor  # (B, N) original patch index of each current patch token
    grid: tuple[int, int]
    cls_attention: torch.Tensor | None = None  # (B, N)
    gradient: torch.Tensor | None = None  # (B, N) per current patch token, from prepare_step


def centre_distance(grid: tuple[int, int], norm: str, device: torch.device | None = None) -> torch.Tensor:
    """ℓ1/ℓ2/ℓ∞ distance of every patch (row-major) to the image centre, on seed 004's reference grid
    ``linspace((-g)//2, g//2, g)`` per axis (asymmetric for odd g). Computed in float32 with the
    reference's formulas, whose rounding splits some mathematically equal rings — this reproduces the
    reference's kept counts exactly (e.g. ℓ1 keeps 92, not 96, of 196 patches at r = 0.5)."""
    gh, gw = grid
    ys = torch.linspace((-gh) // 2, gh // 2, gh, device=device)
    xs = torch.linspace((-gw) // 2, gw // 2, gw, device=device)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    if norm == "l1":
        z = x.abs() + y.abs()
    elif norm == "l2":
        z = torch.sqrt(x ** 2 + y ** 2)
    else:
        z = torch.maximum(x.abs(), y.abs())
    return z.flatten()


def score_tokens(name: str, ctx: ScoreContext) -> torch.Tensor:
    """(B, N) saliency of the current patch tokens under score ``name``."""
    if name == "cls_attention":
        if ctx.cls_attention is None:
            raise RuntimeError("cls_attention score needs the site's attention: use it at position='inside'")
        return ctx.cls_attention
    if name == "random":
        return torch.rand(ctx.source.shape, device=ctx.x.device)
    if name == "gradient":
        if ctx.gradient is None:
            raise RuntimeError("gradient score: call tokendrop.prepare_step(model, images, targets, loss_fn) "
                               "before every training forward")
        return ctx.gradient
    if name in RADIAL:
        dist = centre_distance(ctx.grid, name, ctx.x.device)
        return -dist[ctx.source]
    raise ValueError(f"score: unknown score {name!r} (allowed: {', '.join(SCORES)})")


def ring_keep_count(distances: torch.Tensor, target: int) -> int:
    """Seed 004 §3.1.1: the count kept by the distance threshold whose count is closest to ``target``
    (whole rings are kept; ties go to the smaller threshold). ``distances``: (N,) of one sample."""
    thresholds = distances.unique()  # sorted ascending
    counts = (distances[None, :] <= thresholds[:, None]).sum(dim=1)
    best = int((counts - target).abs().argmin())  # argmin returns the first (smallest threshold) on ties
    return int(counts[best])
