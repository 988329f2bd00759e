"""Command line: ``tokendrop {train,eval,plot,demo,configs,bench,analyze,sweep,show}`` (also ``python -m tokendrop``).

Building the parser imports nothing heavy (no torch, timm or numpy), so ``--help`` and ``--version`` answer
at once; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ._version import __version__

EXIT_USAGE = 2


def _error(msg: str, code: int = 1) -> int:
    print(f"tokendrop: error: {msg}", file=sys.stderr)
    return code


def _cmd_train(args: argparse.Namespace) -> int:
    from .train.config import load_config

    overrides = list(args.set)
    if args.device is not None:
        from .device import pick_device

        pick_device(args.device, key="--device")  # a bad device fails now, naming the flag
        overrides.append(f"run.device={args.device}")
    cfg = load_config(args.config, overrides)
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

    run_demo(Path(args.out), epochs=args.epochs, train_subset=args.train_subset, fresh=args.fresh)
    return 0


def _cmd_configs(args: argparse.Namespace) -> int:
    from .papers import PAPERS
    from .train.config import load_config, shipped_configs

    cited = set()
    for name in shipped_configs():
        reproduces = load_config(name).reproduces
        cited.update(p for p in PAPERS if reproduces.startswith(p.key))
        print(f"{name:<34} {reproduces}")
    print("\npapers:")
    for paper in PAPERS:
        if paper in cited:
            print(f"  {paper.key}: {paper.citation()}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench.command import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    """The ``tokendrop`` argument parser."""
    parser = argparse.ArgumentParser(prog="tokendrop", description="Train and run ViTs faster by reducing their tokens.")
    parser.add_argument("--version", action="version", version=f"tokendrop {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a config (shipped name or YAML path)")
    p.add_argument("--config", required=True, help="shipped config name (see `tokendrop configs`) or a YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. optim.lr=1e-3")
    p.add_argument("--out", help="run directory (default runs/NAME)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps; overrides run.device")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="validate a checkpoint (raw and EMA weights)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override e.g. data.root=DIR")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("plot", help="redraw a run's plots from its metrics.csv")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("demo", help="offline demo: baseline vs PTD on Fashion-MNIST (CPU, minutes)")
    p.add_argument("--out", default="runs/demo", help="output folder; a complete earlier demo there is reused, an incomplete one resumed")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--train-subset", type=int, default=6000, help="training images (the full 10k test set is always used)")
    p.add_argument("--fresh", action="store_true", help="delete the demo's earlier runs in --out and train again")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("configs", help="list the shipped configs, the published result each reproduces and its paper")
    p.set_defaults(func=_cmd_configs)

    from .bench.command import add_arguments

    p = sub.add_parser("bench", help="measure speed, MACs and memory of token drop against the ideal")
    add_arguments(p)
    p.set_defaults(func=_cmd_bench)

    from .analysis.cli_args import add_analysis_commands

    add_analysis_commands(sub)
    return parser


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that end a command with a one-line message and exit code 1 (imported only once one is raised,
    so that the parser stays light)."""
    from .train.checkpoint import CheckpointError
    from .train.trainer import NonFiniteLossError

    return CheckpointError, NonFiniteLossError, FileNotFoundError  # FileNotFoundError: DatasetNotFoundError too


def _run(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    finally:
        sys.stdout.flush()  # --help's text: a closed pipe fails here, inside main
    try:
        code = args.func(args)
        sys.stdout.flush()
        return code
    except ValueError as e:  # ConfigError and other bad values
        return _error(str(e), EXIT_USAGE)
    except KeyboardInterrupt:
        if args.command == "sweep":
            return _error("interrupted; the same command with the same --out reuses the finished points and resumes "
                          "the interrupted one", 130)
        return _error("interrupted; `--resume` continues from the last complete epoch", 130)
    except Exception as e:
        if isinstance(e, BrokenPipeError) or not isinstance(e, _user_errors()):
            raise
        return _error(str(e))


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for bad arguments or config values)."""
    try:
        return _run(argv)
    except BrokenPipeError:
        # The reader went away (`tokendrop configs | head -1`): stop quietly. Python flushes stdout again at
        # exit, so point it at /dev/null first (the recipe of the Python documentation, "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
