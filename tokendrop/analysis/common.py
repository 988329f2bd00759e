"""What ``tokendrop analyze``, ``sweep`` and ``show`` share: the model and validation data to study, method
specifications, keep rates and blocks — each checked up front, so a bad argument stops the command with a
one-line :class:`UsageError` (exit 2) before anything is written."""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .. import reduction as red
from ..bench.command import UsageError
from ..reduction.registry import reducer_names

__all__ = ["MethodSpec", "Options", "Source", "UsageError", "attached", "check_blocks", "check_count", "check_keep_rates",
           "check_methods", "check_options", "default_blocks", "load_source", "parse_methods", "progress_bar",
           "usage_errors"]


# ------------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class MethodSpec:
    """A registered method with its arguments, as given on the command line: ``NAME`` or
    ``NAME:KEY=VALUE[,KEY=VALUE…]`` (values read as YAML), e.g. ``topk:score=l2``."""

    label: str
    name: str
    kwargs: dict = field(default_factory=dict, hash=False)

    def build(self) -> red.Reducer | str:
        """What :func:`tokendrop.attach` takes: the name alone (so attach builds it), or the built reducer."""
        return red.reducer(self.name, **self.kwargs) if self.kwargs else self.name


def parse_method(text: str, flag: str = "--methods") -> MethodSpec:
    """One :class:`MethodSpec` from ``text``; the method and its arguments are checked by building it."""
    name, _, rest = text.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"{flag}: {text!r}: expected NAME or NAME:KEY=VALUE[,KEY=VALUE]")
        kwargs[key.strip()] = yaml.safe_load(raw)
    spec = MethodSpec(text, name.strip(), kwargs)
    try:
        red.reducer(spec.name, **spec.kwargs)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{flag}: {text!r}: {e}") from None
    return spec


def parse_methods(texts: Sequence[str] | None, flag: str = "--methods") -> list[MethodSpec]:
    """The method specs of ``texts``; ``None`` = every registered method with its default arguments."""
    specs = [parse_method(t, flag) for t in (texts if texts is not None else reducer_names())]
    labels = [s.label for s in specs]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise UsageError(f"{flag}: {twice[0]!r} is given twice")
    return specs


def attached(model: nn.Module, spec: MethodSpec, blocks: Sequence[int], keep_rate: float,
             relative_to: str = "original") -> nn.Module:
    """``model`` with ``spec`` attached at ``blocks`` keeping ``keep_rate`` (a constant schedule, active at
    evaluation) — with ``relative_to="original"`` stage s keeps ``int(P·r^s)`` as in seed 004."""
    return red.attach(model, spec.build(), blocks=list(blocks), schedule=red.Constant(keep_rate), when="eval",
                      relative_to=relative_to)


def check_methods(model: nn.Module, specs: list[MethodSpec], blocks: Sequence[int], explicit: bool,
                  flag: str = "--methods") -> list[MethodSpec]:
    """The specs that attach to ``model`` at ``blocks``. A method given explicitly that cannot attach is an
    error; from the default (every registered method) it is left out with a note on stderr."""
    usable = []
    for spec in specs:
        try:
            red.detach(attached(model, spec, blocks, 0.5))
        except (ValueError, TypeError) as e:
            red.detach(model)
            if explicit:
                raise UsageError(f"{flag}: {spec.label!r} cannot run here: {e}") from None
            print(f"note: leaving out {spec.label}: {e}", file=sys.stderr)
            continue
        usable.append(spec)
    if not usable:
        raise UsageError(f"{flag}: no method can run on this model")
    return usable


# ------------------------------------------------------------------------------------ numbers
def check_keep_rates(values: Sequence[Any], flag: str = "--keep-rates") -> list[float]:
    """Keep rates as floats in (0, 1], each once."""
    out = []
    for v in values:
        try:
            r = float(v)
        except (TypeError, ValueError):
            raise UsageError(f"{flag}: {v!r} is not a number") from None
        if not (math.isfinite(r) and 0.0 < r <= 1.0):
            raise UsageError(f"{flag}: {v!r} is outside the allowed range (0, 1]")
        if r in out:
            raise UsageError(f"{flag}: {v!r} is given twice")
        out.append(r)
    return out


