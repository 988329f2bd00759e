"""``tokendrop bench``: measured against ideal speed-up of token drop, MACs, memory, overheads, projections, epochs.

The main CLI adds :func:`add_arguments` to its ``bench`` sub-parser and calls :func:`run`; this module
also runs alone: ``python -m tokendrop.bench.command --model hybrid_vit_ptd --drop-ratios 0 0.35``.
The measuring functions live beside it, one concern per module: :mod:`~tokendrop.bench.timing` (interleaved
rounds), :mod:`~tokendrop.bench.probe` (the networks and steps timed), :mod:`~tokendrop.bench.drops` (the
grid), :mod:`~tokendrop.bench.memory`, :mod:`~tokendrop.bench.overheads`, :mod:`~tokendrop.bench.projection`,
:mod:`~tokendrop.bench.pipeline` (the data rate), :mod:`~tokendrop.bench.epochs` (``--epochs-timed``),
:mod:`~tokendrop.bench.tpc` (``--tpc``) and :mod:`~tokendrop.bench.tome_table` (``--tome-r``);
:mod:`~tokendrop.bench.report` prints and plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

EXIT_USAGE = 2
DEFAULT_DROPS = ("0", "0.1", "0.2", "0.35", "0.5")
BENCH_NUM_CLASSES = 100  # the seeds' CIFAR-100 head
SKIPPABLE = ("grid", "inference", "counts", "memory", "overheads", "data")

NOTES = [
    "Timing: per network and batch size, interleaved rounds (d = 0 baseline, then every variant in a shuffled "
    "order; a closing baseline ends the last round). speedup = median over rounds of reference / time, where "
    "reference is the geometric mean of the two baselines around the variant; *_median_s are raw medians; "
    "speedup_of_minima compares the fastest steps (load from other processes only adds time).",
    "Training step = the trainer's (tokendrop.train.step.TrainStep, built as the trainer builds it): forward under "
    "autocast (--amp), cross-entropy and the reducers' auxiliary losses, backward, foreach gradient-norm clipping "
    "(--clip-grad; 0 measures the norm only), fused AdamW over the trainer's parameter groups, EMA update (--ema), "
    "on a fixed random batch (no data loading). A --config's projection and --epochs-timed time the config's own "
    "step (run.amp, optim.*, ema.*, run.compile; its cross-entropy without Mixup, no distillation teacher).",
    "Inference rows run the reducer at inference too (sites attached with when='always'): that is post-hoc "
    "pruning. PTD/CTD themselves evaluate with every token, so their inference cost is the d = 0 row.",
    "MACs are per image, forward: macs_counted by FlopCounterMode (with the CPU SDPA formula), macs_analytic in "
    "closed form from the kept token counts; ideal_speedup = analytic MACs at d = 0 / at d.",
    "Peak memory: CUDA max_memory_allocated; on the CPU the peak resident set size of a separate process that "
    "runs only that variant's training steps, minus its resident size before the first step.",
]


class UsageError(ValueError):
    """A bad command-line value; the message names the argument."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser``. Values are checked by :func:`run` (one-line errors, exit 2)."""
    parser.add_argument("--model", nargs="+", default=["hybrid_vit_ptd"], metavar="NAME",
                        help="backbones: hybrid_vit_ptd, hybrid_vit_ctd, hybrid_vit_tiny or a timm ViT "
                             "(default hybrid_vit_ptd)")
    parser.add_argument("--drop-ratios", nargs="+", default=list(DEFAULT_DROPS), metavar="D",
                        help="drop ratios in [0, 1); d = 0 is always measured as the baseline "
                             "(default 0 0.1 0.2 0.35 0.5)")
    parser.add_argument("--blocks", nargs="+", default=["0"], metavar="B",
                        help="0-based block indices; each is benchmarked as a single drop site (default 0)")
    parser.add_argument("--batch-sizes", nargs="+", default=["32"], metavar="N", help="batch sizes (default 32)")
    parser.add_argument("--reducer", default="topk", metavar="NAME",
                        help="reduction method of the grid (any name in tokendrop.REDUCERS; default topk by CLS attention)")
    parser.add_argument("--reducer-args", default="{}", metavar="YAML",
                        help="the method's arguments as a YAML mapping, e.g. '{score: random}' (default none)")
    parser.add_argument("--tome-r", nargs="+", default=None, metavar="R",
                        help="ToMe's throughput-vs-r table instead of the drop grid: merge R tokens in every block "
                             "(tokendrop.tome), inference, r = 0 as the baseline, e.g. --tome-r 4 8 13 16 "
                             "--model vit_small_patch16_224")
    parser.add_argument("--config", action="append", default=[], metavar="CONFIG",
                        help="project the whole-run speed-up of a config's schedule (shipped name or YAML); repeatable")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of every --config, e.g. optim.epochs=100")
    parser.add_argument("--epochs-timed", metavar="N",
                        help="instead of the drop grid and projection: train each --config for N epochs (after one "
                             "untimed warm-up epoch) at d = 0 and at a constant drop ratio (its token_drop final, or "
                             "the one non-zero --drop-ratios value), and say what bounds them: the data pipeline, "
                             "launch/overhead or arithmetic")
    parser.add_argument("--tpc", metavar="SOURCE",
                        help="measure TPC-ViT instead of the drop grid: a run's checkpoint (a TPC run: its config and "
                             "weights; a plain run: its weights with TPC attached) or a config (weights from "
                             "model.pretrained); MACs from the halting of its validation images, inference of "
                             "packed against dense and masked at --batch-sizes")
    parser.add_argument("--tpc-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key of the --tpc source, e.g. tpc.kappa=null or data.root=DIR")
    parser.add_argument("--tpc-images", default="256", metavar="N",
                        help="validation images whose halting gives the MACs (default 256)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    parser.add_argument("--amp", default="auto", metavar="MODE",
                        help="autocast of the training step: auto (bf16 on CUDA, off elsewhere, as run.amp), bf16, off")
    parser.add_argument("--clip-grad", default="0", metavar="G",
                        help="global gradient-norm clipping of the training step (as optim.clip_grad); 0 = none (default)")
    parser.add_argument("--ema", default="off", metavar="RULE",
                        help="EMA update in the training step: off (default), torch_ema or none (the rules of ema.warmup)")
    parser.add_argument("--cuda-graphs", default="on", metavar="on|off",
                        help="capture and replay the step in CUDA graphs (as run.cuda_graphs, default on; CUDA "
                             "only); each keep count's warm-up and capture run before its timed steps")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the network (as run.compile: CUDA only; elsewhere a notice, and it runs eager)")
    parser.add_argument("--rounds", default="5", metavar="R", help="interleaved timing rounds (default 5)")
    parser.add_argument("--warmup", default="2", metavar="W", help="untimed steps per variant first (default 2)")
    parser.add_argument("--memory-steps", default="2", metavar="S",
                        help="training steps of each peak-memory measurement (default 2)")
    parser.add_argument("--memory-blocks", nargs="+", default=None, metavar="B",
                        help="measure peak memory only for these of --blocks (default: all of them)")
    parser.add_argument("--data-batches", default="40", metavar="N",
                        help="batches drawn to time a config's data pipeline (default 40)")
    parser.add_argument("--threads", default="0", metavar="T", help="torch CPU threads; 0 = PyTorch's default")
    parser.add_argument("--skip", nargs="+", default=[], metavar="PART",
                        help=f"parts to leave out: {', '.join(SKIPPABLE)} "
                             "(grid: the model × block × drop-ratio rows)")
    parser.add_argument("--seed", default="0", help="seed of the random inputs and weights (default 0)")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON")
    parser.add_argument("--plot", metavar="OUT.png", help="plot measured and ideal speed-up against drop ratio")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


