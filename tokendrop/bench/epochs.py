"""``tokendrop bench --config NAME --epochs-timed N``: real training epochs at d = 0 and at a drop ratio, and
what bounds their rate.

Each drop ratio trains the config with the trainer (:meth:`~tokendrop.train.trainer.Trainer.setup`, then
:meth:`~tokendrop.train.trainer.Trainer.run_epoch`) into a temporary folder, its token-drop schedule
replaced by a constant drop ratio. :data:`WARMUP_EPOCHS` untimed epochs come first (worker start-up,
allocator, optimizer state), then the N timed ones; the two runs' epochs alternate (d = 0, then d, each
round), so a shared machine's drift hits both alike. An epoch's rate is the trainer's
``train_imgs_per_sec`` (its training part; validation is not timed, and runs on one evaluation batch
unless ``data.val_subset`` is set); the reported rate is the median over the timed epochs, the epoch
speed-up the median over rounds of rate(d) / rate(0).

Beside the epochs: (a) the data pipeline's rate alone (:func:`~tokendrop.bench.pipeline.data_throughput`),
(b) the config's training step alone on a fixed batch at each drop ratio (interleaved rounds), and the
MAC ideal (analytic forward MACs at d = 0 / at d). :func:`verdict` says which of them bounds the epochs.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..train.config import Config, config_from_dict, merge_dicts
from .drops import measure_drops
from .pipeline import PipelineResult, data_throughput
from .probe import StepSpec, config_probe

__all__ = ["ARITHMETIC_GAIN_FRACTION", "DATA_BOUND_FRACTION", "EpochRow", "EpochsResult", "STEP_HEADROOM",
           "Verdict", "WARMUP_EPOCHS", "constant_drop_config", "final_drop_ratio", "measure_epochs", "verdict"]

WARMUP_EPOCHS = 1
"""Epochs trained before the timed ones and not counted (the first epoch pays for start-up)."""

DATA_BOUND_FRACTION = 0.8
"""Data-bound needs the epoch rate at ``d`` to reach at least this fraction of the data pipeline's rate
alone (the epochs run about as fast as batches arrive) …"""

STEP_HEADROOM = 0.8
"""… while staying at most this fraction of the training step's rate alone at ``d`` (the model could go
faster)."""

ARITHMETIC_GAIN_FRACTION = 0.6
"""Otherwise the step decides: arithmetic-bound when its speed-up at ``d`` realises at least this fraction of
the MAC ideal's gain, ``(speed-up − 1) / (ideal − 1)``; launch/overhead-bound below it (fewer tokens save
less time than arithmetic: kernel launches, host work and memory traffic do not shrink with them)."""


def final_drop_ratio(cfg: Config) -> float:
    """The drop ratio a config's schedule ends at: ``1 − keep_rate`` for a constant schedule, else
    ``token_drop.final``."""
    td = cfg.token_drop
    return round(1.0 - td.keep_rate, 9) if td.schedule == "constant" else td.final


def constant_drop_config(cfg: Config, drop: float, epochs: int, device: torch.device) -> Config:
    """``cfg`` with token drop on at its sites at the constant drop ratio ``drop``, ``epochs`` epochs, on
    ``device``, nothing downloaded, and (unless ``data.val_subset`` is set) validation on one evaluation batch."""
    data = merge_dicts(cfg.to_dict(), {
        "token_drop": {"enabled": True, "schedule": "constant", "keep_rate": round(1.0 - drop, 9), "per_step": False},
        "optim": {"epochs": epochs}, "run": {"device": str(device)}, "data": {"download": False}})
    if not cfg.data.val_subset:
        data["data"]["val_subset"] = cfg.optim.eval_batch_size
    return config_from_dict(data)


@dataclass
class Verdict:
    """What bounds the epochs at a drop ratio: ``kind`` is ``data-bound``, ``launch/overhead-bound`` or
    ``arithmetic-bound``; ``reason`` gives the numbers that decided it."""

    kind: str
    reason: str


def verdict(data_rate: float, step_rate: float, epoch_rate: float, step_speedup: float,
            ideal_speedup: float) -> Verdict:
    """Classify with :data:`DATA_BOUND_FRACTION`, :data:`STEP_HEADROOM` and :data:`ARITHMETIC_GAIN_FRACTION`
    (rates in images/s at the drop ratio; speed-ups against d = 0)."""
    if epoch_rate >= DATA_BOUND_FRACTION * data_rate and epoch_rate <= STEP_HEADROOM * step_rate:
        return Verdict("data-bound", f"the epochs' {epoch_rate:.0f} img/s reach {epoch_rate / data_rate:.0%} of the "
                                     f"data pipeline's {data_rate:.0f} img/s alone but {epoch_rate / step_rate:.0%} of "
                                     f"the step's {step_rate:.0f} img/s alone")
    gain = (step_speedup - 1.0) / (ideal_speedup - 1.0) if ideal_speedup > 1.0 else 1.0
    kind = "arithmetic-bound" if gain >= ARITHMETIC_GAIN_FRACTION else "launch/overhead-bound"
    return Verdict(kind, f"the step alone speeds up {step_speedup:.3f}× against a MAC ideal of {ideal_speedup:.3f}× "
                         f"({gain:.0%} of the ideal gain); epochs {epoch_rate:.0f} img/s, step {step_rate:.0f} img/s, "
                         f"data pipeline {data_rate:.0f} img/s")


@dataclass
class EpochRow:
    """One drop ratio: the timed epochs' rates, and the step alone on a fixed batch."""

    drop_ratio: float
    kept_tokens: int  # patch tokens after the last site
    epoch_imgs_per_s: list[float]  # the trainer's train_imgs_per_sec of each timed epoch
    imgs_per_s: float  # their median
    speedup: float  # median over rounds of rate(d) / rate(0)
    step_imgs_per_s: float  # batch / median step time
    step_speedup: float  # median paired ratio against d = 0
    ideal_speedup: float  # analytic forward MACs at d = 0 / at d


