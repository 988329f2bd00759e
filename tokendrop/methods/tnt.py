"""TNT — Training Noise Token pruning (Rao, Jiang & Moyer, 2024; seed 002).

A relevance head ``α_l = softmax_n(Linear_C→1(x_patch))`` after block l. In **training** it allocates noise
instead of dropping (the noise allocator): ``x ← LayerNorm(x)`` over the whole sequence (eps 1e-6, no
learned affine: the anchor's ``alpha_norm`` stays at weight 1, bias 0), then
``x_patch ← x_patch + β·(1 − α) ⊙ ε`` with ε ~ N(0, I) and β = 0.02 a *standard deviation*; the prefix
(CLS, distillation token) gets no noise and every token stays. Only the α heads learn: train with a
frozen backbone, ``optim.trainable=reducer`` (the paper trains 40 epochs, cross-entropy only, no
auxiliary loss). At **evaluation** the tokens are pruned (the anchor applies the LayerNorm in training
only, a train/test mismatch kept by default; ``alpha_norm=False`` drops it in training as well):

* top ``keep + s`` patch tokens by α (descending), then the similarity step by random partition removes
  s of them (:func:`random_sim_prune`), so exactly ``keep`` survive, in descending α;
* with ``similarity=0`` the site keeps the top ``keep`` by α (the anchor's multi-layer pruning sites);
* ``importance="random"`` ranks by uniform noise instead of α, needs no head and adds no noise in
  training: the anchor's multi-layer similarity pre-prune before block 0.

**Sites.** "After block l" is a site ``before`` block l+1 (the default position), whose head is saved as
``blocks.{l+1}.token_site.reducer.alpha_head``. ``td.attach(model, lambda f: td.reducer("tnt",
dim=f.dim), blocks=[3, 6, 9], schedule=td.Constant(0.7), relative_to="original", when="always")``
adds noise after blocks 2, 5 and 8 in training (the site runs without reducing) and, at evaluation,
applies the single-layer step at each site, keeping exactly 137/96/67 patch tokens on DeiT.
:func:`attach_tnt` builds the paper's protocols: noise after blocks 0–4 in training, and either one
pruning location with the similarity step there (single-layer, s = 25 for DeiT, 30 for ViT) or a
similarity pre-prune of s = 40 tokens before block 0 and top-k by α at each location (multi-layer, rates
compounding on the current count).

**Randomness.** ε and the partition come from a generator per site and device, seeded with
``seed + 1_000_003 · block`` when first used (reproducible runs; it advances with every draw and restarts
with the model). ``seed=None`` draws from the global RNG, as the anchor (``randn_like``, ``randperm``).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from ..reduction.api import _unwrap, attach
from ..reduction.base import Reducer, SiteInputs
from ..reduction.registry import register_reducer
from ..reduction.schedules import Constant, Remove

IMPORTANCE = ("alpha", "random")
MODES = ("single", "multi")
ALPHA_NORM_EPS = 1e-6  # the anchor's alpha_norm is the ViT's LayerNorm (eps 1e-6), not a PyTorch default
SEED_STRIDE = 1_000_003


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@register_reducer("tnt")
class TNT(Reducer):
    """TNT's noise allocator (training) and pruning step (evaluation); see the module docstring.

    ``dim``: token width C (needed for the α head; build per site with a factory). ``importance``:
    ``alpha`` (learned head) or ``random`` (no head, the multi-layer pre-prune). ``similarity``: s, the
    tokens the random-partition similarity step removes at evaluation (25: the paper's single-layer
    DeiT setting; 0: top-k by importance only). ``beta``: noise standard deviation (0.02).
    ``alpha_norm``: apply the frozen LayerNorm before adding noise in training (True, as the anchor).
    ``seed``: seed of the site's generator; None = the global RNG (the anchor).

    The α head starts from trunc-normal(0.02) weights and a zero bias (the anchor's non-distilled class;
    its distilled class leaves PyTorch's default Linear init)."""

    default_position = "before"

    def __init__(self, dim: int | None = None, importance: str = "alpha", similarity: int = 25, beta: float = 0.02,
                 alpha_norm: bool = True, seed: int | None = 0) -> None:
        super().__init__()
        if importance not in IMPORTANCE:
            raise ValueError(f"importance: {importance!r} is not one of {', '.join(IMPORTANCE)}")
        if importance == "alpha" and not (_is_int(dim) and dim > 0):
            raise ValueError(f"dim: {dim!r} must be a positive int (the token width of the α head)")
        if not (_is_int(similarity) and similarity >= 0):
            raise ValueError(f"similarity: {similarity!r} must be a whole number >= 0")
        if not (isinstance(beta, (int, float)) and beta >= 0):
            raise ValueError(f"beta: {beta!r} is outside the allowed range [0, inf)")
        if not isinstance(alpha_norm, bool):
            raise ValueError(f"alpha_norm: {alpha_norm!r} is not one of True, False")
        if seed is not None and not (_is_int(seed) and seed >= 0):
            raise ValueError(f"seed: {seed!r} must be None or a whole number >= 0")
        self.importance = importance
        self.similarity = similarity
        self.beta = float(beta)
        self.alpha_norm = alpha_norm
        self.seed = seed
        self.alpha_head = nn.Linear(dim, 1) if importance == "alpha" else None
        if self.alpha_head is not None:
            trunc_normal_(self.alpha_head.weight, std=0.02)
            nn.init.zeros_(self.alpha_head.bias)
        self._generators: dict[str, torch.Generator] = {}

    def extra_repr(self) -> str:
        return (f"importance={self.importance!r}, similarity={self.similarity}, beta={self.beta}, "
                f"alpha_norm={self.alpha_norm}, seed={self.seed}")

    def output_count(self, n_in: int, keep: int) -> int:
        return n_in if self.training else min(n_in, keep)

    def forward(self, x: torch.Tensor, keep: int, inputs: SiteInputs) -> torch.Tensor:
        state = inputs.state
        p = state.num_prefix
        gen = self._generator(x.device, inputs.block)
        if self.training:
            if self.alpha_head is None:
                return x  # random importance only prunes (the multi-layer pre-prune is an evaluation step)
            return self._add_noise(x, self._relevance(x[:, p:], state.patch_mask(), gen), p, gen)
        if keep >= x.shape[1] - p:
            return x
        with torch.no_grad():
            idx = prune_indices(self._relevance(x[:, p:], state.patch_mask(), gen), x[:, p:], keep, self.similarity, gen)
        return state.select(x, idx)

    def _relevance(self, z: torch.Tensor, mask: torch.Tensor | None, gen: torch.Generator | None) -> torch.Tensor:
        """(B, N) importance: α = softmax over the patch tokens of the head's logits, or uniform noise."""
        if self.alpha_head is None:
            logits = torch.rand(z.shape[:2], generator=gen, device=z.device)
        else:
            logits = self.alpha_head(z).squeeze(-1).float()
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        return logits if self.alpha_head is None else logits.softmax(dim=-1)

    def _add_noise(self, x: torch.Tensor, alpha: torch.Tensor, p: int, gen: torch.Generator | None) -> torch.Tensor:
        """The noise allocator: LayerNorm the sequence, add β·(1 − α)·ε to the patch tokens."""
        if self.alpha_norm:
            x = F.layer_norm(x, x.shape[-1:], eps=ALPHA_NORM_EPS)
        z = x[:, p:]
        eps = torch.randn(z.shape, generator=gen, device=z.device, dtype=z.dtype)
        noise = self.beta * (1.0 - alpha).to(z.dtype).unsqueeze(-1) * eps
        return torch.cat([x[:, :p], z + noise], dim=1)

    @property
    def capturable(self) -> bool:  # noqa: D102 — a seeded site draws from its own generator
        return self.seed is None and super().capturable

    def _generator(self, device: torch.device, block: int) -> torch.Generator | None:
        """This site's generator on ``device`` (None: the global RNG)."""
        if self.seed is None:
            return None
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed + SEED_STRIDE * block)
        return self._generators[key]


