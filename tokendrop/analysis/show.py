"""``tokendrop show``: token maps — for a few validation images, what every method keeps at every site.

One PNG: a row per image; the image, then a panel per method and site. Where a site pruned, the patches
it dropped are greyed; where it merged (some token carries more than one patch), every patch is tinted
with the colour of its cluster and dropped patches are grey (see :mod:`tokendrop.analysis.patterns`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import reduction as red
from . import figures
from .common import (MethodSpec, Source, UsageError, attached, check_blocks, check_count, check_keep_rates,
                     check_methods, check_options, default_blocks, load_source, usage_errors)
from .patterns import Patterns, forward_features, site_patterns


def pictures(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised images ``(N, C, H, W)`` back to RGB ``(N, H, W, 3)`` in [0, 1] (grey ones repeated)."""
    x = images.float() * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    x = x.clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


@torch.no_grad()
def patterns_of(source: Source, spec: MethodSpec, blocks: Sequence[int], keep_rate: float, images: torch.Tensor,
                seed: int = 0) -> Patterns:
    """The patterns of ``spec`` at ``blocks`` keeping ``keep_rate`` on ``images`` (one forward)."""
    torch.manual_seed(seed)
    model = attached(source.model, spec, blocks, keep_rate)
    try:
        forward_features(model, images.to(source.device))
        return site_patterns(model, images.shape[0])
    finally:
        red.detach(model)


def run(args: argparse.Namespace) -> int:
    """The ``show`` command (exit 2 after a one-line error for a bad argument, nothing written)."""
    return usage_errors("show", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    opts = check_options(args)
    (keep_rate,) = check_keep_rates([args.keep_rate], "--keep-rate")
    count = check_count(args.images, "--images", 1)
    source = load_source(args, opts.seed)
    count = min(count, len(source.val))
    indices = [check_count(i, "--indices", 0) for i in args.indices] if args.indices else list(range(count))
    bad = [i for i in indices if i >= len(source.val)]
    if bad:
        raise UsageError(f"--indices: {bad[0]} is outside the allowed range [0, {len(source.val) - 1}]")
    blocks = check_blocks(args.blocks, source.depth) if args.blocks else default_blocks(source.depth)
    specs = check_methods(source.model, opts.methods, blocks, opts.explicit)
    images = torch.stack([source.val[i][0] for i in indices])
    panels = {s.label: patterns_of(source, s, blocks, keep_rate, images, opts.seed) for s in specs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figures.token_maps(pictures(images, source.info.mean, source.info.std), panels, source.grid, blocks, out)
    print(f"wrote {out}")
    return 0
