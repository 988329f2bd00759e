"""Command line: ``tokendrop {train,eval,plot,demo,configs,bench,analyze,sweep,show}`` (also ``python -m tokendrop``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_USAGE = 2


def _error(msg: str, code: int = 1) -> int:
    print(f"tokendrop: error: {msg}", file=sys.stderr)
    return code


def _cmd_train(args: argparse.Namespace) -> int:
    from .train.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        return _error(str(e), EXIT_USAGE)
    from .train.trainer import train

    out = Path(args.out) if args.out else Path("runs") / cfg.name
    run_dir = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    print(f"run directory: {run_dir}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .train.config import parse_overrides
    from .train.trainer import evaluate_checkpoint

    result = evaluate_checkpoint(Path(args.checkpoint), args.device, parse_overrides(args.set))
    print(json.dumps(result, indent=2))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .train.plots import plot_run

    for p in plot_run(Path(args.run_dir)):
        print(p)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .train.demo import run_demo

    run_demo(Path(args.out), epochs=args.epochs, train_subset=args.train_subset)
    return 0


def _cmd_configs(args: argparse.Namespace) -> int:
    from .train.config import load_config, shipped_configs

    for name in shipped_configs():
        print(f"{name:<34} {load_config(name).reproduces}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench.command import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    """The ``tokendrop`` argument parser."""
    parser = argparse.ArgumentParser(prog="tokendrop", description="Train and run ViTs faster by reducing their tokens.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a config (shipped name or YAML path)")
    p.add_argument("--config", required=True, help="shipped config name (see `tokendrop configs`) or a YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. optim.lr=1e-3")
    p.add_argument("--out", help="run directory (default runs/NAME)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="validate a checkpoint (raw and EMA weights)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override e.g. data.root=DIR")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("plot", help="redraw a run's plots from its metrics.csv")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("demo", help="offline demo: baseline vs PTD on Fashion-MNIST (CPU, minutes)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--train-subset", type=int, default=10000, help="training images (the full 10k test set is always used)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("configs", help="list the shipped configs and the seed result each reproduces")
    p.set_defaults(func=_cmd_configs)

    from .bench.command import add_arguments

    p = sub.add_parser("bench", help="measure speed, MACs and memory of token drop against the ideal")
    add_arguments(p)
    p.set_defaults(func=_cmd_bench)

    from .analysis.cli_args import add_analysis_commands

    add_analysis_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for bad arguments or config values)."""
    from .train.checkpoint import CheckpointError
    from .train.data import DatasetNotFoundError
    from .train.trainer import NonFiniteLossError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DatasetNotFoundError, CheckpointError, NonFiniteLossError, FileNotFoundError) as e:
        return _error(str(e))
    except ValueError as e:
        return _error(str(e), EXIT_USAGE)
    except KeyboardInterrupt:
        return _error("interrupted; `--resume` continues from the last complete epoch", 130)


if __name__ == "__main__":
    sys.exit(main())
