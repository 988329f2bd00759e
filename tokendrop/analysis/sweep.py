"""``tokendrop sweep``: accuracy, analytic GFLOPs and measured throughput of methods × keep rates × sites
applied to one model, post hoc and (``--finetune-epochs N``) after a short fine-tune per point, as in
seed 002's accuracy-vs-GFLOPs tables.

GFLOPs are counted as the seeds do: 10⁹ multiply-accumulates per image, forward, from the tokens each site
lets through (:func:`tokendrop.bench.flops.attached_macs`); ``ideal_speedup`` is the unreduced model's
GFLOPs over the point's. Throughput is images per second of an inference forward on one fixed batch of
validation images, timed in interleaved rounds against the unreduced model (each round: the baseline, then
every point in a shuffled order, one untimed warm-up call each; a closing baseline) — ``speedup`` is the
median of the paired ratios. It is timed on the post-hoc models: a fine-tuned point has the same
architecture and, for every method with a fixed keep count, the same tokens (``tokens_finetuned`` shows
what it kept). With fine-tuning (:mod:`.finetune`) the unreduced model is fine-tuned as long as every
point, and the Pareto front is taken on ``accuracy_finetuned``. Writes ``sweep.csv``, ``sweep.json`` (with
the machine, the date and each point's fine-tune folder) and ``sweep.png`` (the Pareto front marked).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .. import reduction as red
from ..bench.flops import attached_macs
from ..bench.machine import machine_info, synchronize
from ..bench.timing import PairedTiming, Timing
from ..train.config import Config
from . import figures
from . import finetune as ft
from .common import (MethodSpec, Source, UsageError, attached, check_blocks, check_count, check_keep_rates,
                     check_methods, check_options, default_blocks, load_source, progress_bar, usage_errors)
from .patterns import collect

COLUMNS = ("method", "keep_rate", "blocks", "tokens", "accuracy", "accuracy_finetuned", "tokens_finetuned", "gflops",
           "ideal_speedup", "images_per_s", "speedup", "pareto_gflops", "pareto_images_per_s")


@dataclass(frozen=True)
class Point:
    """One configuration: a method at a keep rate at a set of blocks."""

    spec: MethodSpec
    keep_rate: float
    blocks: tuple[int, ...]

    @property
    def blocks_text(self) -> str:
        return ",".join(map(str, self.blocks))


def pareto_flags(cost: Sequence[float], accuracy: Sequence[float], lower_cost_is_better: bool = True) -> list[bool]:
    """Whether each point is on the Pareto front: no other point is at least as good in both cost and
    accuracy and strictly better in one."""
    sign = 1.0 if lower_cost_is_better else -1.0
    pts = [(sign * c, -a) for c, a in zip(cost, accuracy)]  # both to be minimised
    return [not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in pts) for p in pts]


def _row(label: str, keep_rate: float, blocks: str, model: torch.nn.Module, source: Source, loader) -> dict:
    coll = collect(model, loader, source.device)
    tokens = "/".join(f"{v:g}" for v in coll.patterns.kept.mean(0).round(2)) if coll.patterns is not None else ""
    return {"method": label, "keep_rate": keep_rate, "blocks": blocks, "tokens": tokens, "accuracy": coll.accuracy,
            "accuracy_finetuned": None, "tokens_finetuned": None,
            "gflops": attached_macs(model, source.img_size, training=False) / 1e9, "ideal_speedup": None,
            "images_per_s": None, "speedup": None}


def evaluate_points(source: Source, points: Sequence[Point], batch_size: int, max_images: int = 0, seed: int = 0,
                    relative_to: str = "original", progress: bool = True) -> list[dict]:
    """Accuracy, kept tokens per site, GFLOPs and ideal speed-up of the unreduced model (``method`` ``none``)
    and every point."""
    loader = source.loader(batch_size, max_images)
    bar = progress_bar(1 + len(points), "sweep", progress)
    bar.unit = "point"
    try:
        rows = [_row("none", 1.0, "", source.model, source, loader)]
        bar.update()
        for p in points:
            torch.manual_seed(seed)
            model = attached(source.model, p.spec, p.blocks, p.keep_rate, relative_to)
            try:
                rows.append(_row(p.spec.label, p.keep_rate, p.blocks_text, model, source, loader))
            finally:
                red.detach(model)
            bar.update()
    finally:
        bar.close()
    for r in rows:
        r["ideal_speedup"] = rows[0]["gflops"] / r["gflops"]
    return rows


def finetune_points(source: Source, runs: Sequence[tuple[Path, Config]], rows: list[dict], batch_size: int,
                    max_images: int = 0, seed: int = 0, progress: bool = True) -> None:
    """Fine-tune each row's model by its ``(run folder, config)`` in ``runs`` (:func:`.finetune.finetune`:
    complete runs reused, interrupted ones resumed), and add to the row the accuracy and kept tokens of the
    fine-tuned model on the same validation images. Prints a line per point on stderr."""
    loader = source.loader(batch_size, max_images)
    threads = torch.get_num_threads()  # a config's run.threads changes it for the process
    spent, trained_count = 0.0, 0
    for i, ((run_dir, cfg), row) in enumerate(zip(runs, rows), 1):
        name = f"{row['method']} r={row['keep_rate']:g} blocks {row['blocks'] or '-'}"
        t0 = time.perf_counter()
        model, trained = ft.finetune(cfg, run_dir, progress, label=f"{name}: ")
        took = time.perf_counter() - t0
        torch.manual_seed(seed)
        done = _row(row["method"], row["keep_rate"], row["blocks"], model, source, loader)
        del model
        row.update(accuracy_finetuned=done["accuracy"], tokens_finetuned=done["tokens"], finetune_dir=str(run_dir))
        how = f"reused {run_dir}"
        if trained:
            spent, trained_count = spent + took, trained_count + 1
            how = f"trained {cfg.optim.epochs} epoch(s) in {took:.0f} s"
        left = f"; at most {spent / trained_count * (len(runs) - i) / 60:.1f} min left" if trained_count and i < len(runs) else ""
        print(f"sweep: fine-tune {i}/{len(runs)} {name}: {done['accuracy']:.2f}% (post hoc {row['accuracy']:.2f}%), "
              f"{how}{left}", file=sys.stderr)
    torch.set_num_threads(threads)


def time_points(source: Source, points: Sequence[Point], images: torch.Tensor, rounds: int, seed: int = 0,
                relative_to: str = "original") -> list[Timing]:
    """Inference throughput of every point on ``images`` against the unreduced model (module docstring)."""
    images = images.to(source.device)

    def timed(model: torch.nn.Module) -> float:
        with torch.inference_mode():
            model(images)  # warm-up
            synchronize(source.device)
            t0 = time.perf_counter()
            model(images)
            synchronize(source.device)
        return time.perf_counter() - t0

    rng = random.Random(seed)
    base, times = [], {i: [] for i in range(len(points))}
    for _ in range(rounds):
        base.append(timed(source.model))
        order = list(times)
        rng.shuffle(order)
        for i in order:
            p = points[i]
            model = attached(source.model, p.spec, p.blocks, p.keep_rate, relative_to)
            try:
                times[i].append(timed(model))
            finally:
                red.detach(model)
    base.append(timed(source.model))
    paired = PairedTiming("none", base, {str(i): t for i, t in times.items()})
    return [Timing.from_paired(paired, "none", len(images))] + \
        [Timing.from_paired(paired, str(i), len(images)) for i in range(len(points))]


def mark_pareto(rows: list[dict]) -> None:
    """Add ``pareto_gflops`` and ``pareto_images_per_s`` (None without timing) to every row, on the
    fine-tuned accuracy where there is one, else on the post-hoc accuracy."""
    key = "accuracy_finetuned" if all(r["accuracy_finetuned"] is not None for r in rows) else "accuracy"
    acc = [r[key] for r in rows]
    for r, flag in zip(rows, pareto_flags([r["gflops"] for r in rows], acc)):
        r["pareto_gflops"] = flag
    timed = all(r["images_per_s"] is not None for r in rows)
    flags = pareto_flags([r["images_per_s"] for r in rows], acc, lower_cost_is_better=False) if timed else [None] * len(rows)
    for r, flag in zip(rows, flags):
        r["pareto_images_per_s"] = flag


def write(rows: list[dict], meta: dict, out: Path) -> list[Path]:
    """``sweep.csv``, ``sweep.json`` and ``sweep.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "sweep.csv", out / "sweep.json"]
    with paths[0].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r[k] is None else round(r[k], 6) if isinstance(r[k], float) else r[k]) for k in COLUMNS})
    paths[1].write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    paths.append(figures.pareto(rows, out / "sweep.png", (meta.get("finetune") or {}).get("epochs", 0)))
    return paths


