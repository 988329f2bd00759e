"""The ``analyze``, ``sweep`` and ``show`` sub-commands of the ``tokendrop`` CLI. Building the parser imports
neither torch nor the commands; each command's module is imported when it runs. Values are checked by the
command itself (one-line errors naming the argument, exit 2, nothing written)."""

from __future__ import annotations

import argparse
from typing import Any

COMMANDS = ("analyze", "sweep", "show")
ANALYZE_KEEP_RATES = ["0.9", "0.7", "0.5", "0.25"]  # seed 004's
SWEEP_KEEP_RATES = ["0.9", "0.8", "0.7", "0.6", "0.5", "0.4", "0.3"]


def _source(p: argparse.ArgumentParser) -> None:
    """Where the model and data come from, which methods run where; shared by the three commands."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", help="a tokendrop checkpoint (its config names model and data)")
    src.add_argument("--model", metavar="NAME", help="a backbone by name (ours or timm's), random weights unless --pretrained")
    p.add_argument("--pretrained", metavar="SOURCE", help="with --model: weights from a checkpoint file or timm's name for them")
    p.add_argument("--ema", action="store_true", help="with --checkpoint: its EMA weights")
    p.add_argument("--dataset", help="data set (required with --model): cifar10, cifar100, fashion-mnist, digits, imagefolder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. data.root=DIR or data.workers=0")
    p.add_argument("--methods", nargs="+", metavar="SPEC",
                   help="registered methods, NAME or NAME:KEY=VALUE[,KEY=VALUE] (e.g. topk topk:score=l2); "
                        "default: every registered method with its default arguments")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", default="0", help="torch seed set before every run, for random scores (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _batches(p: argparse.ArgumentParser) -> None:
    """How the validation images are run (``analyze`` and ``sweep``)."""
    p.add_argument("--batch-size", default="64", metavar="N", help="images per forward (default 64)")
    p.add_argument("--max-images", default="0", metavar="N", help="use only the first N validation images (0 = all)")


def add_analysis_commands(sub: Any) -> None:
    """Add ``analyze``, ``sweep`` and ``show`` to the sub-parsers ``sub`` of the main parser."""
    p = sub.add_parser("analyze", help="reduction patterns of methods × keep rates: IoA/IoU, homogeneity/NMI, "
                                       "averaged patterns, feature alignment (analysis.json + figures)")
    _source(p)
    _batches(p)
    p.add_argument("--keep-rates", nargs="+", default=ANALYZE_KEEP_RATES, metavar="R",
                   help="keep rates in (0, 1]; stage s keeps int(P·r^s) (default 0.9 0.7 0.5 0.25)")
    p.add_argument("--blocks", nargs="+", metavar="B", help="0-based site blocks (default: at 1/4, 1/2, 3/4 of the depth)")
    p.add_argument("--anchor", metavar="SPEC", help="method the performance proxies compare against (default: the first)")
    p.add_argument("--out", default="runs/analysis", help="output directory (default runs/analysis)")
    p.set_defaults(func=_dispatch("analyze"))

    p = sub.add_parser("sweep", help="accuracy, GFLOPs and throughput of methods × keep rates × sites, post hoc "
                                     "and optionally after a short fine-tune per point (sweep.csv + Pareto plot)")
    _source(p)
    _batches(p)
    p.add_argument("--keep-rates", nargs="+", default=SWEEP_KEEP_RATES, metavar="R",
                   help="keep rates in (0, 1] (default 0.9 … 0.3 in steps of 0.1)")
    p.add_argument("--sites", nargs="+", metavar="B,B,…",
                   help="sets of 0-based site blocks, each comma-separated, e.g. 3,6,9 3 (default: 1/4, 1/2, 3/4 of the depth)")
    p.add_argument("--relative-to", default="original", choices=("original", "entering"),
                   help="keep count over the original patches (int(P·r^s), seed 004) or those entering each site")
    p.add_argument("--rounds", default="3", metavar="R", help="interleaved timing rounds; 0 = no throughput (default 3)")
    p.add_argument("--finetune-epochs", default="0", metavar="N",
                   help="also fine-tune every point (and the unreduced model) N epochs with the trainer; 0 = post hoc only")
    p.add_argument("--finetune-set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config keys of the fine-tunes, over the checkpoint's recipe (repeatable), e.g. "
                        "optim.lr=1e-4 data.train_subset=6000 optim.batch_size=128")
    p.add_argument("--fresh", action="store_true", help="delete the fine-tunes of an earlier sweep in --out first "
                                                        "(default: reuse finished points, resume interrupted ones)")
    p.add_argument("--out", default="runs/sweep", help="output directory (default runs/sweep)")
    p.set_defaults(func=_dispatch("sweep"))

    p = sub.add_parser("show", help="token maps: kept patches or merge clusters per method and site (PNG)")
    _source(p)
    p.add_argument("--keep-rate", default="0.5", metavar="R", help="keep rate in (0, 1] (default 0.5)")
    p.add_argument("--blocks", nargs="+", metavar="B", help="0-based site blocks (default: at 1/4, 1/2, 3/4 of the depth)")
    p.add_argument("--images", default="4", metavar="N", help="the first N validation images (default 4)")
    p.add_argument("--indices", nargs="+", metavar="I", help="these validation images instead")
    p.add_argument("--out", default="runs/token_maps.png", help="output PNG (default runs/token_maps.png)")
    p.set_defaults(func=_dispatch("show"))


def _dispatch(command: str) -> Any:
    """The function the main CLI calls for ``command``: imports its module, then runs it."""

    def run(args: argparse.Namespace) -> int:
        from importlib import import_module

        return import_module(f"tokendrop.analysis.{command}").run(args)

    return run