# ------------------------------------------------------------------------------------------ checking
def _numbers(values: Sequence[Any], flag: str, kind: type) -> list:
    out = []
    for v in values:
        try:
            x = kind(v)
        except (TypeError, ValueError):
            raise UsageError(f"{flag}: {v!r} is not {'an integer' if kind is int else 'a number'}") from None
        if kind is float and not math.isfinite(x):
            raise UsageError(f"{flag}: {v!r} is not a finite number")
        out.append(x)
    return out


def _one(value: Any, flag: str, lo: int) -> int:
    (x,) = _numbers([value], flag, int)
    if x < lo:
        raise UsageError(f"{flag}: {x} is outside the allowed range [{lo}, inf)")
    return x


def _batch_sizes_and_device(args: argparse.Namespace) -> tuple[list[int], Any]:
    """``--batch-sizes`` (each >= 1) and the ``--device`` it names."""
    from .machine import resolve_device

    batch_sizes = _numbers(args.batch_sizes, "--batch-sizes", int)
    for n in batch_sizes:
        if n < 1:
            raise UsageError(f"--batch-sizes: {n} is outside the allowed range [1, inf)")
    try:
        return batch_sizes, resolve_device(args.device)
    except ValueError as e:
        raise UsageError(str(e)) from None


@dataclasses.dataclass
class Options:
    """Checked command-line values."""

    models: list[str]
    depths: dict[str, int]
    drops: list[float]
    blocks: list[int]
    batch_sizes: list[int]
    configs: list[tuple[str, Any]]
    device: Any
    rounds: int
    warmup: int
    memory_steps: int
    data_batches: int
    threads: int
    seed: int
    skip: set[str]
    memory_blocks: list[int]
    reducer: str = "topk"
    reducer_args: dict = dataclasses.field(default_factory=dict)
    tome_r: list[int] | None = None
    tpc: str | None = None
    tpc_config: Any = None
    tpc_state: dict | None = None
    tpc_images: int = 256
    step: Any = None  # the StepSpec of the grid's training steps
    epochs_timed: int = 0  # --epochs-timed: timed epochs per config (drops: each config's drop ratio)


