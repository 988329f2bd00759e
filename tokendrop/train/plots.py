"""Plots of a run's ``metrics.csv`` (one row per epoch, written by the trainer), and run comparisons.

Columns: ``epoch, train_loss, train_acc, val_loss_raw, val_acc_raw, val_loss_ema, val_acc_ema, lr,
drop_ratio, kept_tokens, epoch_time_sec, train_imgs_per_sec`` — accuracies in percent, the EMA columns
empty when EMA is off — and, for a TPC-ViT run, ``tpc_active_l{i}``, ``tpc_halted_l{i}`` and
``tpc_depth`` (see :mod:`tokendrop.train.tpc`). Rendering uses matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

METRICS_FILE = "metrics.csv"
DPI = 120


def _to_float(cell: str | None) -> float:
    if cell is None or cell.strip() == "":
        return math.nan
    try:
        return float(cell)
    except ValueError:
        return math.nan


def read_metrics(path: str | Path) -> dict[str, list[float]]:
    """Read ``metrics.csv`` into ``{column: values}`` (NaN for empty cells); errors name the file."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: metrics file not found (the trainer writes it after the first epoch)")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise ValueError(f"{path}: empty metrics file (no header)")
        cols: dict[str, list[float]] = {name: [] for name in reader.fieldnames}
        for row in reader:
            for name in reader.fieldnames:
                cols[name].append(_to_float(row.get(name)))
    if "epoch" not in cols:
        raise ValueError(f"{path}: no 'epoch' column (header: {', '.join(cols)})")
    if not cols["epoch"]:
        raise ValueError(f"{path}: metrics file has a header but no epochs yet")
    return cols


def _col(m: dict[str, list[float]], name: str) -> list[float]:
    """Column ``name``, or all-NaN when the file does not have it."""
    return m.get(name) or [math.nan] * len(m["epoch"])


def _has(values: list[float]) -> bool:
    return any(not math.isnan(v) for v in values)


def _finish(fig, ax, title: str, ylabel: str | None, out: Path, ax2=None) -> Path:
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if ax2 is not None:
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def _line(ax, x, y, label, **kw) -> None:
    if _has(y):
        ax.plot(x, y, label=label, marker="." if len(x) <= 30 else None, **kw)


