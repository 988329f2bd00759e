"""Reduction-pattern analysis ("Which Tokens to Use?", Haurum et al. 2023, §5 and supplementary §E–F).

    import tokendrop as td
    from tokendrop import analysis as ta

    td.attach(model, "topk", blocks=[3, 6, 9], schedule=td.Constant(0.7), when="eval", relative_to="original")
    model(images)
    p = ta.site_patterns(model, len(images))      # keep masks / cluster labels (N, S, P) at every site
    ta.iou(p.keep[:, 0], other.keep[:, 0])        # one value per image

Metrics (:mod:`.metrics`, NumPy, batched over leading dimensions) and the pattern helpers (:mod:`.patterns`,
torch) are imported on first use, so importing this package (as the CLI's parser does) loads neither. The commands
``tokendrop analyze``, ``sweep`` and ``show`` live in :mod:`.analyze`, :mod:`.sweep` and :mod:`.show`.
"""

from importlib import import_module
from typing import Any

_METRICS = ("as_numpy", "averaged_pattern", "cka", "homogeneity", "ioa", "ioa_lower_bound", "ioa_lower_bounds", "iou",
            "iou_lower_bound", "iou_lower_bounds", "nmi", "pearson", "procrustes_distance", "spearman",
            "stage_keep_counts")
_PATTERNS = ("Collection", "Patterns", "cluster_labels", "collect", "keep_mask", "merges", "site_patterns")

__all__ = [*_METRICS, *_PATTERNS]


def __getattr__(name: str) -> Any:
    """The metrics and pattern helpers, imported on first use."""
    if name in _METRICS:
        return getattr(import_module(".metrics", __name__), name)
    if name in _PATTERNS:
        return getattr(import_module(".patterns", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