# With --tpc these keep their defaults: they describe the drop grid and the projections.
_GRID_ONLY = (("--model", "model", ["hybrid_vit_ptd"]), ("--drop-ratios", "drop_ratios", list(DEFAULT_DROPS)),
              ("--blocks", "blocks", ["0"]), ("--reducer", "reducer", "topk"), ("--reducer-args", "reducer_args", "{}"),
              ("--config", "config", []), ("--set", "set", []), ("--memory-blocks", "memory_blocks", None),
              ("--skip", "skip", []), ("--plot", "plot", None), ("--tome-r", "tome_r", None),
              ("--epochs-timed", "epochs_timed", None))
# How the training step is built (the grid's; a config's step is its own).
_STEP_FLAGS = (("--amp", "amp", "auto"), ("--clip-grad", "clip_grad", "0"), ("--ema", "ema", "off"),
               ("--compile", "compile", False), ("--cuda-graphs", "cuda_graphs", "on"))


def _check_step(args: argparse.Namespace) -> Any:
    """The :class:`~tokendrop.bench.probe.StepSpec` of ``--amp``, ``--clip-grad``, ``--ema``, ``--compile`` and
    ``--cuda-graphs``."""
    from .probe import AMP_MODES, EMA_RULES, StepSpec

    for flag, value, allowed in (("--amp", args.amp, AMP_MODES), ("--ema", args.ema, EMA_RULES),
                                 ("--cuda-graphs", args.cuda_graphs, ("on", "off"))):
        if value not in allowed:
            raise UsageError(f"{flag}: {value!r} is not one of {', '.join(allowed)}")
    (clip,) = _numbers([args.clip_grad], "--clip-grad", float)
    if clip < 0:
        raise UsageError(f"--clip-grad: {clip:g} is outside the allowed range [0, inf)")
    return StepSpec(amp=args.amp, clip_grad=clip, ema=args.ema, compile=args.compile,
                    cuda_graphs=args.cuda_graphs == "on")


def _check_tpc(args: argparse.Namespace) -> Options:
    """The options of ``--tpc``: its source and the timing options."""
    from ..train.checkpoint import CheckpointError
    from ..train.config import ConfigError
    from .tpc import tpc_source

    if args.tpc is None:
        raise UsageError(f"{'--tpc-set' if args.tpc_set else '--tpc-images'}: only applies to --tpc")
    for flag, name, default in _GRID_ONLY + _STEP_FLAGS:
        if getattr(args, name) != default:
            raise UsageError(f"{flag}: not used with --tpc (it measures the model of its source)")
    try:
        cfg, state = tpc_source(args.tpc, list(args.tpc_set))
    except (ConfigError, CheckpointError) as e:
        raise UsageError(f"--tpc {args.tpc}: {e}") from None
    batch_sizes, device = _batch_sizes_and_device(args)
    return Options([], {}, [], [], batch_sizes, [], device, _one(args.rounds, "--rounds", 1),
                   _one(args.warmup, "--warmup", 0), 0, 0, _one(args.threads, "--threads", 0), _one(args.seed, "--seed", 0),
                   set(), [], tpc=args.tpc, tpc_config=cfg, tpc_state=state,
                   tpc_images=_one(args.tpc_images, "--tpc-images", 1))


def _drop_ratios(args: argparse.Namespace) -> list[float]:
    """``--drop-ratios``, each in [0, 1)."""
    drops = _numbers(args.drop_ratios, "--drop-ratios", float)
    for d in drops:
        if not 0.0 <= d < 1.0:
            raise UsageError(f"--drop-ratios: {d:g} is outside the allowed range [0, 1)")
    return drops


def _load_configs(args: argparse.Namespace, sites_on: bool = False) -> list[tuple[str, Any]]:
    """Each ``--config`` with the ``--set`` overrides; its ``token_drop.blocks`` checked against the model's
    depth when token drop is enabled (or ``sites_on``: the bench enables it)."""
    from ..models import build_model
    from ..train.config import ConfigError, load_config

    configs = []
    for name in args.config:
        try:
            cfg = load_config(name, list(args.set))
        except ConfigError as e:
            raise UsageError(f"--config {name}: {e}") from None
        try:
            depth = len(build_model(cfg.model.name, num_classes=BENCH_NUM_CLASSES).blocks)
        except ValueError as e:
            raise UsageError(f"--config {name}: model.name: {e}") from None
        bad = [b for b in cfg.token_drop.blocks if b >= depth]
        if (cfg.token_drop.enabled or sites_on) and bad:
            raise UsageError(f"--config {name}: token_drop.blocks: index {bad[0]} is outside the allowed range "
                             f"[0, {depth - 1}] of {cfg.model.name}")
        configs.append((name, cfg))
    if args.set and not args.config:
        raise UsageError("--set: only applies to a --config")
    return configs


