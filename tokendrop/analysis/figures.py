"""Figures of ``analyze``, ``sweep`` and ``show`` (matplotlib's Agg canvas; no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 120
GREY = np.array([0.5, 0.5, 0.5])


def _figure(rows: int, cols: int, width: float, height: float) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width * cols, height * rows), constrained_layout=True)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


# -------------------------------------------------------------------------------------------- analyze
def keep_rate_consistency(rep: dict, path: Path) -> Path:
    """Seed 004 Fig. 3: IoA (dashed: its lower bound) and homogeneity against the pair of keep rates, per
    stage, one line per method."""
    rows = rep["keep_rate_consistency"]
    pairs = sorted({(r["r1"], r["r2"]) for r in rows}, reverse=True)
    stages = sorted({(r["stage"], r["block"]) for r in rows})
    fig, axes = _figure(2, len(stages), 3.6, 3.0)
    x = np.arange(len(pairs))
    for colour, method in zip(_colours(len(rep["methods"])), rep["methods"]):
        for col, (stage, block) in enumerate(stages):
            sel = {(r["r1"], r["r2"]): r for r in rows if r["method"] == method and r["stage"] == stage}
            for row, key in enumerate(("ioa", "homogeneity")):
                y = [sel[p][key] if p in sel and sel[p][key] is not None else np.nan for p in pairs]
                axes[row, col].plot(x, y, "o-", color=colour, label=method)
            lb = [sel[p]["ioa_lower_bound"] if p in sel else np.nan for p in pairs]
            axes[0, col].plot(x, lb, "--", color=colour, lw=0.8, alpha=0.7)
    for col, (stage, block) in enumerate(stages):
        for row, name in enumerate(("IoA (dashed: lower bound)", "homogeneity")):
            ax = axes[row, col]
            ax.set_xticks(x, [f"{a:g}→{b:g}" for a, b in pairs], rotation=45, fontsize=7)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            ax.set_title(f"stage {stage} (block {block})", fontsize=9)
            ax.set_ylabel(name if col == 0 else "")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("consistency when the keep rate changes (r1 → r2)", fontsize=10)
    return _save(fig, path)


def _pair_matrix(rows: list[dict], methods: Sequence[str], key: str) -> np.ndarray:
    """Symmetric method × method matrix of ``key`` from pair rows (1 on the diagonal)."""
    idx = {m: i for i, m in enumerate(methods)}
    mat = np.eye(len(methods))
    for r in rows:
        v = np.nan if r[key] is None else r[key]
        mat[idx[r["a"]], idx[r["b"]]] = mat[idx[r["b"]], idx[r["a"]]] = v
    return mat


def similarity(rep: dict, key: str, path: Path) -> Path:
    """Seed 004 Fig. 4 across methods: method × method heat maps of ``key`` (``iou`` or ``nmi``), one per keep
    rate (rows) and stage (columns)."""
    rows = rep["method_similarity"]
    methods, rates = rep["methods"], rep["keep_rates"]
    stages = sorted({(r["stage"], r["block"]) for r in rows})
    size = 1.2 + 0.45 * len(methods)
    fig, axes = _figure(len(rates), len(stages), size, size)
    image = None
    for i, rate in enumerate(rates):
        for j, (stage, block) in enumerate(stages):
            mat = _pair_matrix([r for r in rows if r["keep_rate"] == rate and r["stage"] == stage], methods, key)
            ax = axes[i, j]
            image = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
            if len(methods) <= 10:
                for (a, b), v in np.ndenumerate(mat):
                    ax.text(b, a, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if v < 0.6 else "black")
            ax.set_xticks(range(len(methods)), methods, rotation=60, fontsize=6, ha="right")
            ax.set_yticks(range(len(methods)), methods, fontsize=6)
            ax.set_title(f"r = {rate:g}, stage {stage} (block {block})", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.6, label=key.upper())
    fig.suptitle(f"{key.upper()} between methods", fontsize=10)
    return _save(fig, path)


def averaged_patterns(rep: dict, path: Path) -> Path:
    """Seed 004 Fig. 5 / §5.3: the data-set averaged pattern (stages each patch passes) of every method
    (rows) at every keep rate (columns), on one colour scale."""
    runs = {(r["method"], r["keep_rate"]): r for r in rep["runs"]}
    methods, rates = rep["methods"], rep["keep_rates"]
    fig, axes = _figure(len(methods), len(rates), 2.2, 2.2)
    image = None
    for i, m in enumerate(methods):
        for j, rate in enumerate(rates):
            ax = axes[i, j]
            image = ax.imshow(np.array(runs[m, rate]["averaged_pattern"]), vmin=1, vmax=len(rep["blocks"]) + 1,
                              cmap="magma")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"r = {rate:g}", fontsize=8)
            if j == 0:
                ax.set_ylabel(m, fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.6, label="stages passed (averaged)")
    fig.suptitle(f"averaged reduction patterns ({rep['images']} images)", fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- sweep
def pareto(rows: list[dict], path: Path, finetune_epochs: int = 0) -> Path:
    """Accuracy against GFLOPs (and against measured throughput when there is one): one colour per method,
    one marker per set of sites, the Pareto front as a black step line. After a fine-tune per point
    (``finetune_epochs`` > 0) the fine-tuned accuracy is drawn filled, the post-hoc one hollow below it
    (a thin line joins the two), and the front is the fine-tuned accuracy's."""
    tuned = finetune_epochs > 0
    acc = "accuracy_finetuned" if tuned else "accuracy"
    timed = all(r["images_per_s"] is not None for r in rows)
    panels = [("gflops", "GFLOPs (10⁹ MACs per image)")] + ([("images_per_s", "throughput (images/s)")] if timed else [])
    fig, axes = _figure(1, len(panels), 5.2, 4.2)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "none"))
    site_sets = list(dict.fromkeys(r["blocks"] for r in rows if r["method"] != "none"))
    colours = dict(zip(methods, _colours(len(methods))))
    markers = dict(zip(site_sets, "osD^v<>ph*"))
    for ax, (key, label) in zip(axes[0], panels):
        for r in rows:
            colour, marker, size = ("k", "*", 12) if r["method"] == "none" else (colours[r["method"]], markers[r["blocks"]], 6)
            if tuned:
                ax.plot([r[key]] * 2, [r["accuracy"], r[acc]], "-", color=colour, lw=0.6, alpha=0.5)
                ax.plot(r[key], r["accuracy"], marker, color=colour, ms=size, mfc="none", alpha=0.85)
            ax.plot(r[key], r[acc], marker, color=colour, ms=size, alpha=0.85)
        front = sorted((r for r in rows if r[f"pareto_{key}"]), key=lambda r: r[key])
        ax.step([r[key] for r in front], [r[acc] for r in front], "-", color="black", lw=1,
                where="post" if key == "gflops" else "pre", label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
    handles = [axes[0, 0].plot([], [], "o", color=colours[m], label=m)[0] for m in methods]
    handles += [axes[0, 0].plot([], [], markers[s], color="grey", label=f"blocks {s}")[0] for s in site_sets]
    handles += [axes[0, 0].plot([], [], "*", color="k", ms=10, label="unreduced")[0]]
    if tuned:
        handles += [axes[0, 0].plot([], [], "o", color="k", label=f"fine-tuned {finetune_epochs} epoch(s)")[0],
                    axes[0, 0].plot([], [], "o", color="k", mfc="none", label="post hoc")[0]]
    axes[0, 0].legend(handles=handles, fontsize=7)
    fig.suptitle(f"accuracy against cost: fine-tuned {finetune_epochs} epoch(s) per point, the unreduced model too "
                 "(filled; the front's), post hoc (hollow)" if tuned else "accuracy against cost (post-hoc, no fine-tuning)",
                 fontsize=10)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------- show
def _cluster_colours(labels: np.ndarray) -> np.ndarray:
    """An RGB colour per patch from its cluster label (grey where dropped)."""
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    _, dense = np.unique(labels, return_inverse=True)
    rgb = np.array([cmap(i % cmap.N)[:3] for i in dense.ravel()]).reshape(*labels.shape, 3)
    rgb[labels < 0] = GREY
    return rgb


def token_overlay(image: np.ndarray, grid: tuple[int, int], keep: np.ndarray, labels: np.ndarray,
                  merged: bool) -> np.ndarray:
    """``image`` (H, W, 3) in [0, 1] with a site's pattern on its patch grid: pruned patches greyed, or —
    where the site merged — every patch tinted by its cluster (dropped ones grey)."""
    h, w = image.shape[:2]
    rows = np.arange(h) * grid[0] // h
    cols = np.arange(w) * grid[1] // w
    cell = rows[:, None] * grid[1] + cols[None, :]  # (H, W) patch index of each pixel
    if merged:
        tint = _cluster_colours(labels)[cell]
        return 0.45 * image + 0.55 * tint
    dropped = ~keep[cell]
    out = image.copy()
    out[dropped] = 0.25 * image[dropped] + 0.75 * GREY
    return out


def token_maps(images: np.ndarray, panels: dict[str, Any], grid: tuple[int, int], blocks: Sequence[int],
               path: Path) -> Path:
    """A grid of token maps: one row per image; the image, then per method (``panels[label]``: Patterns of
    these images) and site a panel of :func:`token_overlay`."""
    cols = 1 + len(panels) * len(blocks)
    fig, axes = _figure(len(images), cols, 1.7, 1.8)
    for i, image in enumerate(images):
        axes[i, 0].imshow(image)
        axes[i, 0].set_title("image" if i == 0 else "", fontsize=7)
        col = 1
        for label, pat in panels.items():
            for s, block in enumerate(blocks):
                ax = axes[i, col]
                ax.imshow(token_overlay(image, grid, pat.keep[i, s], pat.labels[i, s], bool(pat.merged[i, s])))
                if i == 0:
                    ax.set_title(f"{label}\nblock {block}", fontsize=7)
                ax.set_xlabel(f"{int(pat.keep[i, s].sum())} kept" if not pat.merged[i, s]
                              else f"{len(np.unique(pat.labels[i, s][pat.labels[i, s] >= 0]))} clusters", fontsize=6)
                col += 1
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)
