"""``tokendrop demo``: baseline against Progressive Token Drop on real offline data, on a CPU, in minutes."""

from __future__ import annotations

import sys
from pathlib import Path

from .. import reduction as red
from ..bench.flops import analytic_macs, attached_macs
from .config import Config, load_config
from .data import DatasetNotFoundError, build_datasets, dataset_info
from .plots import plot_comparison, read_metrics
from .trainer import build_run_model, train


def _demo_configs(epochs: int, train_subset: int, dataset: str) -> dict[str, Config]:
    """The shipped Fashion-MNIST pair, shortened: the PTD curriculum is compressed into the run
    (start at 20 %, end at 70 % of the epochs, as seed 000's 40→140 of 200)."""
    common = [f"optim.epochs={epochs}", f"data.train_subset={train_subset}", f"data.dataset={dataset}"]
    start, end = round(0.2 * epochs, 2), round(0.7 * epochs, 2)
    return {
        "baseline": load_config("fashion_mnist_baseline", common),
        "ptd": load_config("fashion_mnist_ptd", common + [f"token_drop.start={start}", f"token_drop.end={end}"]),
    }


def schedule_mac_ratio(cfg: Config, img_size: int, in_chans: int, num_classes: int) -> float:
    """Forward MACs per image averaged over the run's epochs, relative to the same model without drop."""
    model = build_run_model(cfg, num_classes, in_chans, img_size)
    full = analytic_macs(model, img_size)
    total = 0.0
    for epoch in range(cfg.optim.epochs):
        red.set_epoch(model, epoch)
        total += attached_macs(model, img_size)
    return total / (full * cfg.optim.epochs)


def run_demo(out: Path, epochs: int = 8, train_subset: int = 10000) -> dict[str, dict[str, float]]:
    """Train the baseline and the PTD model, print a side-by-side table, write a comparison plot."""
    dataset = "fashion-mnist"
    base = load_config("fashion_mnist_baseline")
    try:
        build_datasets(base.data, base.augment, 0)
    except DatasetNotFoundError as e:
        print(f"notice: {e}\nnotice: Fashion-MNIST is missing, so the demo uses scikit-learn's digits instead.", file=sys.stderr)
        dataset = "digits"
    cfgs = _demo_configs(epochs, train_subset, dataset)
    out = Path(out)
    runs: dict[str, Path] = {}
    for name, cfg in cfgs.items():
        run_dir = out / name
        resume = (run_dir / "last.pt").exists()
        print(f"\n== {name}: {cfg.model.name} on {dataset}, {epochs} epochs"
              + (" (resuming)" if resume else ""), file=sys.stderr)
        runs[name] = train(cfg, run_dir, resume=resume)

    info = dataset_info(dataset)
    img = cfgs["ptd"].data.img_size or info.img_size
    summary: dict[str, dict[str, float]] = {}
    for name, run_dir in runs.items():
        m = read_metrics(run_dir / "metrics.csv")
        summary[name] = {
            "val_acc_raw": m["val_acc_raw"][-1], "val_acc_ema": m["val_acc_ema"][-1],
            "train_time_sec": sum(m["epoch_time_sec"]),
            "mac_ratio": schedule_mac_ratio(cfgs[name], img, info.in_chans, info.num_classes),
        }
    base_time = summary["baseline"]["train_time_sec"]
    print(f"\nBaseline vs PTD — {dataset}, {epochs} epochs, {train_subset} training images, "
          f"validation on the full test set ({info.name})")
    print(f"{'run':<10}{'val acc raw':>13}{'val acc EMA':>13}{'train time':>12}{'speed-up':>10}{'MAC ratio':>11}")
    for name, s in summary.items():
        s["speedup"] = base_time / s["train_time_sec"]
        print(f"{name:<10}{s['val_acc_raw']:>12.2f}%{s['val_acc_ema']:>12.2f}%{s['train_time_sec']:>11.1f}s"
              f"{s['speedup']:>9.2f}×{s['mac_ratio']:>11.3f}")
    ideal = 1 / summary["ptd"]["mac_ratio"]
    print(f"PTD's ideal training speed-up over this schedule (MAC ratio): {ideal:.2f}×; "
          f"measured: {summary['ptd']['speedup']:.2f}× (training epochs only; validation excluded)")
    plot = plot_comparison(runs, out / "comparison.png")
    print(f"plots: {plot} and each run's plots/ directory")
    return summary