# Not read by --epochs-timed: it trains each config as it is (its step keys are changed with --set).
_NOT_EPOCHS = tuple(g for g in _GRID_ONLY if g[1] not in ("config", "set", "drop_ratios", "epochs_timed")) + _STEP_FLAGS + (
    ("--batch-sizes", "batch_sizes", ["32"]), ("--memory-steps", "memory_steps", "2"))


def _check_epochs(args: argparse.Namespace) -> Options:
    """The options of ``--epochs-timed``: the configs, each one's drop ratio, the timing options."""
    from ..train.config import ConfigError
    from .epochs import constant_drop_config, final_drop_ratio

    epochs = _one(args.epochs_timed, "--epochs-timed", 1)
    if not args.config:
        raise UsageError("--epochs-timed: needs a --config (the run whose epochs are timed)")
    for flag, name, default in _NOT_EPOCHS:
        if getattr(args, name) != default:
            raise UsageError(f"{flag}: not used with --epochs-timed (it trains each --config as it is; "
                             "change the config with --set)")
    given = None
    if args.drop_ratios != list(DEFAULT_DROPS):
        nonzero = sorted({d for d in _drop_ratios(args) if d > 0})
        if len(nonzero) != 1:
            raise UsageError(f"--drop-ratios: --epochs-timed takes one drop ratio besides d = 0, got {nonzero or 'none'}")
        given = nonzero[0]
    _, device = _batch_sizes_and_device(args)
    configs = _load_configs(args, sites_on=True)
    drops = []
    for name, cfg in configs:
        if given is None and not cfg.token_drop.enabled:
            raise UsageError(f"--config {name}: token drop is off, so it has no drop ratio; give one with --drop-ratios D")
        drop = final_drop_ratio(cfg) if given is None else given
        if drop <= 0:
            raise UsageError(f"--config {name}: its final drop ratio is 0; give one with --drop-ratios D")
        try:
            constant_drop_config(cfg, drop, epochs, device)
        except ConfigError as e:
            raise UsageError(f"--config {name}: {e}") from None
        drops.append(drop)
    data_batches = _one(args.data_batches, "--data-batches", 1)
    return Options([], {}, drops, [], [], configs, device, _one(args.rounds, "--rounds", 1),
                   _one(args.warmup, "--warmup", 0), 0, data_batches, _one(args.threads, "--threads", 0),
                   _one(args.seed, "--seed", 0), set(), [], epochs_timed=epochs)


def check_args(args: argparse.Namespace) -> Options:
    """Validate every option; raise :class:`UsageError` naming the first bad one."""
    from ..models import build_model

    if args.tpc is not None or args.tpc_set or args.tpc_images != "256":
        return _check_tpc(args)
    if args.epochs_timed is not None:
        return _check_epochs(args)
    models = list(args.model)
    depths = {}
    for name in models:
        try:
            depths[name] = len(build_model(name, num_classes=BENCH_NUM_CLASSES).blocks)
        except ValueError as e:
            raise UsageError(f"--model: unknown model {name!r} ({str(e).split('(', 1)[-1].rstrip(')')})") from None
        except (AttributeError, TypeError):
            raise UsageError(f"--model: {name!r} is not a ViT with a `blocks` sequence") from None
    drops = _drop_ratios(args)
    blocks = _numbers(args.blocks, "--blocks", int)
    if len(set(blocks)) != len(blocks):
        raise UsageError(f"--blocks: {blocks} names a block twice")
    for name in models:
        for b in blocks:
            if not 0 <= b < depths[name]:
                raise UsageError(f"--blocks: index {b} is outside the allowed range [0, {depths[name] - 1}] of {name}")
    memory_blocks = blocks if args.memory_blocks is None else _numbers(args.memory_blocks, "--memory-blocks", int)
    for b in memory_blocks:
        if b not in blocks:
            raise UsageError(f"--memory-blocks: {b} is not one of --blocks {blocks}")
    batch_sizes, device = _batch_sizes_and_device(args)
    skip = set(args.skip)
    unknown = skip - set(SKIPPABLE)
    if unknown:
        raise UsageError(f"--skip: {', '.join(sorted(unknown))} is not one of {', '.join(SKIPPABLE)}")
    configs = _load_configs(args)
    reducer, reducer_args = _check_reducer(args.reducer, args.reducer_args)
    tome_r = None
    if args.tome_r is not None:
        tome_r = _numbers(args.tome_r, "--tome-r", int)
        if any(r < 0 for r in tome_r):
            raise UsageError(f"--tome-r: {min(tome_r)} is outside the allowed range [0, inf)")
    return Options(models, depths, drops, blocks, batch_sizes, configs, device,
                   _one(args.rounds, "--rounds", 1), _one(args.warmup, "--warmup", 0),
                   _one(args.memory_steps, "--memory-steps", 0), _one(args.data_batches, "--data-batches", 0),
                   _one(args.threads, "--threads", 0), _one(args.seed, "--seed", 0), skip, memory_blocks,
                   reducer, reducer_args, tome_r, step=_check_step(args))


