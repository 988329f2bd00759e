"""TPC-ViT's halting arithmetic (Eqs. 6–8, 10, 12–13 of seed 003; spec §3 steps 5–6): cumulative break
probability, remainder, ponder cost, halting weights, and the two loss terms.

Notation: ``b`` break probability of a token at a layer, ``c`` its running sum, ``R`` the remainder
``1 − Σ_{l<M} b``, ``ρ`` the ponder cost ``M + R``, ``M`` the 1-based layer at which the token halts —
the first where ``c ≥ 1 − δ``. The halting weights ``p^l`` are ``b^l`` before ``M``, ``R`` at ``M`` and 0
after, so ``Σ_l p^l = 1``. Masks and ``M`` carry no gradient; ``b`` reaches the losses through ``R``,
``p`` and the layer distribution ``D``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Tracker", "avit_target", "distribution_loss", "distribution_target", "halting"]


@dataclass
class Tracker:
    """Per-token halting state of one forward pass (all (B, N)): cumulation ``c``, remainder ``R``, ponder
    ``rho``, ``alive`` (not yet halted) and ``depth`` (1-based halting layer; 0 while alive)."""

    delta: float
    c: torch.Tensor
    R: torch.Tensor
    rho: torch.Tensor
    alive: torch.Tensor
    depth: torch.Tensor
    layer: int = 0

    @classmethod
    def start(cls, batch: int, tokens: int, delta: float, device: torch.device | None = None) -> Tracker:
        """A fresh state: nothing accumulated, every token alive, remainder 1."""
        zeros = torch.zeros(batch, tokens, device=device)
        return cls(delta, zeros, torch.ones_like(zeros), zeros.clone(), torch.ones(batch, tokens, dtype=torch.bool,
                   device=device), torch.zeros(batch, tokens, dtype=torch.long, device=device))

    def step(self, b: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Advance one layer with break probabilities ``b`` (B, N) of the ``active`` tokens (B, N bool:
        the tokens this layer processed; ``b`` is ignored elsewhere). Returns the halting weights ``p^l``."""
        self.layer += 1
        b = b * active
        self.c = self.c + b.detach()
        self.rho = self.rho + active
        reached = active & (self.c >= 1.0 - self.delta)
        running = active & ~reached
        p = torch.where(reached, self.R, b * running)
        self.rho = self.rho + self.R * reached
        self.R = self.R - b * running
        self.alive = self.alive & ~reached
        self.depth = self.depth.masked_fill(reached, self.layer)
        return p


def halting(b: torch.Tensor, delta: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halting weights ``p`` (L, B, N), ponder ``ρ`` (B, N) and 1-based halting layer ``M`` (B, N) of break
    probabilities ``b`` (L, B, N); the last layer halts every token still running (its ``b`` is taken as 1).

    ``b = [0.3, 0.5, 0.3]`` gives ``p = [0.3, 0.5, 0.2]``, ``ρ = 3.2``, ``M = 3``."""
    if b.dim() != 3:
        raise ValueError(f"b: expected shape (L, B, N), got {tuple(b.shape)}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta: {delta} is outside (0, 1)")
    L, B, N = b.shape
    tracker = Tracker.start(B, N, delta, b.device)
    weights = []
    for layer in range(L):
        step_b = torch.ones_like(b[layer]) if layer == L - 1 else b[layer]
        weights.append(tracker.step(step_b, tracker.alive))
    return torch.stack(weights), tracker.rho, tracker.depth


def distribution_target(depth: int, centre: float) -> torch.Tensor:
    """TPC's prior over layers: ``N(l; centre, 1)`` at ``l = 0..depth−1``, normalised to sum 1 (float64)."""
    layers = torch.arange(depth, dtype=torch.float64)
    logits = -0.5 * (layers - centre) ** 2
    return torch.softmax(logits, dim=0)


def avit_target(depth: int, centre: float) -> torch.Tensor:
    """A-ViT's prior: the Gaussian pdf ``N(l; centre, 1)`` at ``l = 0..depth−1`` scaled so that the layers
    before ``centre`` sum to 0.98 — not normalised (it sums to 3.26 for 12 layers, centre 8)."""
    layers = torch.arange(depth, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (layers - centre) ** 2) / math.sqrt(2 * math.pi)
    before = pdf[layers < centre].sum()
    if before <= 0:
        raise ValueError(f"target_depth: A-ViT's target needs at least one layer before {centre}")
    return pdf * (0.98 / before)


def distribution_loss(D: torch.Tensor, centre: float, avit: bool = False) -> torch.Tensor:
    """KL term of the layer distribution ``D`` (L,): ``D̂ = clamp(D / ΣD, 0.01, 0.99)``.

    TPC (default): ``KL(D̂ ‖ T)`` against the normalised prior, as the paper writes it. ``avit=True``:
    A-ViT's ``KL(T_avit ‖ D̂) / L`` against its unnormalised prior, counted only when positive."""
    D_hat = (D / D.sum().clamp_min(torch.finfo(D.dtype).tiny)).clamp(0.01, 0.99)
    if avit:
        target = avit_target(D.numel(), centre).to(D)
        kl = F.kl_div(D_hat.log(), target, reduction="batchmean")
        return kl.clamp_min(0.0)  # A-ViT adds it only when positive
    target = distribution_target(D.numel(), centre)
    return (D_hat * (D_hat.log() - target.log().to(D))).sum()
