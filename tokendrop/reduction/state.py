"""Per-forward token bookkeeping shared by every reduction site of one model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SiteRecord:
    """What one site did in the last forward (for analysis and logging)."""

    block: int
    position: str
    tokens_in: int  # patch tokens entering the site
    kept: int  # patch tokens leaving it
    source: torch.Tensor  # (B, kept): original patch index of every kept token


@dataclass
class TokenState:
    """Token bookkeeping of one forward pass.

    ``source[b, j]`` is the original patch index (row-major on ``grid``) of the j-th current patch token;
    ``None`` means the identity (nothing reduced yet). ``size[b, t]`` is how many original tokens token t
    stands for (set by merging reducers; ``None`` = all 1); when set, attention adds ``log(size)`` to the
    logits of each key (ToMe's proportional attention). Prefix tokens (CLS, distillation, registers) come
    first and are never reduced.
    """

    num_prefix: int
    grid: tuple[int, int]
    source: torch.Tensor | None = None
    size: torch.Tensor | None = None
    keep_fraction: float = 1.0  # product of (1 − d) over the sites passed; for relative_to="original"
    records: list[SiteRecord] = field(default_factory=list)

    @property
    def num_patches(self) -> int:
        """Patch tokens of the unreduced image."""
        return self.grid[0] * self.grid[1]

    def current_source(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N) original patch index of each current patch token of ``x`` (B, prefix+N, C)."""
        if self.source is None:
            n = x.shape[1] - self.num_prefix
            return torch.arange(n, device=x.device).expand(x.shape[0], n)
        return self.source

    def attention_bias(self) -> torch.Tensor | None:
        """Additive per-key attention logit bias for the current tokens, or None."""
        return None if self.size is None else self.size.log()

    def select(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Keep the prefix tokens and the patch tokens at ``idx`` (B, k), in ``idx`` order; update the
        bookkeeping. ``idx`` must not require grad (selection is not differentiable)."""
        p = self.num_prefix
        gather_idx = idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        out = torch.cat([x[:, :p], torch.gather(x[:, p:], 1, gather_idx)], dim=1)
        self.source = torch.gather(self.current_source(x), 1, idx)
        if self.size is not None:
            self.size = torch.cat([self.size[:, :p], torch.gather(self.size[:, p:], 1, idx)], dim=1)
        return out
