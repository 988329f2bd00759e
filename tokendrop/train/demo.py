"""``tokendrop demo``: baseline against Progressive Token Drop on real offline data, on a CPU, in minutes.

The two runs train in interleaved epochs (baseline epoch e, then PTD epoch e, ...), so a busy spell on a
shared machine hits both rather than faking a speed-up; the speed-up is judged against the arithmetic ideal
and the noise seen at the epochs where both runs do identical work (before the curriculum starts).
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .. import reduction as red
from ..bench.flops import analytic_macs, attached_macs
from .checkpoint import CheckpointError, load_checkpoint
from .config import Config, load_config
from .data import DatasetNotFoundError, build_datasets, dataset_info
from .plots import plot_comparison, read_metrics
from .trainer import Trainer, build_run_model, config_differences

DEMO_RUNS = ("baseline", "ptd")
COMPARISON_PLOT = "comparison.png"


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


# -- judging the measured speed-up ------------------------------------------------------------------------
@dataclass(frozen=True)
class SpeedupCheck:
    """A whole-run training speed-up from paired epoch times, judged against the arithmetic ideal."""

    speedup: float  # sum of the baseline's epoch times over the sum of the PTD run's
    noise: float  # largest max(r, 1/r) − 1 of the paired ratios r at epochs of identical work; nan if none
    ideal: float  # 1 / (the schedule's MAC ratio)
    verdict: str  # "ok", "above-ideal" (faster than the arithmetic allows) or "noisy" (noise ≥ the gain)


def check_speedup(base_times: Sequence[float], ptd_times: Sequence[float], same_work: Sequence[bool],
                  ideal: float) -> SpeedupCheck:
    """Judge PTD's speed-up from per-epoch times paired by epoch. ``same_work[e]`` marks epochs where the
    PTD run drops nothing (its ratio should be 1: the spread there is the machine's noise). A speed-up above
    ``ideal`` by more than the noise, or a noise as large as the gain to be measured, is flagged."""
    if not (len(base_times) == len(ptd_times) == len(same_work)) or not base_times:
        raise ValueError("check_speedup: needs one baseline time, PTD time and same-work flag per epoch")
    speedup = sum(base_times) / sum(ptd_times)
    # symmetric in which run was slowed: a ratio of 1/2 counts as much as 2
    deviations = [max(b / p, p / b) - 1 for b, p, same in zip(base_times, ptd_times, same_work) if same]
    noise = max(deviations) if deviations else math.nan
    margin = 0.0 if math.isnan(noise) else noise
    if speedup > ideal + margin:
        verdict = "above-ideal"
    elif ideal > 1 and noise >= ideal - 1:
        verdict = "noisy"
    else:
        verdict = "ok"
    return SpeedupCheck(speedup, noise, ideal, verdict)


def speedup_report(check: SpeedupCheck) -> str:
    """One line for the demo's output; a flagged speed-up is never printed as a plain result."""
    s, ideal = f"{check.speedup:.2f}×", f"{check.ideal:.2f}×"
    noise = "unknown" if math.isnan(check.noise) else f"±{check.noise:.2f}"
    if check.verdict == "above-ideal":
        return (f"WARNING: measured {s} exceeds the arithmetic ideal {ideal} by more than the noise ({noise}): "
                f"the machine was busy during some epochs; rerun with --fresh on a quieter machine")
    if check.verdict == "noisy":
        return (f"WARNING: timings too noisy to measure the speed-up: measured {s}, but epochs where both runs do "
                f"identical work differ by {noise}, as much as the ideal {ideal} allows; the machine was busy; "
                f"rerun with --fresh on a quieter machine")
    return (f"PTD training speed-up: measured {s} (noise {noise}, from epochs where both runs do identical work), "
            f"arithmetic ideal {ideal} (MAC ratio); training epochs only, validation excluded")


# -- the output folder ------------------------------------------------------------------------------------
def _remove_demo_runs(out: Path) -> None:
    """Delete only what the demo writes in ``out``: its run folders and its comparison plot."""
    for name in DEMO_RUNS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    (out / COMPARISON_PLOT).unlink(missing_ok=True)


def _epochs_done(run_dir: Path, cfg: Config) -> int:
    """Epochs the demo run in ``run_dir`` already holds (0 if none); an error if it has other settings."""
    if not (run_dir / "last.pt").exists():
        return 0
    ckpt = load_checkpoint(run_dir / "last.pt")
    diff = config_differences(ckpt["config"], cfg.to_dict())
    if diff:
        raise CheckpointError(f"{run_dir} holds a demo run with other settings (differs in: {', '.join(diff)}); "
                              f"use --fresh to start over, or --out for another folder")
    return ckpt["epoch"] + 1


def _train_interleaved(trainers: list[Trainer]) -> None:
    """Advance the runs one epoch each in turn, printing the time left after every round."""
    for t in trainers:
        t.setup()
    rounds = sorted({e for t in trainers for e in t.epochs()})
    start = time.perf_counter()
    for i, epoch in enumerate(rounds, 1):
        for t in trainers:
            if epoch in t.epochs():
                t.run_epoch(epoch)
        elapsed = time.perf_counter() - start
        print(f"demo: epoch {epoch + 1}/{rounds[-1] + 1} done, {elapsed / 60:.1f} min so far, "
              f"about {elapsed / i * (len(rounds) - i) / 60:.1f} min left", file=sys.stderr)
    for t in trainers:
        t.finish()


def _pick_dataset() -> str:
    base = load_config("fashion_mnist_baseline")
    try:
        build_datasets(base.data, base.augment, 0)
    except DatasetNotFoundError as e:
        print(f"notice: {e}\nnotice: Fashion-MNIST is missing, so the demo uses scikit-learn's digits instead.", file=sys.stderr)
        return "digits"
    return "fashion-mnist"


def run_demo(out: Path, epochs: int = 8, train_subset: int = 6000, fresh: bool = False) -> dict[str, dict[str, float | str]]:
    """Train the baseline and the PTD model in interleaved epochs (reusing or resuming the runs already in
    ``out`` unless ``fresh``), print a side-by-side table and the judged speed-up, write a comparison plot."""
    dataset = _pick_dataset()
    cfgs = _demo_configs(epochs, train_subset, dataset)
    out = Path(out)
    if fresh:
        _remove_demo_runs(out)
    done = {name: _epochs_done(out / name, cfg) for name, cfg in cfgs.items()}  # checks both before training
    pending = []
    for name, cfg in cfgs.items():
        run_dir = out / name
        if done[name] >= epochs:
            print(f"{name}: reusing the complete run in {run_dir} ({epochs} epochs; --fresh trains again)", file=sys.stderr)
            continue
        print(f"{name}: " + (f"resuming {run_dir} after epoch {done[name]}/{epochs} (--fresh starts over)" if done[name]
                             else f"training {cfg.model.name} on {dataset} into {run_dir}, {epochs} epochs"), file=sys.stderr)
        pending.append(Trainer(cfg, run_dir, resume=done[name] > 0, label=f"{name:<9}"))
    _train_interleaved(pending)
    return _summarise(out, cfgs, dataset, epochs, train_subset)


def _summarise(out: Path, cfgs: dict[str, Config], dataset: str, epochs: int,
               train_subset: int) -> dict[str, dict[str, float | str]]:
    info = dataset_info(dataset)
    img = cfgs["ptd"].data.img_size or info.img_size
    metrics = {name: read_metrics(out / name / "metrics.csv") for name in cfgs}
    summary: dict[str, dict[str, float | str]] = {}
    for name, m in metrics.items():
        summary[name] = {
            "val_acc_raw": m["val_acc_raw"][-1], "val_acc_ema": m["val_acc_ema"][-1],
            "train_time_sec": sum(m["epoch_time_sec"]),
            "mac_ratio": schedule_mac_ratio(cfgs[name], img, info.in_chans, info.num_classes),
        }
    check = check_speedup(metrics["baseline"]["epoch_time_sec"], metrics["ptd"]["epoch_time_sec"],
                          [d == 0 for d in metrics["ptd"]["drop_ratio"]], 1 / summary["ptd"]["mac_ratio"])
    summary["baseline"]["speedup"] = 1.0
    summary["ptd"].update(speedup=check.speedup, speedup_noise=check.noise, ideal_speedup=check.ideal)
    flag = "" if check.verdict == "ok" else "!"
    print(f"\nBaseline vs PTD — {dataset}, {epochs} epochs, {train_subset} training images, "
          f"validation on the full test set ({info.name})")
    print(f"{'run':<10}{'val acc raw':>13}{'val acc EMA':>13}{'train time':>12}{'speed-up':>10}{'MAC ratio':>11}")
    for name, s in summary.items():
        mark = flag if name == "ptd" else ""
        print(f"{name:<10}{s['val_acc_raw']:>12.2f}%{s['val_acc_ema']:>12.2f}%{s['train_time_sec']:>11.1f}s"
              f"{s['speedup']:>8.2f}×{mark:<1}{s['mac_ratio']:>11.3f}")
    print(speedup_report(check))
    plot = plot_comparison({name: out / name for name in cfgs}, out / COMPARISON_PLOT)
    print(f"plots: {plot} and each run's plots/ directory")
    summary["ptd"]["verdict"] = check.verdict
    return summary
