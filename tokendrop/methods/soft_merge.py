"""Pieces shared by the learned soft-merging methods (SiT, PatchMerger, Sinkhorn): ``K`` learned output
slots built per site, each output token a weighted combination of every entering token, recorded by the
arg-max of each token's weights."""

from __future__ import annotations

import torch

from ..reduction.base import Reducer
from ..reduction.state import TokenState
from .clustering import check_clusters, replace_by_clusters


class SoftMerger(Reducer):
    """Base of the soft-merging methods: ``keep`` learned slots of width ``dim``, acting before the block.

    The site supplies ``dim``, ``keep`` and ``tokens_in`` when they are not given (a per-site factory);
    ``keep`` may not exceed ``tokens_in``. When a schedule later asks for fewer tokens than there are
    slots (a curriculum), the first ``keep`` slots are used; asking for more is an error.

    Bookkeeping (:meth:`record`): every entering token — and so every original patch it carries — belongs
    to the output token it weighs most (``assignment``; taken on the log-weights, so that weights which
    underflow to 0 in float32 still rank); ``size`` counts the original patches so assigned
    (an output token no patch picks has size 0; sizes sum to P); each output token's ``source`` is the
    patch of the entering token with the largest weight in it (which may itself weigh more in another
    slot). ``prop_attn=True`` adds ``log size`` of these counts to the key logits of every later block
    (ToMe's proportional attention; a size-0 token is then ignored as a key); off by default, as in the
    reference.
    """

    default_position = "before"

    def __init__(self, dim: int, keep: int, tokens_in: int | None = None, prop_attn: bool = False,
                 min_dim: int = 1) -> None:
        super().__init__()
        if not (isinstance(dim, int) and not isinstance(dim, bool) and dim >= min_dim):
            raise ValueError(f"dim: {dim!r} is outside the allowed range [{min_dim}, inf)")
        high = "inf)" if tokens_in is None else f"{tokens_in}] (the tokens entering the site)"
        if not (isinstance(keep, int) and not isinstance(keep, bool) and 1 <= keep
                and (tokens_in is None or keep <= tokens_in)):
            raise ValueError(f"keep: {keep!r} is outside the allowed range [1, {high}")
        self.slots = keep
        self.prop_attn = bool(prop_attn)

    def extra_repr(self) -> str:
        return f"slots={self.slots}, prop_attn={self.prop_attn}"

    def begin_forward(self, state: TokenState, x: torch.Tensor, training: bool) -> None:
        if not self.prop_attn:
            state.size_bias = False

    def check(self, keep: int, state: TokenState, x: torch.Tensor) -> int:
        """The patch-token count of ``x``; ``ValueError`` when ``keep`` exceeds the slots or the tokens."""
        name = self.registered_name
        if keep > self.slots:
            raise ValueError(f"keep: {keep} is outside the allowed range [1, {self.slots}] ({name} has "
                             f"{self.slots} learned slots)")
        return check_clusters(name, keep, state, x)

    @staticmethod
    def record(state: TokenState, x: torch.Tensor, tokens: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
        """Replace the patch tokens of ``x`` by ``tokens`` (B, K, C), where ``log_weights`` (B, N, K) is the
        log of the weight of entering token ``i`` in output token ``k``, recorded by arg-max (see the class)."""
        with torch.no_grad():
            assignment = log_weights.argmax(dim=2)  # each entering token's output token
            strongest = log_weights.argmax(dim=1)  # each output token's heaviest entering token
        return replace_by_clusters(state, x, tokens, assignment, strongest)
