"""The training loop of the seeds' recipe: AdamW, warmup + cosine, label smoothing, clipping,
Mixup/CutMix, EMA, token-drop curriculum, per-epoch metrics, atomic checkpoints, resume and DDP."""

from __future__ import annotations

import csv
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm import tqdm

from .. import reduction as red
from ..device import pick_device
from ..models import build_model
from .checkpoint import CheckpointError, load_checkpoint, rng_state, save_atomic, set_rng_state
from .config import Config, ConfigError, config_from_dict, merge_dicts, shipped_configs
from .data import DatasetInfo, build_datasets, build_loaders, model_input_size
from ..models.pretrained import LoadReport, PretrainedError, is_checkpoint_path, load_pretrained
from .distill import build_teacher
from .optim import build_adamw, group_lr_factor, load_optimizer_state, param_groups
from .distributed import all_reduce_sum, broadcast_buffers, cleanup, init_distributed, is_distributed
from .ema import build_ema
from .gpu_pipeline import DeviceLoader, choose_pipeline
from .step import NonFiniteLossError, StepTotals, TrainStep, autocast_context
from .tpc import TPCMeter, attach_run_tpc, tpc_columns

METRIC_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss_raw", "val_acc_raw", "val_loss_ema", "val_acc_ema",
                  "lr", "drop_ratio", "kept_tokens", "epoch_time_sec", "train_imgs_per_sec")