def _check_reducer(name: str, raw: str) -> tuple[str, dict]:
    """``--reducer`` and ``--reducer-args`` checked against the method registry."""
    import yaml

    from ..reduction import reducer as build_reducer

    try:
        args = yaml.safe_load(raw) if raw.strip() else {}
    except yaml.YAMLError:
        raise UsageError(f"--reducer-args: {raw!r} is not a YAML mapping") from None
    if not isinstance(args, dict):
        raise UsageError(f"--reducer-args: {raw!r} is not a mapping of argument names to values")
    try:
        build_reducer(name, **args)
    except ValueError as e:
        raise UsageError(f"--reducer: {e}") from None
    return name, args


def command_line(args: argparse.Namespace) -> str:
    """The equivalent ``tokendrop bench`` command line of ``args``."""
    if args.tpc is not None:
        return _tpc_command_line(args)
    if args.epochs_timed is not None:
        return _epochs_command_line(args)
    parts = ["tokendrop", "bench", "--model", *args.model, "--drop-ratios", *map(str, args.drop_ratios),
             "--blocks", *map(str, args.blocks), "--batch-sizes", *map(str, args.batch_sizes)]
    if args.tome_r is not None:
        parts += ["--tome-r", *map(str, args.tome_r)]
    if args.reducer != "topk" or args.reducer_args.strip() not in ("", "{}"):
        parts += ["--reducer", args.reducer, "--reducer-args", args.reducer_args]
    for c in args.config:
        parts += ["--config", c]
    for s in args.set:
        parts += ["--set", s]
    parts += ["--device", args.device, "--rounds", str(args.rounds), "--warmup", str(args.warmup),
              "--memory-steps", str(args.memory_steps), "--amp", args.amp, "--clip-grad", str(args.clip_grad),
              "--ema", args.ema, "--cuda-graphs", args.cuda_graphs]
    if args.compile:
        parts += ["--compile"]
    if args.memory_blocks is not None:
        parts += ["--memory-blocks", *map(str, args.memory_blocks)]
    parts += ["--data-batches", str(args.data_batches)]
    if str(args.threads) != "0":
        parts += ["--threads", str(args.threads)]
    if args.skip:
        parts += ["--skip", *args.skip]
    if str(args.seed) != "0":
        parts += ["--seed", str(args.seed)]
    if args.json:
        parts += ["--json", args.json]
    if args.plot:
        parts += ["--plot", args.plot]
    return shlex.join(parts)


def _tpc_command_line(args: argparse.Namespace) -> str:
    """The equivalent ``tokendrop bench --tpc`` command line of ``args``."""
    parts = ["tokendrop", "bench", "--tpc", args.tpc, *[x for s in args.tpc_set for x in ("--tpc-set", s)],
             "--tpc-images", str(args.tpc_images), "--batch-sizes", *map(str, args.batch_sizes), "--device",
             args.device, "--rounds", str(args.rounds), "--warmup", str(args.warmup)]
    if str(args.threads) != "0":
        parts += ["--threads", str(args.threads)]
    if str(args.seed) != "0":
        parts += ["--seed", str(args.seed)]
    if args.json:
        parts += ["--json", args.json]
    return shlex.join(parts)


def _epochs_command_line(args: argparse.Namespace) -> str:
    """The equivalent ``tokendrop bench --epochs-timed`` command line of ``args``."""
    parts = ["tokendrop", "bench", *[x for c in args.config for x in ("--config", c)],
             *[x for s in args.set for x in ("--set", s)], "--epochs-timed", str(args.epochs_timed)]
    if args.drop_ratios != list(DEFAULT_DROPS):
        parts += ["--drop-ratios", *map(str, args.drop_ratios)]
    parts += ["--device", args.device, "--rounds", str(args.rounds), "--warmup", str(args.warmup),
              "--data-batches", str(args.data_batches)]
    if str(args.threads) != "0":
        parts += ["--threads", str(args.threads)]
    if str(args.seed) != "0":
        parts += ["--seed", str(args.seed)]
    if args.json:
        parts += ["--json", args.json]
    return shlex.join(parts)


