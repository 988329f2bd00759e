"""TPC-ViT's parameters with the reconstruction's defaults (research/tpc-vit-spec.md §3–4), checked once."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .stabiliser import METRICS

MODES = ("masked", "packed")
RESTART_MODES = ("none", "skip")
REGULARISE = ("break", "gates")
DISTRIBUTIONS = ("active", "halting", "avit")

#: A-ViT's halting arithmetic: one gate (no restart factor), no regulariser, no stabiliser, A-ViT's
#: distribution prior. Use as ``attach_tpc(model, **AVIT_COMPAT, gamma=10, beta=30)`` (A-ViT-Tiny's gate).
AVIT_COMPAT = {"restart_gate": False, "xi": 1.0, "kappa": None, "restart_mode": "none", "distribution": "avit"}


@dataclass(frozen=True)
class TPCParams:
    """Everything :func:`tokendrop.attach_tpc` accepts besides the model.

    * ``gamma``, ``beta`` — gate ``σ(γ·y_i − β)`` (β subtracted: read literally as ``+β`` every token halts
      at layer 1); ``learn_gates`` makes both learnable parameters (``tpc.gamma``, ``tpc.beta``);
    * ``dims`` — the channels ``(i₁, i₂)`` of the block output feeding the pause and non-restart gates;
    * ``restart_gate`` — False forces the non-restart probability to 1 (``b = P1``, A-ViT's gate);
    * ``delta`` — a token halts once its cumulative break probability reaches ``1 − δ``;
    * ``xi`` — distribution regulariser ``b ← ξ·b + (1−ξ)·mean_active(b)`` (1 = off); ``regularise``
      ``"break"`` applies it to ``b`` (Eq. 9), ``"gates"`` to P1 and P2 separately;
    * ``phi_p``, ``phi_d`` — weights of the ponder and distribution losses;
    * ``kappa`` — stabiliser: each query attends to its κ nearest keys (None = dense attention);
      ``metric`` ``"euclidean"`` | ``"dot"``; ``shared_neighbours`` one key set for all heads;
    * ``target_depth`` — 0-based centre of the Gaussian layer prior (None: ``round(2L/3)``, 8 for 12 blocks);
    * ``distribution`` — what ``D^l`` is: ``"active"`` mean ``b`` over the tokens a layer processed (the
      paper's Eq. 12 as reconstructed), ``"halting"`` mean halting weight ``p^l`` (PonderNet), ``"avit"``
      A-ViT's loss (mean raw gate over all tokens, ``KL(T‖D̂)/L`` against its unnormalised prior, only > 0);
    * ``restart_mode`` — ``"none"`` (Algorithm 1: a halted token never returns) or ``"skip"`` (not in the
      paper: a running patch token with pause probability ≥ 0.5 sits out the next layer, then rejoins);
    * ``mode`` — ``"masked"`` (every token computed, halted ones masked: the paper's way, no saving) or
      ``"packed"`` (each layer runs only its tokens, packed per image and padded to the batch's longest).
    """

    gamma: float = 5.0
    beta: float = 40.0
    dims: tuple[int, int] = (0, 1)
    restart_gate: bool = True
    delta: float = 0.01
    xi: float = 0.5
    regularise: str = "break"
    phi_p: float = 5e-4
    phi_d: float = 0.1
    kappa: int | None = 100
    metric: str = "euclidean"
    shared_neighbours: bool = False
    target_depth: float | None = None
    distribution: str = "active"
    restart_mode: str = "none"
    mode: str = "masked"
    learn_gates: bool = False

    def check(self, depth: int | None = None, width: int | None = None) -> None:
        """Raise ``ValueError`` naming the first parameter outside its range for a model of ``depth`` blocks
        and token width ``width`` (None: the bounds that need the model are not checked, as for a config)."""
        for name, allowed in (("mode", MODES), ("restart_mode", RESTART_MODES), ("regularise", REGULARISE),
                              ("distribution", DISTRIBUTIONS), ("metric", METRICS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if not (isinstance(self.gamma, (int, float)) and math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"gamma: {self.gamma!r} must be a finite number > 0")
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta)):
            raise ValueError(f"beta: {self.beta!r} must be a finite number")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta: {self.delta} is outside (0, 1)")
        if not 0.0 <= self.xi <= 1.0:
            raise ValueError(f"xi: {self.xi} is outside [0, 1]")
        for name in ("phi_p", "phi_d"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name}: {getattr(self, name)} must be >= 0")
        if self.kappa is not None and (isinstance(self.kappa, bool) or not isinstance(self.kappa, int) or self.kappa < 1):
            raise ValueError(f"kappa: {self.kappa!r} must be an integer >= 1 (or None for dense attention)")
        dims = tuple(self.dims)
        top = math.inf if width is None else width - 1
        if (len(dims) != 2 or len(set(dims)) != 2
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= top for d in dims)):
            raise ValueError(f"dims: {self.dims!r} must be two distinct channel indices in [0, {top}]")
        last = math.inf if depth is None else depth - 1
        if self.target_depth is not None and not 0 <= self.target_depth <= last:
            raise ValueError(f"target_depth: {self.target_depth} is outside [0, {last}]")

    def centre(self, depth: int) -> float:
        """The prior's centre for a model of ``depth`` blocks."""
        return float(self.target_depth) if self.target_depth is not None else float(round(2 * depth / 3))