def _sites(values: Sequence[str] | None, depth: int) -> list[tuple[int, ...]]:
    if not values:
        return [tuple(default_blocks(depth))]
    sets = [tuple(check_blocks(v.split(","), depth, flag="--sites")) for v in values]
    if len(set(sets)) != len(sets):
        raise UsageError("--sites: a set of blocks is given twice")
    return sets


def run(args: argparse.Namespace) -> int:
    """The ``sweep`` command (exit 2 after a one-line error for a bad argument, nothing written)."""
    return usage_errors("sweep", lambda: _run(args))


def _finetune_runs(args: argparse.Namespace, source: Source, points: Sequence[Point], epochs: int,
                   overrides: dict) -> tuple[ft.Plan, list[tuple[Path, Config]]]:
    """The fine-tune plan and the (run folder, config) of the unreduced model and every point, with the
    folder checked against them (unless ``--fresh``)."""
    plan = ft.make_plan(source.config, overrides, epochs, args.device, Path(args.out))
    runs = [(plan.run_dir(None), plan.config(None))]
    runs += [(plan.run_dir(p.spec, p.keep_rate, p.blocks), plan.config(p.spec, p.keep_rate, p.blocks, args.relative_to))
             for p in points]
    seen: dict[Path, str] = {}
    for (run_dir, _), label in zip(runs, ["none", *(p.spec.label for p in points)]):
        if run_dir in seen:
            raise UsageError(f"--methods: {seen[run_dir]!r} and {label!r} would share the fine-tune folder {run_dir}; "
                             "give one of them another spelling")
        seen[run_dir] = label
    if not args.fresh:
        ft.check_folder(plan, dict(runs), source.model, source.label)
    return plan, runs


