"""Reduction patterns from what a model's sites recorded (``tokendrop.last_reduction(model).records``).

For every site, in block order, and every image:

* **keep mask** ``(P,)`` bool — patch ``p`` is *kept* when it is the representative of an output token:
  ``assignment[p] ≥ 0`` and ``source[assignment[p]] == p``. For pruning this is exactly ``assignment ≥ 0``
  (every kept token carries its own patch). For merging it marks one patch per cluster: the cluster centre
  where the method records it as the token's source, otherwise the foundation's representative (the
  member with the smallest patch index). Seed 004 compares the centres of hard-clustering methods with
  IoA/IoU the same way (§5.1).
* **cluster labels** ``(P,)`` int — ``assignment``: the output token carrying each patch, −1 where the
  patch was dropped (the dropped patches form one label). For pruning every kept patch is its own cluster.
* **merges** — whether some output token carries more than one patch (a merge; EViT's fused token too).

A site that kept every token in a forward (keep rate 1) records nothing; it inherits the pattern of the
site before it (the identity before the first site).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from ..reduction import last_reduction, sites
from ..reduction.state import SiteRecord


def keep_mask(record: SiteRecord) -> torch.Tensor:
    """(B, P) bool: the patches that are the representative of an output token of ``record``."""
    a = record.assignment
    rep = torch.gather(record.source, 1, a.clamp_min(0))
    patches = torch.arange(a.shape[1], device=a.device)
    return (a >= 0) & (rep == patches)


def cluster_labels(record: SiteRecord) -> torch.Tensor:
    """(B, P) long: the output token carrying each patch, −1 where it was dropped."""
    return record.assignment.long()


def merges(record: SiteRecord) -> torch.Tensor:
    """(B,) bool: whether some output token carries more than one original patch."""
    a = record.assignment
    slot = torch.where(a >= 0, a, torch.full_like(a, a.shape[1])).long()
    counts = torch.zeros(a.shape[0], a.shape[1] + 1, dtype=torch.long, device=a.device)
    counts.scatter_add_(1, slot, torch.ones_like(slot))
    return (counts[:, :-1] > 1).any(dim=1)


@dataclass
class Patterns:
    """Patterns of ``N`` images at ``S`` sites over ``P`` patches (NumPy, on the CPU)."""

    blocks: list[int]  # the site blocks, in order
    keep: np.ndarray  # (N, S, P) bool
    labels: np.ndarray  # (N, S, P) int16 (−1 = dropped)
    merged: np.ndarray  # (N, S) bool: some token carried more than one patch

    @property
    def kept(self) -> np.ndarray:
        """(N, S) number of kept patches (representatives) per image and site."""
        return self.keep.sum(-1)

    @staticmethod
    def concatenate(parts: list["Patterns"]) -> "Patterns":
        """The patterns of ``parts`` one after the other (same sites)."""
        return Patterns(parts[0].blocks, *(np.concatenate([getattr(p, f) for p in parts]) for f in ("keep", "labels", "merged")))


def site_patterns(model: nn.Module, batch: int) -> Patterns:
    """The patterns of the model's last forward of ``batch`` images at every attached site."""
    reg_sites = sites(model)
    if not reg_sites:
        raise ValueError("model: no reduction sites attached (tokendrop.attach first)")
    state = last_reduction(model)
    by_block = {r.block: r for r in state.records}
    num_patches = state.num_patches
    identity = torch.arange(num_patches).expand(batch, num_patches)
    keep, labels = identity >= 0, identity
    merged = torch.zeros(batch, dtype=torch.bool)
    out_keep, out_labels, out_merged = [], [], []
    for site in reg_sites:
        rec = by_block.get(site.block)
        if rec is not None:
            if rec.assignment.shape != (batch, num_patches):
                raise ValueError(f"batch: the last forward had {rec.assignment.shape[0]} images, not {batch}")
            keep, labels, merged = keep_mask(rec).cpu(), cluster_labels(rec).cpu(), merges(rec).cpu()
        out_keep.append(keep)
        out_labels.append(labels)
        out_merged.append(merged)
    return Patterns([s.block for s in reg_sites], torch.stack(out_keep, 1).numpy(),
                    torch.stack(out_labels, 1).to(torch.int16).numpy(), torch.stack(out_merged, 1).numpy())


@dataclass
class Collection:
    """What :func:`collect` gathered over a data set for one model configuration."""

    patterns: Patterns | None  # None when the model has no sites (the unreduced baseline)
    features: np.ndarray  # (N, C) float32: the pre-logits (CLS) features
    correct: np.ndarray  # (N,) bool: top-1 prediction right

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy in percent."""
        return 100.0 * float(self.correct.mean()) if len(self.correct) else float("nan")


def forward_features(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pre-logits features, logits)`` of a timm ViT in one forward pass."""
    tokens = model.forward_features(images)
    return model.forward_head(tokens, pre_logits=True), model.forward_head(tokens)


@torch.no_grad()
def collect(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
            max_images: int = 0, tick: Callable[[int], None] | None = None) -> Collection:
    """Run ``model`` (eval mode) over ``batches`` of ``(images, labels)`` — at most ``max_images`` images when
    positive — and gather the patterns at every attached site, the features and the top-1 hits.
    ``tick(n)`` is called after each batch with its image count (progress bars)."""
    model.eval()
    parts, feats, hits = [], [], []
    seen = 0
    has_sites = bool(sites(model))
    for images, targets in batches:
        if max_images and seen >= max_images:
            break
        if max_images:
            images, targets = images[:max_images - seen], targets[:max_images - seen]
        feat, logits = forward_features(model, images.to(device))
        if has_sites:
            parts.append(site_patterns(model, images.shape[0]))
        feats.append(feat.float().cpu().numpy())
        hits.append((logits.argmax(1).cpu() == targets).numpy())
        seen += images.shape[0]
        if tick is not None:
            tick(images.shape[0])
    if not feats:
        raise ValueError("data: no images to analyse")
    return Collection(Patterns.concatenate(parts) if parts else None, np.concatenate(feats), np.concatenate(hits))