def prune_indices(importance: torch.Tensor, z: torch.Tensor, keep: int, similarity: int,
                  gen: torch.Generator | None = None) -> torch.Tensor:
    """(B, keep) patch tokens kept by TNT's evaluation step: the top ``keep + s`` by ``importance``
    (descending; all tokens in their current order when they are all candidates), then
    :func:`random_sim_prune` removes s of them. s is ``similarity`` capped so that at most half the
    candidates can go (the partition's side A) and no more than are there."""
    n = z.shape[1]
    s = min(similarity, keep, n - keep)
    c = keep + s
    if c == n:
        cand = torch.arange(n, device=z.device).expand(z.shape[0], n)
    else:
        cand = importance.topk(c, dim=1, sorted=True).indices
    if s == 0:
        return cand
    gather = cand.unsqueeze(-1).expand(-1, -1, z.shape[-1])
    chosen = random_sim_prune(torch.gather(importance, 1, cand), torch.gather(z, 1, gather), s, gen)
    return torch.gather(cand, 1, chosen)


def random_sim_prune(importance: torch.Tensor, z: torch.Tensor, r: int,
                     gen: torch.Generator | None = None) -> torch.Tensor:
    """TNT §3.1, similarity pruning by random partition: one permutation shared by the batch splits the
    n tokens into A (its first ⌊n/2⌋) and B (the rest); each token of A scores its largest cosine
    similarity to B, and the r tokens of A that score highest are removed. Returns the (B, n − r) indices
    of the remaining tokens in descending ``importance``. Requires r ≤ ⌊n/2⌋."""
    B, n, _ = z.shape
    half = n // 2
    if not 0 <= r <= half:
        raise ValueError(f"r: {r} is outside the allowed range [0, {half}] (at most the first half of {n} tokens)")
    perm = torch.randperm(n, generator=gen, device=gen.device if gen is not None else "cpu").to(z.device)
    a_idx, b_idx = perm[:half], perm[half:]
    zn = F.normalize(z.float(), dim=-1)
    best = (zn[:, a_idx] @ zn[:, b_idx].transpose(1, 2)).amax(dim=-1)  # (B, |A|)
    drop = a_idx[best.topk(r, dim=1, sorted=False).indices]  # (B, r) token indices
    removed = torch.zeros(B, n, dtype=torch.bool, device=z.device).scatter_(1, drop, True)
    ranked = importance.float().masked_fill(removed, float("-inf"))
    return ranked.argsort(dim=1, descending=True)[:, :n - r]