@dataclass
class EpochsResult:
    """``--epochs-timed`` for one config."""

    config: str
    model: str
    blocks: list[int]
    batch_size: int
    train_images: int
    epochs_timed: int
    warmup_epochs: int
    train_step: str  # the step's settings (StepSpec.describe)
    rows: list[EpochRow]
    data: dict  # PipelineResult fields
    verdict: Verdict
    notes: list[str] = field(default_factory=list)


def _train_epochs(cfg: Config, drops: list[float], epochs: int, device: torch.device,
                  on_round: Callable[[], None] | None) -> tuple[dict[float, list[float]], dict[float, int], int]:
    """Train ``cfg`` at each drop ratio, the runs' epochs alternating; the timed epochs' rates, the kept
    tokens per drop ratio and the training images per epoch."""
    from ..train.trainer import Trainer

    rates: dict[float, list[float]] = {d: [] for d in drops}
    kept: dict[float, int] = {}
    with tempfile.TemporaryDirectory(prefix="tokendrop-bench-epochs-") as tmp:
        trainers = [Trainer(constant_drop_config(cfg, d, WARMUP_EPOCHS + epochs, device), Path(tmp) / f"d{d:g}",
                            progress=False, label=f"d={d:g} ") for d in drops]
        for t in trainers:
            t.setup()
        for epoch in range(WARMUP_EPOCHS + epochs):
            for d, t in zip(drops, trainers):
                row = t.run_epoch(epoch)
                kept[d] = row["kept_tokens"]
                if epoch >= WARMUP_EPOCHS:
                    rates[d].append(row["train_imgs_per_sec"])
            if on_round is not None:
                on_round()
        images = len(trainers[0].train_loader.dataset)
    return rates, kept, images


def measure_epochs(name: str, cfg: Config, drop: float, epochs: int, device: torch.device, rounds: int = 5,
                   warmup: int = 2, data_batches: int = 40, seed: int = 0,
                   on_round: Callable[[], None] | None = None) -> EpochsResult:
    """Time ``epochs`` epochs of ``cfg`` at d = 0 and at ``drop`` (after :data:`WARMUP_EPOCHS`), the data
    pipeline alone and the config's step alone at both drop ratios, and give the :func:`verdict`."""
    pipe: PipelineResult = data_throughput(cfg, data_batches)
    torch.manual_seed(seed)
    probe, _ = config_probe(cfg)
    step = StepSpec.from_config(cfg)
    bs = cfg.optim.batch_size
    steps = measure_drops(cfg.model.name, probe, [drop], bs, device, rounds, warmup, infer=False, count=False,
                          seed=seed, on_round=on_round, step=step)
    drops = [r.drop_ratio for r in steps]
    rates, kept, images = _train_epochs(cfg, drops, epochs, device, on_round)
    rows = []
    for r in steps:
        epoch_rates = rates[r.drop_ratio]
        rows.append(EpochRow(r.drop_ratio, kept[r.drop_ratio], epoch_rates, statistics.median(epoch_rates),
                             statistics.median(a / b for a, b in zip(epoch_rates, rates[0.0])), r.train.images_per_s,
                             r.train.speedup, r.ideal_speedup))
    top = rows[-1]
    v = verdict(pipe.images_per_s, top.step_imgs_per_s, top.imgs_per_s, top.step_speedup, top.ideal_speedup)
    notes = [f"step alone: the config's step on a fixed random batch of {bs}, {rounds} interleaved rounds"]
    if cfg.augment.mixup_alpha > 0 or cfg.augment.cutmix_alpha > 0 or cfg.distill.teacher:
        notes.append("the step alone has no Mixup/CutMix and no distillation teacher; the epochs have them")
    return EpochsResult(name, cfg.model.name, list(probe.blocks), bs, images, epochs, WARMUP_EPOCHS,
                        step.describe(device), rows, dataclasses.asdict(pipe), v, notes)

