"""``tokendrop analyze``: which tokens each method keeps, compared across keep rates and across methods.

For every method × keep rate (sites at the same blocks, stage s keeping ``int(P·r^s)``) the model runs over
the validation images and the patterns at every site are gathered (:mod:`tokendrop.analysis.patterns`).
The report follows "Which Tokens to Use?" §5:

* ``keep_rate_consistency`` (§5.1, Fig. 3): per method, stage and pair of keep rates ``r1 > r2`` — IoA of
  the keep masks with its lower bound for the counts kept, and the homogeneity of the clusters;
* ``method_similarity`` (§5.2 across methods instead of backbones, Fig. 4): per keep rate, stage and pair
  of methods — IoU (with its lower bound) and NMI;
* ``runs[].averaged_pattern`` (§5.3, Fig. 5) and ``pattern_correlation`` (Pearson between methods);
* ``feature_alignment``: orthogonal Procrustes distance and linear CKA of the final CLS features between
  methods, and of every run to the unreduced model (``runs[].procrustes_to_unreduced``);
* ``proxies`` (§5.5): Spearman's correlation between IoU / NMI / Procrustes and the accuracy difference to
  an anchor method (and to the unreduced model for Procrustes).

Figures: ``keep_rate_consistency.png``, ``similarity_iou.png``, ``similarity_nmi.png``,
``averaged_patterns.png``. Every run's patterns stay in memory until the report is made (about
3 bytes × images × sites × patches per run, plus the features); cap the images with ``--max-images``.
Learned methods run post hoc with freshly initialised parameters: the analysis attaches new sites (a
checkpoint's own training-time sites are removed).
"""

from __future__ import annotations

import argparse
import json
import math
from itertools import combinations
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .. import reduction as red
from . import figures
from . import metrics as M
from .common import (MethodSpec, Source, UsageError, attached, check_blocks, check_keep_rates, check_methods,
                     check_options, default_blocks, load_source, progress_bar, usage_errors)
from .patterns import Collection, collect


def _mean(x: Any) -> float | None:
    """The mean of ``x`` as a float, None when undefined."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0 or np.all(np.isnan(x)):
        return None
    return float(np.nanmean(x))


def run_all(source: Source, methods: Sequence[MethodSpec], keep_rates: Sequence[float], blocks: Sequence[int],
            batch_size: int, max_images: int = 0, seed: int = 0, progress: bool = True
            ) -> tuple[Collection, dict[tuple[str, float], Collection]]:
    """The unreduced model's collection and one per (method label, keep rate)."""
    loader = source.loader(batch_size, max_images)
    n = len(loader.dataset)
    bar = progress_bar(n * (1 + len(methods) * len(keep_rates)), "analyze", progress)
    try:
        baseline = collect(source.model, loader, source.device, tick=bar.update)
        runs = {}
        for spec in methods:
            for r in keep_rates:
                bar.set_postfix_str(f"{spec.label} r={r}")
                torch.manual_seed(seed)
                model = attached(source.model, spec, blocks, r)
                try:
                    runs[spec.label, r] = collect(model, loader, source.device, tick=bar.update)
                finally:
                    red.detach(model)
    finally:
        bar.close()
    return baseline, runs


def _stage_rows(a: Any, b: Any, blocks: Sequence[int], num_patches: int, pruning: str, lower: Any,
                clustering: str) -> list[dict]:
    """Per stage: a pruning metric of the keep masks with its lower bound, and a clustering metric."""
    prune = {"ioa": M.ioa, "iou": M.iou}[pruning]
    cluster = {"homogeneity": M.homogeneity, "nmi": M.nmi}[clustering]
    rows = []
    for s, block in enumerate(blocks):
        rows.append({"stage": s + 1, "block": block, pruning: _mean(prune(a.keep[:, s], b.keep[:, s])),
                     f"{pruning}_lower_bound": _mean(lower(num_patches, a.kept[:, s], b.kept[:, s])),
                     clustering: _mean(cluster(a.labels[:, s], b.labels[:, s]))})
    return rows


