"""The short fine-tune per point of ``tokendrop sweep --finetune-epochs N``.

Every point (and the unreduced model, for a fair baseline) is trained for N epochs by the ordinary
:class:`~tokendrop.train.trainer.Trainer`, starting from the weights under study, with the point's method
attached as a training config says it (``token_drop``: constant keep rate, ``when: always``, the sweep's
``relative_to``). The config is the source's own (a checkpoint's recipe: optimizer, augmentation, data)
with :data:`DEFAULTS` for a short run on top, then ``--finetune-set`` overrides. Runs live in
``OUT/finetune/<point>/``; the start weights in ``OUT/finetune/start.pt``. A point whose run is complete is
reused, an interrupted one resumed; a folder written with other settings or other start weights is an
error (``--fresh`` deletes ``OUT/finetune`` first).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..train.checkpoint import load_checkpoint, save_atomic
from ..train.config import Config, ConfigError, config_from_dict, config_reference, merge_dicts, parse_overrides
from ..train.trainer import RESUME_FREE_KEYS, Trainer, config_differences
from .common import MethodSpec, UsageError

FOLDER = "finetune"
START = "start.pt"

DEFAULTS: dict[str, Any] = {"optim": {"warmup_epochs": 0.0, "lr_unit": "step", "backbone_freeze_epochs": 0.0},
                            "ema": {"enabled": False}, "distill": {"teacher": ""}}
"""Over the source's config: no warm-up, a per-step cosine over the short run, no frozen backbone, no
EMA (the sweep evaluates the raw weights), no teacher."""

RESERVED = {"token_drop": "each point's method, keep rate and sites come from --methods, --keep-rates, --sites "
                          "and --relative-to",
            "model.name": "the model is the one under study",
            "model.pretrained": "every fine-tune starts from the weights under study",
            "optim.epochs": "use --finetune-epochs",
            "optim.trainable": "the baseline and parameter-free methods must train as much as the learned ones"}
"""Keys ``--finetune-set`` may not set, with the reason."""


def check_overrides(items: Sequence[str]) -> dict:
    """``--finetune-set KEY=VALUE`` items as a nested dict; a malformed item, an unknown key, a bad value or
    a key of :data:`RESERVED` is a one-line :class:`UsageError`."""
    for item in items:
        if "=" not in item or not item.partition("=")[0].strip():
            raise UsageError(f"--finetune-set: {item!r}: expected KEY=VALUE with a config key, e.g. optim.lr=1e-4")
    extra = parse_overrides(list(items))
    for key, why in RESERVED.items():
        node: Any = extra
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            raise UsageError(f"--finetune-set: {key} cannot be set here: {why}")
    sections = {f.name for f in dataclasses.fields(Config)}
    for key in extra:
        dotted = [k for k, _, _ in config_reference() if k.endswith(f".{key}")]
        if key not in sections and dotted:
            raise UsageError(f"--finetune-set: {key}: unknown key; config keys are dotted: {' or '.join(dotted)}")
    try:
        config_from_dict(copy.deepcopy(extra))
    except ConfigError as e:
        raise UsageError(f"--finetune-set: {e}") from None
    return extra


def point_name(spec: MethodSpec | None, keep_rate: float = 1.0, blocks: Sequence[int] = ()) -> str:
    """The folder of a point: ``none`` for the unreduced model, else e.g. ``topk-score-l2_r0.7_b1-2-3``."""
    if spec is None:
        return "none"
    label = re.sub(r"[^A-Za-z0-9.]+", "-", spec.label).strip("-")
    return f"{label}_r{keep_rate:g}_b{'-'.join(map(str, blocks))}"


@dataclass
class Plan:
    """What the fine-tunes of one sweep share: the config below each point's ``token_drop`` and the folder."""

    base: dict
    root: Path  # OUT/finetune

    def config(self, spec: MethodSpec | None, keep_rate: float = 1.0, blocks: Sequence[int] = (),
               relative_to: str = "original") -> Config:
        """The training config of a point (``spec`` None: the unreduced model)."""
        data = {**copy.deepcopy(self.base), "name": point_name(spec, keep_rate, blocks)}
        data["token_drop"] = {"enabled": False} if spec is None else {
            "enabled": True, "reducer": spec.name, "reducer_args": dict(spec.kwargs), "schedule": "constant",
            "keep_rate": keep_rate, "blocks": list(blocks), "when": "always", "relative_to": relative_to}
        try:
            return config_from_dict(data)
        except ConfigError as e:
            raise UsageError(f"--finetune-set: {e}") from None

    def run_dir(self, spec: MethodSpec | None, keep_rate: float = 1.0, blocks: Sequence[int] = ()) -> Path:
        return self.root / point_name(spec, keep_rate, blocks)


def make_plan(source_config: Config, overrides: dict, epochs: int, device: str, out: Path) -> Plan:
    """The :class:`Plan` of a sweep into ``out`` from the source's config and the checked overrides."""
    root = Path(out) / FOLDER
    base = merge_dicts(merge_dicts(source_config.to_dict(), copy.deepcopy(DEFAULTS)), copy.deepcopy(overrides))
    merge_dicts(base, {"model": {"pretrained": str((root / START).resolve())}, "optim": {"epochs": epochs},
                       "run": {"device": device}})
    return Plan(base, root)


def _cpu_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def check_folder(plan: Plan, configs: dict[Path, Config], model: nn.Module, source_label: str) -> None:
    """Before anything is written: ``plan.root`` must hold fine-tunes of ``model``'s weights and, in every
    run folder of ``configs`` that has one, a run of the same config (else a :class:`UsageError`)."""
    hint = "add --fresh to delete them and start over, or choose another --out"
    start = plan.root / START
    if start.exists():
        old = torch.load(start, map_location="cpu", weights_only=True)["model"]
        new = _cpu_weights(model)
        if old.keys() != new.keys() or not all(torch.equal(old[k], new[k]) for k in new):
            raise UsageError(f"--out: {plan.root} holds fine-tunes that started from other weights than "
                             f"{source_label}; {hint}")
    for run_dir, cfg in configs.items():
        if (run_dir / "last.pt").exists():
            old_cfg = load_checkpoint(run_dir / "last.pt")["config"]
            diff = config_differences(old_cfg, cfg.to_dict(), RESUME_FREE_KEYS)
            if diff:
                raise UsageError(f"--out: {run_dir} holds a fine-tune with other settings (differs in: "
                                 f"{', '.join(diff)}); {hint}")


def prepare_folder(plan: Plan, model: nn.Module, fresh: bool) -> None:
    """Delete ``plan.root`` when ``fresh``; write the start weights there unless they are there already."""
    if fresh and plan.root.exists():
        shutil.rmtree(plan.root)
    if not (plan.root / START).exists():
        save_atomic({"model": _cpu_weights(model)}, plan.root / START)


def finetune(cfg: Config, run_dir: Path, progress: bool, label: str) -> tuple[nn.Module, bool]:
    """Train ``cfg`` into ``run_dir`` (resuming an interrupted run, reusing a complete one; no plots:
    ``tokendrop plot RUN_DIR`` draws them). Returns the model with its last epoch's weights and whether any
    epoch was trained now."""
    trainer = Trainer(cfg, run_dir, resume=(run_dir / "last.pt").exists(), progress=progress, label=label)
    trainer.setup()
    trained = not trainer.complete
    for epoch in trainer.epochs():
        trainer.run_epoch(epoch)
    return trainer.model, trained