def attach_tnt(model: nn.Module, prune_after: Iterable[int] = (2,), keep_rate: float | Sequence[float] = 0.5,
               noise_after: Iterable[int] = range(5), mode: str | None = None, similarity: int | None = None,
               **options) -> nn.Module:
    """Attach TNT as the paper runs it (0-based block indices; "after block l" = a site before block l+1).

    * ``noise_after``: blocks after which the noise allocator runs in training (the anchor: 0–4);
    * ``prune_after``: blocks after which evaluation prunes, each keeping ``int(N·rate)`` of the N patch
      tokens entering (``keep_rate``: one rate, or one per location — e.g. [1, .95, .95]);
    * ``mode``: ``single`` — the similarity step at each location (s = ``similarity``, default 25; 30
      for ViT); ``multi`` — a similarity pre-prune of s tokens (default 40) before block 0, then top-k by
      α at each location. Default: single with one location, else multi (the anchor's rule).

    ``options`` go to every :class:`TNT` (``beta``, ``alpha_norm``, ``seed``). A location outside
    ``noise_after`` prunes with an untrained head. Returns ``model``.
    """
    base = _unwrap(model)
    depth = len(base.blocks)
    prune, noise = list(prune_after), list(noise_after)
    for name, blocks in (("prune_after", prune), ("noise_after", noise)):
        bad = [b for b in blocks if not (_is_int(b) and 0 <= b <= depth - 2)]
        if bad or len(set(blocks)) != len(blocks):
            raise ValueError(f"{name}: {blocks} must be distinct block indices in [0, {depth - 2}]")
    if not prune:
        raise ValueError("prune_after: give at least one block index")
    rates = list(keep_rate) if isinstance(keep_rate, (list, tuple)) else [keep_rate] * len(prune)
    if len(rates) != len(prune):
        raise ValueError(f"keep_rate: {len(rates)} rates for {len(prune)} locations in prune_after")
    mode = mode if mode is not None else ("single" if len(prune) == 1 else "multi")
    if mode not in MODES:
        raise ValueError(f"mode: {mode!r} is not one of {', '.join(MODES)}")
    s = similarity if similarity is not None else (25 if mode == "single" else 40)
    dim = int(base.blocks[0].attn.qkv.in_features)

    def make(sim: int) -> TNT:
        return TNT(dim=dim, similarity=sim, **options)

    schedules = {b: Constant(r) for b, r in zip(prune, rates)}  # validates the rates
    if mode == "multi":
        attach(model, TNT(importance="random", similarity=s, **options), blocks=[0], schedule=Remove(s), when="eval",
               position="before")
    for b in sorted(set(prune) | set(noise)):
        when = "always" if b in prune and b in noise else ("eval" if b in prune else "train")
        attach(model, make(s if mode == "single" else 0), blocks=[b + 1], schedule=schedules.get(b, Constant(1.0)),
               when=when, position="before", always_reduce=True)
    return model