def report(baseline: Collection, runs: dict[tuple[str, float], Collection], methods: Sequence[str],
           keep_rates: Sequence[float], blocks: Sequence[int], grid: tuple[int, int], anchor: str | None = None) -> dict:
    """Every metric of the module docstring from the collections of :func:`run_all` (JSON-ready)."""
    num_patches = grid[0] * grid[1]
    averaged = {k: M.averaged_pattern(c.patterns.keep) for k, c in runs.items()}
    out: dict[str, Any] = {
        "num_patches": num_patches, "grid": list(grid), "blocks": list(blocks), "methods": list(methods),
        "keep_rates": list(keep_rates), "images": int(len(baseline.correct)),
        "unreduced": {"accuracy": baseline.accuracy},
        "runs": [{"method": m, "keep_rate": r, "accuracy": c.accuracy,
                  "kept": [float(v) for v in c.patterns.kept.mean(0)],
                  "merging_images": [float(v) for v in c.patterns.merged.mean(0)],
                  "averaged_pattern": averaged[m, r].reshape(grid).round(4).tolist(),
                  "procrustes_to_unreduced": float(M.procrustes_distance(baseline.features, c.features)),
                  "cka_to_unreduced": float(M.cka(baseline.features, c.features))}
                 for (m, r), c in runs.items()],
        "keep_rate_consistency": [], "method_similarity": [], "pattern_correlation": [], "feature_alignment": []}
    for m in methods:
        for r1, r2 in combinations(sorted(keep_rates, reverse=True), 2):
            for row in _stage_rows(runs[m, r1].patterns, runs[m, r2].patterns, blocks, num_patches, "ioa",
                                   M.ioa_lower_bound, "homogeneity"):
                out["keep_rate_consistency"].append({"method": m, "r1": r1, "r2": r2, **row})
    for r in keep_rates:
        for a, b in combinations(methods, 2):
            ca, cb = runs[a, r], runs[b, r]
            for row in _stage_rows(ca.patterns, cb.patterns, blocks, num_patches, "iou", M.iou_lower_bound, "nmi"):
                out["method_similarity"].append({"keep_rate": r, "a": a, "b": b, **row})
            out["pattern_correlation"].append({"keep_rate": r, "a": a, "b": b,
                                               "pearson": _mean(M.pearson(averaged[a, r], averaged[b, r]))})
            out["feature_alignment"].append({"keep_rate": r, "a": a, "b": b,
                                             "procrustes": float(M.procrustes_distance(ca.features, cb.features)),
                                             "cka": float(M.cka(ca.features, cb.features))})
    out["proxies"] = proxies(out, anchor or methods[0])
    return out


def _correlation(points: list[tuple[float, float]]) -> dict:
    """Spearman's rho (and p) of ``(metric, accuracy difference)`` points; None below three points."""
    usable = [(d, f) for d, f in points if d is not None and f is not None and math.isfinite(d) and math.isfinite(f)]
    if len(usable) < 3:
        return {"points": len(usable), "spearman": None, "p_value": None}
    rho, p = M.spearman([d for d, _ in usable], [f for _, f in usable])
    return {"points": len(usable), "spearman": _mean(rho), "p_value": _mean(p)}


def proxies(rep: dict, anchor: str) -> list[dict]:
    """§5.5: per metric, Spearman's correlation over the other methods B (at every keep rate) between
    ``d(anchor, B)`` and ``accuracy(anchor) − accuracy(B)``; and Procrustes to the unreduced model against
    ``accuracy(unreduced) − accuracy(run)``."""
    acc = {(r["method"], r["keep_rate"]): r["accuracy"] for r in rep["runs"]}
    per_pair: dict[tuple[str, str, float], dict[str, list]] = {}
    for row in rep["method_similarity"]:
        vals = per_pair.setdefault((row["a"], row["b"], row["keep_rate"]), {"iou": [], "nmi": []})
        vals["iou"].append(row["iou"])
        vals["nmi"].append(row["nmi"])
    for row in rep["feature_alignment"]:
        per_pair[row["a"], row["b"], row["keep_rate"]]["procrustes"] = [row["procrustes"]]
    out = []
    for metric in ("iou", "nmi", "procrustes"):
        points = []
        for (a, b, r), vals in per_pair.items():
            if anchor in (a, b):
                other = b if a == anchor else a
                points.append((_mean([v for v in vals[metric] if v is not None]), acc[anchor, r] - acc[other, r]))
        out.append({"anchor": anchor, "metric": metric, **_correlation(points)})
    base = rep["unreduced"]["accuracy"]
    points = [(r["procrustes_to_unreduced"], base - r["accuracy"]) for r in rep["runs"]]
    out.append({"anchor": "unreduced", "metric": "procrustes", **_correlation(points)})
    return out


def _jsonable(x: Any) -> Any:
    """``x`` with NaN/inf as null and NumPy scalars as Python numbers."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def write(rep: dict, out: Path) -> list[Path]:
    """``analysis.json`` and the figures that the report has data for, in ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "analysis.json"
    path.write_text(json.dumps(_jsonable(rep), indent=1) + "\n")
    paths = [path]
    if rep["keep_rate_consistency"]:
        paths.append(figures.keep_rate_consistency(rep, out / "keep_rate_consistency.png"))
    if rep["method_similarity"]:
        paths.append(figures.similarity(rep, "iou", out / "similarity_iou.png"))
        paths.append(figures.similarity(rep, "nmi", out / "similarity_nmi.png"))
    paths.append(figures.averaged_patterns(rep, out / "averaged_patterns.png"))
    return paths


def run(args: argparse.Namespace) -> int:
    """The ``analyze`` command (exit 2 after a one-line error for a bad argument, nothing written)."""
    return usage_errors("analyze", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    opts = check_options(args)
    keep_rates = check_keep_rates(args.keep_rates)
    source = load_source(args, opts.seed)
    blocks = check_blocks(args.blocks, source.depth) if args.blocks else default_blocks(source.depth)
    specs = check_methods(source.model, opts.methods, blocks, opts.explicit)
    labels = [s.label for s in specs]
    if args.anchor is not None and args.anchor not in labels:
        raise UsageError(f"--anchor: {args.anchor!r} is not one of the methods run ({', '.join(labels)})")
    baseline, runs = run_all(source, specs, keep_rates, blocks, opts.batch_size, opts.max_images, opts.seed,
                             opts.progress)
    rep = report(baseline, runs, labels, keep_rates, blocks, source.grid, args.anchor)
    rep["source"] = source.label
    for path in write(rep, Path(args.out)):
        print(f"wrote {path}")
    return 0