# --------------------------------------------------------------------------------------------- run
def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="bench", unit="round", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args``; print a table; write ``--json`` / ``--plot``.
    Returns 0, or 2 after a one-line error naming a bad argument."""
    try:
        opts = check_args(args)
    except UsageError as e:
        print(f"tokendrop bench: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    import torch

    from .report import format_report, plot_report

    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.step is not None and opts.step.compile and opts.device.type != "cuda":
        print(f"notice: --compile applies on CUDA only (as run.compile); the step runs eager on {opts.device}",
              file=sys.stderr)
    report = measure(opts, progress=not args.no_progress)
    report["command"] = command_line(args)
    print(format_report(report))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {path}")
    if args.plot and not report["rows"]:
        print("--plot: no drop-ratio rows to plot (--skip grid)", file=sys.stderr)
    elif args.plot:
        path = Path(args.plot)
        path.parent.mkdir(parents=True, exist_ok=True)
        plot_report(report, path)
        print(f"wrote {path}")
    return 0


def with_end_load(report: dict) -> dict:
    """``report`` with the machine's load average at the end of the measurement (where the OS reports one)."""
    if hasattr(os, "getloadavg"):
        report["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    return report


def measure(opts: Options, progress: bool = True) -> dict:
    """Every measurement of a checked :class:`Options`, as a JSON-ready dict."""
    import torch

    from ..models import build_model
    from .drops import measure_drops
    from .machine import machine_info
    from .memory import MemorySpec, peak_train_memory
    from .overheads import measure_overheads
    from .probe import DropProbe

    if opts.tpc is not None:
        return measure_tpc(opts, progress)
    if opts.epochs_timed:
        return measure_epochs_report(opts, progress)

    device = opts.device
    n_drops = len({0.0, *opts.drops})
    grid = "grid" not in opts.skip and opts.tome_r is None
    groups = len(opts.models) * len(opts.batch_sizes) * len(opts.blocks) if grid else 0
    per_group = opts.rounds * (1 if "inference" in opts.skip else 2)
    total = groups * per_group
    memory_on = grid and bool(opts.memory_steps) and "memory" not in opts.skip
    if memory_on:
        total += len(opts.models) * len(opts.batch_sizes) * len(opts.memory_blocks) * n_drops
    if "overheads" not in opts.skip and opts.tome_r is None:
        total += len(opts.models) * len(opts.batch_sizes) * opts.rounds
    total += len(opts.configs) * (opts.rounds + 1)
    if opts.tome_r is not None:
        total += len(opts.models) * len(opts.batch_sizes) * opts.rounds
    bar = _progress(total, progress)
    tick = lambda: bar.update(1)  # noqa: E731

    report: dict[str, Any] = {"tool": "tokendrop bench", "machine": machine_info(device), "notes": NOTES,
                              "settings": {"models": opts.models, "drop_ratios": opts.drops, "blocks": opts.blocks,
                                           "batch_sizes": opts.batch_sizes, "rounds": opts.rounds,
                                           "warmup": opts.warmup, "memory_steps": opts.memory_steps,
                                           "memory_blocks": opts.memory_blocks, "reducer": opts.reducer,
                                           "reducer_args": opts.reducer_args,
                                           "num_classes": BENCH_NUM_CLASSES, "seed": opts.seed,
                                           "train_step": dataclasses.asdict(opts.step),
                                           "train_step_description": opts.step.describe(device)},
                              "rows": [], "overheads": [], "projections": [], "data_pipeline": [], "tome": []}
    kwargs = {"num_classes": BENCH_NUM_CLASSES}
    try:
        for name in opts.models:
            for batch in opts.batch_sizes if grid else ():
                for block in opts.blocks:
                    bar.set_description(f"{name} b{block} bs{batch}")
                    torch.manual_seed(opts.seed)
                    probe = DropProbe(build_model(name, **kwargs), [block], reducer=opts.reducer,
                                        reducer_args=opts.reducer_args)
                    rows = measure_drops(name, probe, opts.drops, batch, device, opts.rounds, opts.warmup,
                                           infer="inference" not in opts.skip, count="counts" not in opts.skip,
                                           seed=opts.seed, on_round=tick, step=opts.step)
                    del probe
                    if memory_on and block in opts.memory_blocks:
                        bar.set_description(f"{name} b{block} bs{batch} memory")
                        for r in rows:
                            spec = MemorySpec(name, kwargs, [block], r.drop_ratio, batch, opts.memory_steps,
                                                torch.get_num_threads(), str(device), opts.seed, opts.reducer,
                                                opts.reducer_args, dataclasses.asdict(opts.step))
                            mem = peak_train_memory(spec)
                            if mem is not None:
                                r.peak_memory_mb = mem.peak_bytes / 2**20
                                r.memory_method = mem.method
                            tick()
                        base = rows[0].peak_memory_mb
                        for r in rows:
                            if base and r.peak_memory_mb is not None:
                                r.memory_vs_no_drop = r.peak_memory_mb / base
                    report["rows"] += [dataclasses.asdict(r) for r in rows]
            if "overheads" not in opts.skip and opts.tome_r is None:
                for batch in opts.batch_sizes:
                    bar.set_description(f"{name} bs{batch} overheads")
                    torch.manual_seed(opts.seed)
                    o = measure_overheads(name, build_model(name, **kwargs), opts.blocks[0], batch, device,
                                            opts.rounds, opts.warmup, opts.seed, on_round=tick, step=opts.step)
                    report["overheads"].append(dataclasses.asdict(o))
        for name in opts.models if opts.tome_r is not None else ():
            from .tome_table import measure_tome

            for batch in opts.batch_sizes:
                bar.set_description(f"{name} ToMe bs{batch}")
                torch.manual_seed(opts.seed)
                rows = measure_tome(name, build_model(name, **kwargs), opts.tome_r, batch, device, opts.rounds,
                                    opts.warmup, opts.seed, on_round=tick)
                report["tome"] += [r.to_dict() for r in rows]
        for cname, cfg in opts.configs:
            bar.set_description(f"projection {cname}")
            proj, pipe = project_config(cname, cfg, opts, tick)
            report["projections"].append(proj)
            if pipe is not None:
                report["data_pipeline"].append(pipe)
    finally:
        bar.close()
    return with_end_load(report)


TPC_NOTES = [
    "TPC-ViT: MACs per image, forward, analytic from the per-layer token counts of the validation images (CLS "
    "included): backbone on the tokens each block processed, the stabiliser's distance ranking (H·n²·d + H·n·d "
    "where κ < n) and the gates (4n + C per block); masked computes every token; dense is the model without TPC. "
    "The papers' \"GFLOPs\" are these GMACs.",
    "Timing: per batch size, interleaved rounds of inference (eval mode, inference_mode) of dense (the baseline), "
    "masked and packed TPC on the same validation images; speed-ups are medians of paired ratios. packed pads each "
    "block to the batch's longest image: padded_ideal_speedup is the MAC ratio at those counts.",
]


def measure_tpc(opts: Options, progress: bool = True) -> dict:
    """The ``--tpc`` measurement of checked :class:`Options`, as a JSON-ready dict."""
    import torch

    from ..train.trainer import build_eval_model
    from .machine import machine_info
    from .tpc import tpc_report, validation_images

    cfg = opts.tpc_config
    bar = _progress(len(opts.batch_sizes) * opts.rounds, progress)
    try:
        torch.manual_seed(opts.seed)
        images, info = validation_images(cfg, max(opts.tpc_images, *opts.batch_sizes))
        model = build_eval_model(cfg, info, opts.tpc_state, f"--tpc {opts.tpc}")
        result = tpc_report(model, images[:opts.tpc_images], opts.batch_sizes, opts.device, opts.rounds, opts.warmup,
                            opts.seed, on_round=lambda: bar.update(1))
    finally:
        bar.close()
    result.update(source=opts.tpc, model=cfg.model.name, mode_trained=cfg.tpc.mode, dataset=info.name)
    report = {"tool": "tokendrop bench", "machine": machine_info(opts.device), "notes": TPC_NOTES,
              "settings": {"tpc": opts.tpc, "batch_sizes": opts.batch_sizes, "rounds": opts.rounds,
                           "warmup": opts.warmup, "tpc_images": opts.tpc_images, "seed": opts.seed},
              "tpc": result, "rows": [], "overheads": [], "projections": [], "data_pipeline": []}
    return with_end_load(report)


EPOCHS_NOTES = [
    "--epochs-timed: per config, the trainer trains it at d = 0 and at a constant drop ratio (its token_drop sites, "
    "the schedule replaced by a constant) into a temporary folder: one untimed warm-up epoch, then the timed epochs, "
    "the two runs' epochs alternating. Epoch rate: the trainer's train_imgs_per_sec (the training part; validation "
    "is not timed and runs on one evaluation batch unless data.val_subset is set), median over the timed epochs; "
    "epoch speed-up: median over rounds of rate(d) / rate(0).",
    "Beside them: the data pipeline alone (its DataLoader, augmentations and workers), the config's training step "
    "alone on a fixed batch at the config's batch size (interleaved rounds, median of paired ratios) and the MAC "
    "ideal (analytic forward MACs at d = 0 / at d).",
    "Verdict (tokendrop.bench.epochs.verdict, at the drop ratio): data-bound when the epochs reach at least "
    "{DATA_BOUND_FRACTION:.0%} of the data rate while staying at most {STEP_HEADROOM:.0%} of the step's rate; else "
    "arithmetic-bound when the step realises at least {ARITHMETIC_GAIN_FRACTION:.0%} of the ideal gain "
    "(speed-up − 1) / (ideal − 1), launch/overhead-bound below it.",
]


def measure_epochs_report(opts: Options, progress: bool = True) -> dict:
    """The ``--epochs-timed`` measurement of checked :class:`Options`, as a JSON-ready dict."""
    from . import epochs
    from .machine import machine_info

    bar = _progress(len(opts.configs) * (opts.rounds + epochs.WARMUP_EPOCHS + opts.epochs_timed), progress)
    results = []
    try:
        for (name, cfg), drop in zip(opts.configs, opts.drops):
            bar.set_description(f"epochs {name}")
            results.append(dataclasses.asdict(epochs.measure_epochs(
                name, cfg, drop, opts.epochs_timed, opts.device, opts.rounds, opts.warmup, opts.data_batches,
                opts.seed, on_round=lambda: bar.update(1))))
    finally:
        bar.close()
    notes = [n.format(**vars(epochs)) for n in EPOCHS_NOTES]
    report = {"tool": "tokendrop bench", "machine": machine_info(opts.device), "notes": notes,
              "settings": {"configs": [n for n, _ in opts.configs], "epochs_timed": opts.epochs_timed,
                           "warmup_epochs": epochs.WARMUP_EPOCHS, "drop_ratios": opts.drops, "rounds": opts.rounds,
                           "warmup": opts.warmup, "data_batches": opts.data_batches, "seed": opts.seed},
              "epochs": results, "rows": [], "overheads": [], "projections": [], "data_pipeline": []}
    return with_end_load(report)


def project_config(cname: str, cfg: Any, opts: Options, tick: Any) -> tuple[dict, dict | None]:
    """Projected whole-run speed-up of ``cfg``'s schedule, and its data pipeline's rate beside the model's."""
    import torch

    from ..train.trainer import token_drop_schedule
    from .drops import measure_drops
    from .pipeline import data_throughput
    from .probe import StepSpec, config_probe
    from .projection import drop_points, epoch_drop_ratios, project_schedule, seconds_at, steps_per_epoch, train_set_size

    td = cfg.token_drop
    bs = cfg.optim.batch_size
    n_train = train_set_size(cfg)
    drop_last = cfg.augment.mixup_alpha > 0 or cfg.augment.cutmix_alpha > 0  # as the trainer
    steps = steps_per_epoch(n_train, bs, drop_last)
    torch.manual_seed(opts.seed)
    probe, model_kwargs = config_probe(cfg)
    if td.enabled:
        schedule = token_drop_schedule(cfg)
        epoch_drops = epoch_drop_ratios(schedule, cfg.optim.epochs, steps, td.per_step)
    else:
        schedule, epoch_drops = None, [[0.0]] * cfg.optim.epochs
    measured_bs = min(bs, max(opts.batch_sizes))
    step = StepSpec.from_config(cfg)
    rows = measure_drops(cfg.model.name, probe, drop_points(epoch_drops, opts.drops), measured_bs, opts.device,
                         opts.rounds, opts.warmup, infer=False, count=False, seed=opts.seed, on_round=tick, step=step)
    proj = project_schedule(probe, epoch_drops, seconds_at(rows, bs), steps, bs)
    proj.config, proj.model, proj.blocks = cname, cfg.model.name, probe.blocks
    proj.schedule = repr(schedule) if schedule is not None else "token drop disabled"
    proj.measured_batch_size = measured_bs
    proj.notes.append(f"{n_train} training images / batch {bs} = {steps} steps per epoch "
                      f"({'last partial batch dropped' if drop_last else 'last partial batch kept'}); "
                      f"epochs counted from 0; drop ratio {'moved every step' if td.per_step else 'set once per epoch'}")
    if measured_bs != bs:
        proj.notes.append(f"step times measured at batch {measured_bs} and scaled linearly to batch {bs}")
    proj.notes.append(f"the config's training step: {step.describe(opts.device)}")
    out = dataclasses.asdict(proj)
    out["model_kwargs"] = model_kwargs
    out["predicted_hours"] = proj.predicted_s / 3600
    out["no_drop_hours"] = proj.no_drop_s / 3600
    pipe = None
    if opts.data_batches and "data" not in opts.skip:
        p = data_throughput(cfg, opts.data_batches)
        model_rates = [bs / t for t in proj.epoch_step_s]
        slowest, fastest = min(model_rates), max(model_rates)
        pipe = dataclasses.asdict(p) | {
            "config": cname, "model_images_per_s_no_drop": bs * proj.epochs * steps / proj.no_drop_s,
            "model_images_per_s_min": slowest, "model_images_per_s_max": fastest,
            "bound_by": "data pipeline" if p.images_per_s < fastest else "model",
        }
    tick()
    return out, pipe


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m tokendrop.bench.command``)."""
    parser = argparse.ArgumentParser(prog="tokendrop bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