def default_blocks(depth: int) -> list[int]:
    """Sites at a quarter, half and three quarters of the depth (seed 004's blocks 3/6/9 of 12)."""
    return sorted({max(1, depth // 4), depth // 2, 3 * depth // 4} - {0})


def check_blocks(values: Sequence[Any], depth: int, flag: str = "--blocks") -> list[int]:
    """Block indices as sorted ints in [0, depth), each once."""
    out = []
    for v in values:
        try:
            b = int(v)
        except (TypeError, ValueError):
            raise UsageError(f"{flag}: {v!r} is not an integer") from None
        if not 0 <= b < depth:
            raise UsageError(f"{flag}: {b} is outside the allowed range [0, {depth - 1}]")
        if b in out:
            raise UsageError(f"{flag}: block {b} is given twice")
        out.append(b)
    if not out:
        raise UsageError(f"{flag}: give at least one block")
    return sorted(out)


def check_count(value: Any, flag: str, lo: int) -> int:
    """An integer ``>= lo``."""
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"{flag}: {value!r} is not an integer") from None
    if n < lo:
        raise UsageError(f"{flag}: {n} is outside the allowed range [{lo}, inf)")
    return n


@dataclass
class Options:
    """The checked options every command shares."""

    methods: list[MethodSpec]
    explicit: bool  # the methods were named (not the default: every registered method)
    batch_size: int
    max_images: int
    seed: int
    progress: bool


def check_options(args: argparse.Namespace) -> Options:
    """Check ``--methods``, ``--batch-size`` and ``--max-images`` (where the command has them) and ``--seed``."""
    return Options(parse_methods(args.methods), args.methods is not None,
                   check_count(getattr(args, "batch_size", 1), "--batch-size", 1),
                   check_count(getattr(args, "max_images", 0), "--max-images", 0), check_count(args.seed, "--seed", 0),
                   not args.no_progress)


# ------------------------------------------------------------------------------------ model and data
@dataclass
class Source:
    """The model under study (eval mode, on ``device``, no sites) and its validation data."""

    label: str  # checkpoint path or model name
    model: nn.Module
    val: Dataset
    info: Any  # DatasetInfo
    img_size: int
    device: torch.device
    workers: int
    config: Any = None  # the Config the model and data were built from (``--set`` applied)

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(int(g) for g in self.model.patch_embed.grid_size)

    def loader(self, batch_size: int, max_images: int = 0) -> DataLoader:
        """The validation images in order (the first ``max_images`` when positive)."""
        ds = Subset(self.val, range(min(max_images, len(self.val)))) if max_images else self.val
        return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=self.workers)


def _config(args: argparse.Namespace, base: dict) -> Any:
    from ..train.config import ConfigError, config_from_dict, merge_dicts, parse_overrides

    try:
        extra = parse_overrides(args.set)
        if args.dataset:
            merge_dicts(extra, {"data": {"dataset": args.dataset}})
        return config_from_dict(merge_dicts(base, extra))
    except ConfigError as e:
        raise UsageError(str(e)) from None


def load_source(args: argparse.Namespace, seed: int = 0) -> Source:
    """Model and validation data from ``--checkpoint`` (its config; ``--ema`` for its EMA weights) or from
    ``--model`` (``--pretrained`` weights, or random ones drawn after ``torch.manual_seed(seed)``, on
    ``--dataset``); ``--set`` overrides config keys."""
    from ..device import pick_device
    from ..train.checkpoint import CheckpointError, load_checkpoint
    from ..train.data import DatasetNotFoundError, build_datasets
    from ..train.trainer import build_run_model

    if args.checkpoint:
        if args.pretrained:
            raise UsageError("--pretrained: only with --model (a checkpoint brings its own weights)")
        try:
            ckpt = load_checkpoint(args.checkpoint)
        except CheckpointError as e:
            raise UsageError(f"--checkpoint: {e}") from None
        cfg = _config(args, ckpt["config"])
    else:
        if not args.dataset:
            raise UsageError("--dataset: required with --model (e.g. --dataset digits)")
        if args.ema:
            raise UsageError("--ema: only with --checkpoint")
        ckpt = None
        cfg = _config(args, {"model": {"name": args.model}})
    try:
        device = pick_device(args.device, key="--device")
        _, val, info = build_datasets(cfg.data, cfg.augment, cfg.seed)
        img_size = cfg.data.img_size or info.img_size
        torch.manual_seed(seed)
        model = build_run_model(cfg, info.num_classes, info.in_chans, img_size)
    except (ValueError, DatasetNotFoundError) as e:
        raise UsageError(str(e)) from None
    if ckpt is not None:
        weights = ckpt.get("ema") if args.ema else ckpt["model"]
        if weights is None:
            raise UsageError(f"--ema: checkpoint {args.checkpoint} has no EMA weights")
        if args.ema:  # an EMA state dict holds the averaged model under "module."
            weights = {k.removeprefix("module."): v for k, v in weights.items() if k.startswith("module.")}
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:
            raise UsageError(f"--checkpoint: {args.checkpoint} does not fit {cfg.model.name} ({str(e).splitlines()[0]})") from None
    elif args.pretrained:
        from ..models.pretrained import PretrainedError, load_pretrained

        try:
            load_pretrained(model, args.pretrained)
        except PretrainedError as e:
            raise UsageError(f"--pretrained: {e}") from None
    red.detach(model)  # the config's training-time sites do not take part
    return Source(str(args.checkpoint or args.model), model.eval().to(device), val, info, img_size, device,
                  cfg.data.workers, cfg)


# ------------------------------------------------------------------------------------------- running
def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar on stderr (a silent one when ``enabled`` is false)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def usage_errors(command: str, body: Callable[[], int]) -> int:
    """Run ``body``; a :class:`UsageError` becomes one line on stderr and exit code 2."""
    try:
        return body()
    except UsageError as e:
        print(f"tokendrop {command}: error: {e}", file=sys.stderr)
        return 2