RESUME_FREE_KEYS = ("run.device", "run.threads", "run.compile", "run.cuda_graphs", "run.nan_check_every", "data.workers", "data.root",
                    "data.download")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_differences(old: dict, new: dict, ignore: tuple[str, ...] = RESUME_FREE_KEYS) -> list[str]:
    """The dotted keys (sorted) whose values differ between two config dicts, except those in ``ignore``. A key
    one of them lacks (a run written before the key existed) counts as its default."""
    defaults = _flatten(Config().to_dict())
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in a.keys() | b.keys()
                  if k not in ignore and a.get(k, defaults.get(k)) != b.get(k, defaults.get(k)))


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; optionally ask PyTorch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def lr_factor(t: float, warmup: float, total: float, min_ratio: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` units, then cosine to ``min_ratio`` at ``total`` (units: epochs or
    steps). ``t`` counts from 0; the first unit already gets ``1/warmup``."""
    if t < warmup:
        return min(1.0, (t + 1) / warmup)
    progress = min(1.0, (t - warmup) / max(1e-12, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def token_drop_schedule(cfg: Config) -> red.Schedule:
    """The drop-ratio schedule of ``cfg.token_drop``."""
    td = cfg.token_drop
    return red.make_schedule(td.schedule, start=td.start, end=td.end, initial=td.initial, final=td.final,
                             gamma=td.gamma, steps=td.steps, keep_rate=td.keep_rate)


def token_reducer(cfg: Config) -> red.Reducer:
    """The reduction method of ``cfg.token_drop`` (``score`` is Top-K's default score)."""
    td = cfg.token_drop
    args = dict(td.reducer_args)
    if td.reducer == "topk":
        args.setdefault("score", td.score)
    return red.reducer(td.reducer, **args)


def build_token_drop(model: nn.Module, cfg: Config) -> None:
    """Attach the config's reduction sites."""
    td = cfg.token_drop
    if not td.enabled:
        return
    position = None if td.position == "auto" else td.position
    red.attach(model, token_reducer(cfg), blocks=list(td.blocks), schedule=token_drop_schedule(cfg), when=td.when,
               position=position, relative_to=td.relative_to)
    if td.train_only_blocks:  # the method runs there in training without reducing (TNT's noise allocator)
        try:
            red.attach(model, token_reducer(cfg), blocks=list(td.train_only_blocks), schedule=red.Constant(1.0),
                       when="train", position=position, always_reduce=True)
        except ValueError as e:
            raise ValueError(f"token_drop.train_only_blocks: {str(e).partition(': ')[2] or e}") from None


# Library argument names → the config keys that set them, so errors name what the user can change.
_ARG_TO_KEY = {"name": "model.name", "img_size": "data.img_size", "in_chans": "data.dataset", "blocks": "token_drop.blocks",
               "score": "token_drop.score", "reducer": "token_drop.reducer", "reducer_args": "token_drop.reducer_args",
               "final": "token_drop.final", "position": "token_drop.position",
               "initial": "token_drop.initial", "gamma": "token_drop.gamma", "end": "token_drop.end",
               "start": "token_drop.start", "steps": "token_drop.steps", "keep_rate": "token_drop.keep_rate"}


def check_pretrained_file(source: str) -> None:
    """Fail early (before any data is read) when ``model.pretrained`` names a checkpoint file that is not
    there; for ``RUNS/NAME/best.pt`` (or ``last.pt``) of a shipped config NAME, say the command that makes it."""
    path = Path(source).expanduser()
    if not is_checkpoint_path(source) or path.is_file():
        return
    hint = ""
    if path.name in ("best.pt", "last.pt") and path.parent.name in shipped_configs():
        hint = f"; make it with: tokendrop train --config {path.parent.name} --out {path.parent}"
    raise CheckpointError(f"model.pretrained: checkpoint {path} does not exist{hint}")


def load_pretrained_weights(model: nn.Module, source: str) -> LoadReport:
    """:func:`~tokendrop.models.pretrained.load_pretrained` with its failure as a one-line ``CheckpointError``."""
    try:
        return load_pretrained(model, source)
    except PretrainedError as e:
        raise CheckpointError(str(e)) from None


MANY_TOKENS = 1024
"""Above this many tokens per image a run says so, and how to choose a smaller input side."""


def _config_error(e: ValueError) -> ValueError:
    arg, sep, rest = str(e).partition(": ")
    return ValueError(f"{_ARG_TO_KEY[arg]}: {rest}") if sep and arg in _ARG_TO_KEY else e


def many_tokens_notice(model_name: str, tokens: int, img_size: int) -> str | None:
    """One line when a model sees more than :data:`MANY_TOKENS` tokens per image: the count, and a smaller
    input side to choose (the model's own, or half the current side)."""
    if tokens <= MANY_TOKENS:
        return None
    side = model_input_size(model_name)
    if side >= img_size:
        side = img_size // 2
    fewer = round(tokens * (side / img_size) ** 2)
    return (f"notice: {model_name} sees {tokens} tokens per image at {img_size} px, which is slow; choose the input "
            f"side with --set data.img_size=N (e.g. {side}: about {fewer} tokens)")


def build_run_model(cfg: Config, num_classes: int, in_chans: int, img_size: int) -> nn.Module:
    """The backbone of ``cfg`` with its token-drop sites (printing :func:`many_tokens_notice` when due)."""
    try:
        model = build_model(cfg.model.name, num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                            drop_rate=cfg.model.drop_rate, drop_path_rate=cfg.model.drop_path_rate)
        build_token_drop(model, cfg)
    except ValueError as e:
        raise _config_error(e) from None
    except TypeError as e:
        raise ValueError(f"model.name: {cfg.model.name!r} is not a ViT tokendrop can train ({e})") from None
    notice = many_tokens_notice(cfg.model.name, model.patch_embed.num_patches, img_size)
    if notice and not (is_distributed() and torch.distributed.get_rank() > 0):
        print(notice, file=sys.stderr)
    return model


@dataclass
class EvalResult:
    loss: float
    acc: float  # percent
    count: int


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: str,
             after_forward: Callable[[], None] | None = None) -> EvalResult:
    """Cross-entropy and top-1 accuracy (percent) over ``loader``, summed over all processes (the sums stay
    on the device until the end); ``after_forward`` is called after each batch's forward (to read
    per-forward statistics)."""
    model.eval()
    sums, count = torch.zeros(2, dtype=torch.float64 if device.type != "mps" else torch.float32, device=device), 0
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast_context(device, amp):
            logits = model(images)
        if after_forward is not None:
            after_forward()
        sums += torch.stack([F.cross_entropy(logits.float(), targets, reduction="sum"), (logits.argmax(1) == targets).sum()])
        count += targets.numel()
    loss_sum, correct, count = all_reduce_sum([*sums.tolist(), float(count)], device)
    return EvalResult(loss_sum / max(count, 1), 100.0 * correct / max(count, 1), int(count))


class Trainer:
    """One training run in ``out_dir``; rank 0 writes ``config.yaml``, ``metrics.csv``, checkpoints, plots.

    :meth:`run` trains to the end. To advance several runs side by side (the demo interleaves two),
    call :meth:`setup`, then :meth:`run_epoch` for each epoch of :meth:`epochs`, then :meth:`finish`.
    Each trainer keeps its own RNG state between epochs, so interleaving does not change its results.
    """

    def __init__(self, cfg: Config, out_dir: Path, resume: bool = False, progress: bool = True, label: str = "") -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.resume = resume
        self.progress = progress
        self.label = label  # printed before each epoch line

    # -- set-up ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Build data, model and optimizer, load ``last.pt`` when resuming, and (unless the run is already
        complete) write ``config.yaml`` and the kept rows of ``metrics.csv``."""
        self._setup()
        if self.is_main and not self.complete:
            self._prepare_dir()
        self._rng = rng_state()

    @property
    def complete(self) -> bool:
        """Whether ``optim.epochs`` epochs are done (after :meth:`setup`)."""
        return self.start_epoch >= self.cfg.optim.epochs

    def epochs(self) -> range:
        """The epochs (0-based) still to train (after :meth:`setup`)."""
        return range(self.start_epoch, self.cfg.optim.epochs)

    def _setup(self) -> None:
        cfg = self.cfg
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.device = pick_device(cfg.run.device)
        self.rank, self.world, local_rank = init_distributed(self.device.type)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        self.is_main = self.rank == 0
        seed_everything(cfg.seed, cfg.run.deterministic)  # same initial weights (and EMA) on every process
        if cfg.model.pretrained and not self.resume:
            check_pretrained_file(cfg.model.pretrained)

        train_ds, val_ds, info = build_datasets(cfg.data, cfg.augment, cfg.seed, cfg.model.name)
        self.info = info
        if self.world > 1:  # shard validation without padding (no sample counted twice)
            val_ds = torch.utils.data.Subset(val_ds, list(range(self.rank, len(val_ds), self.world)))
        self.mixup_on = cfg.augment.mixup_alpha > 0 or cfg.augment.cutmix_alpha > 0
        self.train_loader, self.val_loader, self.sampler = build_loaders(
            train_ds, val_ds, cfg.optim.batch_size, cfg.optim.eval_batch_size, cfg.data.workers, cfg.seed,
            drop_last=self.mixup_on, distributed=self.world > 1)
        arrays = choose_pipeline(cfg.data.pipeline, self.device, train_ds, cfg.augment, info, cfg.data.img_size, self.world)
        if arrays is not None:
            self.train_loader = DeviceLoader(arrays, train_ds, info, cfg.augment, cfg.optim.batch_size, self.mixup_on,
                                             self.device)
        if len(self.train_loader) == 0:
            raise ValueError(f"optim.batch_size: {cfg.optim.batch_size} is larger than each process's share of the "
                             f"training set ({len(train_ds) // self.world} images)")
        self.steps_per_epoch = len(self.train_loader)
        img_size = cfg.data.img_size or info.img_size

        self.model = build_run_model(cfg, info.num_classes, info.in_chans, img_size).to(self.device)
        if cfg.model.pretrained and not self.resume:
            self._load_pretrained()
        attach_run_tpc(self.model, cfg)  # after the pretrained weights: they fit the plain model
        if self.is_main:  # after the checks of data and model, so that a bad value gives one line only
            where = f"; training batches made on {self.device}" if arrays is not None else ""
            print(f"data: {info.name} from {info.source}{where}", file=sys.stderr)
        self.columns = list(METRIC_COLUMNS) + (tpc_columns(len(self.model.blocks)) if cfg.tpc.enabled else [])
        self.teacher = None
        if cfg.distill.teacher:
            self.teacher = build_teacher(cfg.distill.teacher, cfg.model.name, info.num_classes, info.in_chans,
                                         img_size).to(self.device)
        self.ema = build_ema(self.model, cfg.ema.decay, cfg.ema.warmup).to(self.device) if cfg.ema.enabled else None
        o = cfg.optim
        groups = param_groups(self.model, o.weight_decay, o.reducer_lr_scale, o.backbone_lr_scale,
                              o.backbone_freeze_epochs, o.trainable)
        self.optimizer = build_adamw(groups, o.lr, tuple(o.betas), self.device)
        per_epoch = 1 if o.lr_unit == "epoch" else self.steps_per_epoch
        total, warm = o.epochs * per_epoch, o.warmup_epochs * per_epoch
        self.lr_schedule = lambda t: lr_factor(t, warm, total, o.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, [
            (lambda t, g=g: group_lr_factor(g, self.lr_schedule(t), t / per_epoch)) for g in self.optimizer.param_groups])
        seed_everything(cfg.seed + self.rank)  # then different augmentation, dropout and mixing per process
        self.net = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # a learned reducer is idle while its site drops nothing (curriculum at d = 0): DDP must allow it
            idle = any(g["role"] == "reducer" for g in self.optimizer.param_groups)
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=idle)
        if cfg.run.compile and self.device.type == "cuda":
            self.net = torch.compile(self.net)

        if self.mixup_on:
            from timm.data import Mixup
            from timm.loss import SoftTargetCrossEntropy

            a = cfg.augment
            self.mixup = Mixup(mixup_alpha=a.mixup_alpha, cutmix_alpha=a.cutmix_alpha, prob=a.mix_prob,
                               switch_prob=a.mix_switch_prob, label_smoothing=o.label_smoothing,
                               num_classes=info.num_classes)
            self.loss_fn = SoftTargetCrossEntropy()
        else:
            self.mixup = None
            self.loss_fn = nn.CrossEntropyLoss(label_smoothing=o.label_smoothing)
        d = cfg.distill
        self.train_step = TrainStep(self.model, self.net, self.optimizer, self.loss_fn, self.device, amp=cfg.run.amp,
                                    clip_grad=o.clip_grad, ema=self.ema, teacher=self.teacher, distill_weight=d.weight,
                                    distill_temperature=d.temperature, cuda_graphs=cfg.run.cuda_graphs,
                                    notice=self._notice)

        self.start_epoch, self.best_acc = 0, -1.0
        if self.resume:
            self._load_resume()
        elif (self.out_dir / "last.pt").exists():
            raise CheckpointError(f"{self.out_dir} already holds a run (last.pt); use --resume or another --out")

    def _notice(self, message: str) -> None:
        """Print a one-line notice on rank 0."""
        if self.is_main:
            print(message, file=sys.stderr)

    def schedule_lr(self) -> float:
        """The LR schedule's value now: ``optim.lr`` × warmup+cosine (parameter groups scale it by their
        ``lr_scale``, and a frozen backbone gets 0)."""
        return self.cfg.optim.lr * self.lr_schedule(self.scheduler.last_epoch)

    def _load_pretrained(self) -> None:
        """Start from ``model.pretrained`` (reduction sites' own parameters start fresh)."""
        report = load_pretrained_weights(self.model, self.cfg.model.pretrained)
        if self.is_main:
            notes = report.adapted + ([f"new head ({len(report.skipped)} tensors)"] if report.skipped else [])
            print(f"model: {report.loaded} weight tensors from {report.source}"
                  + (f" ({'; '.join(notes)})" if notes else ""), file=sys.stderr)

    def _load_resume(self) -> None:
        path = self.out_dir / "last.pt"
        ckpt = load_checkpoint(path)
        diff = config_differences(ckpt["config"], self.cfg.to_dict(), RESUME_FREE_KEYS + ("optim.epochs",))
        if diff:  # where and how fast, and how long, may change; not what the run computes
            raise CheckpointError(f"{path} was written by a different config (differs in: {', '.join(diff)}); resume it "
                                  f"with its own config (--config {self.out_dir / 'config.yaml'}) or train into another --out")
        done, epochs = ckpt["epoch"] + 1, self.cfg.optim.epochs
        if epochs < done:
            raise ConfigError(f"optim.epochs: {epochs} is fewer than the {done} epochs {path} already holds "
                              f"(allowed: {done} or more)")
        try:
            self.model.load_state_dict(ckpt["model"])
            if self.ema is not None:
                self.ema.load_state_dict(ckpt["ema"])
            load_optimizer_state(self.optimizer, ckpt["optimizer"], self.device)
            self.scheduler.load_state_dict(ckpt["scheduler"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{path} does not fit this model ({str(e).splitlines()[0]})") from None
        set_rng_state(ckpt["rng"][min(self.rank, len(ckpt["rng"]) - 1)])
        self.start_epoch = done
        self.best_acc = ckpt["best_acc"]
        old_epochs = ckpt["config"]["optim"]["epochs"]
        if epochs != old_epochs and not self.complete:
            self._rescale_lr(old_epochs)

    def _rescale_lr(self, old_epochs: int) -> None:
        """Continue on the warmup+cosine schedule recomputed over the new ``optim.epochs``: the LR jumps."""
        before = self.schedule_lr()
        t = self.scheduler.last_epoch
        for group, base, fn in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base * fn(t)
        if self.is_main:
            print(f"notice: optim.epochs {old_epochs} → {self.cfg.optim.epochs}: the warmup+cosine LR schedule is "
                  f"recomputed over {self.cfg.optim.epochs} epochs, so the LR jumps from {before:.2e} to "
                  f"{self.schedule_lr():.2e} at epoch {self.start_epoch + 1}", file=sys.stderr)

    # -- one epoch ------------------------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> dict:
        cfg, device = self.cfg, self.device
        self.net.train()
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        gen = getattr(self.train_loader, "generator", None)
        if gen is not None:  # data order depends only on (seed, epoch): resumable
            gen.manual_seed((cfg.seed + self.rank) * 1_000_003 + epoch)
        lr_sum, check_every = 0.0, cfg.run.nan_check_every
        self.train_step.reset()
        start = time.perf_counter()
        bar = tqdm(self.train_loader, desc=f"{self.label}epoch {epoch + 1}/{cfg.optim.epochs}", leave=False, dynamic_ncols=True,
                   disable=not (self.progress and self.is_main), file=sys.stderr)
        for step, (images, targets) in enumerate(bar):
            if cfg.token_drop.per_step:
                red.set_epoch(self.model, epoch + step / self.steps_per_epoch)
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            labels = targets  # accuracy against the unmixed labels, as the reference
            if self.mixup is not None:
                images, targets = self.mixup(images, targets)
            lr_sum += self.schedule_lr()
            self.train_step(images, targets, labels)
            if cfg.optim.lr_unit == "step":
                self.scheduler.step()
            if (step + 1) % check_every == 0:
                totals = self._check_finite(epoch)
                bar.set_postfix(loss=f"{totals.loss_sum / totals.seen:.3f}", acc=f"{100 * totals.correct / totals.seen:.1f}",
                                drop=f"{self._drop_ratio():.3f}", refresh=False)
        totals = self._check_finite(epoch)  # synchronises the device: the epoch's work is done
        elapsed = time.perf_counter() - start
        loss_sum, correct, seen_all = all_reduce_sum([totals.loss_sum, totals.correct, float(totals.seen)], device)
        return {"train_loss": loss_sum / seen_all, "train_acc": 100 * correct / seen_all,
                "lr": lr_sum / self.steps_per_epoch,  # the mean over the epoch's steps (per-step schedules)
                "epoch_time_sec": elapsed, "train_imgs_per_sec": seen_all / elapsed}

    def _check_finite(self, epoch: int) -> StepTotals:
        """Read the step's sums; stop the run if a step since the epoch began had a non-finite loss or gradient."""
        totals = self.train_step.poll()
        if totals.first_bad >= 0:
            raise NonFiniteLossError(f"non-finite loss or gradient at epoch {epoch + 1}, step {totals.first_bad + 1} "
                                     f"(seen at step {self.train_step.steps}); {self.out_dir / 'last.pt'} keeps the last good epoch")
        return totals

    def _drop_ratio(self) -> float:
        """The config's schedule at its first site (train-only sites keep every token)."""
        sites = [s for s in red.sites(self.model) if s.block not in self.cfg.token_drop.train_only_blocks]
        return sites[0].drop_ratio if sites else 0.0

    def _kept_tokens(self) -> int:
        kept = red.expected_patch_tokens(self.model, training=True)
        return kept[-1] if kept else self.model.patch_embed.num_patches

    # -- the run --------------------------------------------------------------------------------------
    def _checkpoint(self, epoch: int) -> dict:
        rngs = [rng_state()]
        if is_distributed():
            rngs = [None] * self.world
            torch.distributed.all_gather_object(rngs, rng_state())
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": None, "rng": rngs, "epoch": epoch, "best_acc": self.best_acc,
                "config": self.cfg.to_dict(), "dataset": {"num_classes": self.info.num_classes, "in_chans": self.info.in_chans}}

    def run(self) -> Path:
        """Train (or resume) to the configured number of epochs. Returns the run directory."""
        try:
            self.setup()
            if self.complete:
                if self.is_main:
                    print(f"[tokendrop] {self.out_dir}: run already complete ({self.start_epoch} epochs); to extend it: "
                          f"--resume --set optim.epochs=M (M > {self.start_epoch})", file=sys.stderr)
                return self.out_dir
            for epoch in self.epochs():
                self.run_epoch(epoch)
            self.finish()
        finally:
            cleanup()
        return self.out_dir

    def _prepare_dir(self) -> None:
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self._truncate_metrics(self.out_dir / "metrics.csv")
        print(f"[tokendrop] {cfg.name}: {cfg.model.name} on {self.info.name} "
              f"({len(self.train_loader.dataset)} train / {len(self.val_loader.dataset)} val per process), "
              f"device {self.device}, {self.world} process(es), epochs {self.start_epoch + 1}..{cfg.optim.epochs}",
              file=sys.stderr)

    def run_epoch(self, epoch: int) -> dict:
        """Train, validate and checkpoint one epoch (0-based, the next of :meth:`epochs`); returns its metrics row."""
        cfg = self.cfg
        set_rng_state(self._rng)
        red.set_epoch(self.model, epoch)
        row = {"epoch": epoch + 1, "drop_ratio": self._drop_ratio(), "kept_tokens": self._kept_tokens()}
        row.update(self._train_epoch(epoch))
        if cfg.optim.lr_unit == "epoch":
            self.scheduler.step()
        broadcast_buffers(self.model)  # every process validates (and rank 0 saves) the same model
        if self.ema is not None:
            broadcast_buffers(self.ema)
        meter = TPCMeter(self.model) if cfg.tpc.enabled else None
        raw = evaluate(self.net, self.val_loader, self.device, cfg.run.amp, meter.update if meter else None)
        row.update(val_loss_raw=raw.loss, val_acc_raw=raw.acc)
        if meter is not None:  # the raw weights' validation pass, in eval mode
            row.update(meter.row(self.device))
        score = raw.acc
        if self.ema is not None:
            ema = evaluate(self.ema.module, self.val_loader, self.device, cfg.run.amp)
            row.update(val_loss_ema=ema.loss, val_acc_ema=ema.acc)
            score = ema.acc
        improved = score > self.best_acc
        self.best_acc = max(self.best_acc, score)
        ckpt = self._checkpoint(epoch)
        if self.is_main:
            if improved:
                save_atomic(ckpt, self.out_dir / "best.pt")
            self._append_metrics(self.out_dir / "metrics.csv", row)
            save_atomic(ckpt, self.out_dir / "last.pt")  # last: a resumed run restarts after this epoch
            ema_txt = f" ema {row['val_acc_ema']:.2f}%" if self.ema is not None else ""
            tokens_txt = (f"halting depth {row['tpc_depth']:.2f}" if meter is not None else
                          f"drop {row['drop_ratio']:.3f} ({row['kept_tokens']} tokens)")
            print(f"{self.label}epoch {epoch + 1:>3}/{cfg.optim.epochs}  loss {row['train_loss']:.4f}  "
                  f"train {row['train_acc']:.2f}%  val {raw.acc:.2f}%{ema_txt}  lr {row['lr']:.2e}  "
                  f"{tokens_txt}  {row['epoch_time_sec']:.1f}s  "
                  f"{row['train_imgs_per_sec']:.0f} img/s", file=sys.stderr)
        self._rng = rng_state()
        return row

    def finish(self) -> None:
        """Draw the run's plots (rank 0)."""
        if self.is_main:
            from .plots import plot_run

            plot_run(self.out_dir)

    def _truncate_metrics(self, path: Path) -> None:
        """Keep the header and the rows of epochs already completed (a resumed run appends after them)."""
        rows = []
        if self.resume and path.exists():
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= self.start_epoch]
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(rows)

    def _append_metrics(self, path: Path, row: dict) -> None:
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in self.columns})


def train(cfg: Config, out_dir: Path, resume: bool = False, progress: bool = True) -> Path:
    """Train ``cfg`` into ``out_dir`` (resuming from its ``last.pt`` when asked). Returns ``out_dir``."""
    return Trainer(cfg, out_dir, resume, progress).run()


def build_eval_model(cfg: Config, info: DatasetInfo, state: dict | None = None, source: str = "checkpoint") -> nn.Module:
    """The model of a run as it was trained (backbone, sites, TPC) for data set ``info``, with the weights
    ``state`` (a checkpoint's, read from ``source``) or, without them, ``model.pretrained`` (loaded before
    TPC is attached, as in training; random weights when it is empty)."""
    model = build_run_model(cfg, info.num_classes, info.in_chans, cfg.data.img_size or info.img_size)
    if state is None and cfg.model.pretrained:
        load_pretrained_weights(model, cfg.model.pretrained)
    attach_run_tpc(model, cfg)
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"{source} does not fit {cfg.model.name} ({str(e).splitlines()[0]})") from None
    return model


def evaluate_checkpoint(path: Path, device: str = "auto", overrides: dict | None = None) -> dict[str, float]:
    """Validation loss/accuracy of a checkpoint's raw (and EMA) weights on its config's validation set."""
    ckpt = load_checkpoint(path)
    cfg = config_from_dict(merge_dicts(ckpt["config"], overrides or {}))
    dev = pick_device(device, key="--device")
    _, val_ds, info = build_datasets(cfg.data, cfg.augment, cfg.seed, cfg.model.name)
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=cfg.optim.eval_batch_size, num_workers=cfg.data.workers)
    model = build_eval_model(cfg, info, ckpt["model"], f"checkpoint {path}")
    print(f"data: {info.name} from {info.source}", file=sys.stderr)
    model.to(dev)
    out = {"epoch": ckpt["epoch"] + 1}
    raw = evaluate(model, val_loader, dev, cfg.run.amp)
    out.update(val_loss_raw=raw.loss, val_acc_raw=raw.acc, images=raw.count)
    if ckpt.get("ema") is not None:
        ema = build_ema(model, cfg.ema.decay, cfg.ema.warmup)
        ema.load_state_dict(ckpt["ema"])
        res = evaluate(ema.module.to(dev), val_loader, dev, cfg.run.amp)
        out.update(val_loss_ema=res.loss, val_acc_ema=res.acc)
    return out