def _run(args: argparse.Namespace) -> int:
    opts = check_options(args)
    keep_rates = check_keep_rates(args.keep_rates)
    rounds = check_count(args.rounds, "--rounds", 0)
    epochs = check_count(args.finetune_epochs, "--finetune-epochs", 0)
    if not epochs and (args.finetune_set or args.fresh):
        raise UsageError(f"{'--finetune-set' if args.finetune_set else '--fresh'}: only with --finetune-epochs N (N > 0)")
    overrides = ft.check_overrides(args.finetune_set)
    source = load_source(args, opts.seed)
    site_sets = _sites(args.sites, source.depth)
    points = [Point(spec, r, s) for s in site_sets for spec in check_methods(source.model, opts.methods, s, opts.explicit)
              for r in keep_rates]
    plan, runs = _finetune_runs(args, source, points, epochs, overrides) if epochs else (None, [])
    rows = evaluate_points(source, points, opts.batch_size, opts.max_images, opts.seed, args.relative_to, opts.progress)
    if plan is not None:
        ft.prepare_folder(plan, source.model, args.fresh)
        finetune_points(source, runs, rows, opts.batch_size, opts.max_images, opts.seed, opts.progress)
    if rounds:
        images = next(iter(source.loader(opts.batch_size, opts.max_images)))[0]
        for row, t in zip(rows, time_points(source, points, images, rounds, opts.seed, args.relative_to)):
            row["images_per_s"], row["speedup"] = t.images_per_s, t.speedup
    mark_pareto(rows)
    meta = {"source": source.label, "images": min(opts.max_images or len(source.val), len(source.val)),
            "relative_to": args.relative_to, "timing_rounds": rounds, "machine": machine_info(source.device),
            "finetune": {"epochs": epochs, "set": list(args.finetune_set), "folder": str(plan.root),
                         "config": plan.base} if plan is not None else None}
    for path in write(rows, meta, Path(args.out)):
        print(f"wrote {path}")
    return 0