def _twin(m, ep, out: Path, title: str, left: tuple[str, str, str], right: tuple[str, str, str],
          right_counts: bool = False) -> Path:
    """One figure with column ``left`` on the left axis and ``right`` on a twin axis: (column, label, unit).
    ``right_counts``: the right column counts things (tokens), so its ticks are integers."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _line(ax, ep, _col(m, left[0]), left[1], color="tab:blue")
    ax.set_ylabel(left[2], color="tab:blue")
    ax2 = ax.twinx()
    _line(ax2, ep, _col(m, right[0]), right[1], color="tab:orange", linestyle="--")
    ax2.set_ylabel(right[2], color="tab:orange")
    if right_counts:
        ax2.yaxis.set_major_locator(MaxNLocator(integer=True))
    return _finish(fig, ax, title, None, out, ax2)


def plot_run(run_dir: str | Path, compare: list[Path] | None = None) -> list[Path]:
    """Write accuracy, loss, lr, drop-ratio and epoch-time plots into ``run_dir/plots/``; return their paths.

    ``compare``: other run directories; when given, ``plots/comparison.png`` compares this run with them.
    """
    run_dir = Path(run_dir)
    m = read_metrics(run_dir / METRICS_FILE)
    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    ep = m["epoch"]
    name = run_dir.name
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _line(ax, ep, _col(m, "train_acc"), "train")
    _line(ax, ep, _col(m, "val_acc_raw"), "val (raw weights)")
    _line(ax, ep, _col(m, "val_acc_ema"), "val (EMA weights)")
    written.append(_finish(fig, ax, f"{name}: top-1 accuracy", "accuracy (%)", out_dir / "accuracy.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _line(ax, ep, _col(m, "train_loss"), "train")
    _line(ax, ep, _col(m, "val_loss_raw"), "val (raw weights)")
    _line(ax, ep, _col(m, "val_loss_ema"), "val (EMA weights)")
    written.append(_finish(fig, ax, f"{name}: cross-entropy loss", "loss", out_dir / "loss.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _line(ax, ep, _col(m, "lr"), "learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    written.append(_finish(fig, ax, f"{name}: learning rate", "learning rate", out_dir / "lr.png"))

    written.append(_twin(m, ep, out_dir / "drop_ratio.png", f"{name}: token drop",
                         ("drop_ratio", "drop ratio", "drop ratio"),
                         ("kept_tokens", "kept tokens", "kept tokens"), right_counts=True))
    written.append(_twin(m, ep, out_dir / "epoch_time.png", f"{name}: training speed",
                         ("epoch_time_sec", "epoch time", "epoch time (s)"),
                         ("train_imgs_per_sec", "train images/s", "train images/s")))

    if "tpc_active_l0" in m:
        written += _tpc_plots(m, name, out_dir)

    if compare:
        runs = {name: run_dir}
        for other in compare:
            other = Path(other)
            key = other.name if other.name not in runs else str(other)
            runs[key] = other
        written.append(plot_comparison(runs, out_dir / "comparison.png"))
    return written


def _per_layer(m: dict[str, list[float]], prefix: str) -> list[list[float]]:
    """Columns ``prefix0, prefix1, …`` as one list per epoch (one value per block)."""
    depth = sum(1 for k in m if k.startswith(prefix) and k[len(prefix):].isdigit())
    return [list(v) for v in zip(*(m[f"{prefix}{i}"] for i in range(depth)))]


def _tpc_plots(m: dict[str, list[float]], name: str, out_dir: Path, curves: int = 6) -> list[Path]:
    """TPC-ViT's validation statistics: tokens each block processed (up to ``curves`` epochs, first and last
    included), and the halting-depth histogram of the last epoch beside the mean depth per epoch."""
    ep = m["epoch"]
    active = _per_layer(m, "tpc_active_l")
    depth = len(active[0])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    n = min(curves, len(ep))
    picks = sorted({round(i * (len(ep) - 1) / max(1, n - 1)) for i in range(n)})
    colours = plt.cm.viridis([0.15 + 0.7 * i / max(1, len(picks) - 1) for i in range(len(picks))])
    for colour, i in zip(colours, picks):
        last = i == len(ep) - 1
        ax.plot(range(depth), active[i], marker="o", color="tab:red" if last else colour, lw=2 if last else 1,
                label=f"epoch {ep[i]:g}" + (" (last)" if last else ""))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, 1.05 * max(max(a) for a in active))
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{name}: TPC tokens per block (validation)")
    ax.set_xlabel("block")
    ax.set_ylabel("tokens per image (CLS included)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="best")
    fig.tight_layout()
    active_png = out_dir / "tpc_active.png"
    fig.savefig(active_png, dpi=DPI)
    plt.close(fig)

    halted = _per_layer(m, "tpc_halted_l")[-1]
    mean = _col(m, "tpc_depth")
    fig, (ax_h, ax_d) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax_h.bar(range(1, depth + 1), halted, color="tab:blue", label="tokens halting there")
    ax_h.axvline(mean[-1], color="tab:red", linestyle="--", label=f"mean depth {mean[-1]:.2f}")
    ax_h.set_title(f"halting depth, epoch {ep[-1]:g} (validation)")
    ax_h.set_xlabel("halting depth M (1-based block)")
    ax_h.set_ylabel("tokens per image")
    ax_h.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_h.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_h.legend(loc="best")
    ax_h.grid(True, alpha=0.3, axis="y")
    _line(ax_d, ep, mean, "mean halting depth", color="tab:red")
    ax_d.set_ylim(0.5, depth + 0.5)
    ax_d.yaxis.set_major_locator(MaxNLocator(integer=True))
    return [active_png, _finish(fig, ax_d, "mean halting depth per epoch", "depth (blocks)", out_dir / "tpc_depth.png")]


def plot_comparison(runs: dict[str, Path], out: Path) -> Path:
    """Two panels: val accuracy (EMA if present, else raw) per epoch, and cumulative wall time, per run.

    ``runs`` maps a label to a run directory (or its ``metrics.csv``); returns ``out``.
    """
    if not runs:
        raise ValueError("plot_comparison: no runs given")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {label: read_metrics(path) for label, path in runs.items()}
    total_s = max(sum(v for v in _col(m, "epoch_time_sec") if not math.isnan(v)) for m in data.values())
    scale, unit = (60.0, "min") if total_s > 600 else (1.0, "s")

    fig, (ax_acc, ax_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, m in data.items():
        ep = m["epoch"]
        ema = _col(m, "val_acc_ema")
        acc, which = (ema, "EMA") if _has(ema) else (_col(m, "val_acc_raw"), "raw")
        finite = [a for a in acc if not math.isnan(a)]
        best = f", best {max(finite):.2f}%" if finite else ""
        _line(ax_acc, ep, acc, f"{label} ({which}{best})")
        cum, t = [], 0.0
        for v in _col(m, "epoch_time_sec"):
            t += 0.0 if math.isnan(v) else v
            cum.append(t / scale)
        _line(ax_time, ep, cum, f"{label} ({cum[-1]:.1f} {unit})")
    ax_acc.set_title("validation top-1 accuracy")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_time.set_title("cumulative training wall time")
    ax_time.set_xlabel("epoch")
    ax_time.set_ylabel(f"wall time ({unit})")
    for ax in (ax_acc, ax_time):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out
