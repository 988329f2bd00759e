"""TPC-ViT under ``tokendrop bench --tpc SOURCE`` (research/tpc-vit-spec.md §5, "how to benchmark fairly").

* **MACs**: analytic, per image, from the per-layer token counts of real validation images
  (:func:`tokendrop.tpc.tpc_macs`: the backbone on the tokens each block processed, plus the stabiliser's
  distance ranking and the gates), against the dense model (TPC detached) and ``masked`` TPC, which
  computes every token.
* **Speed**: inference of the dense model, ``masked`` and ``packed`` TPC on the same batch of validation
  images, timed in interleaved rounds (:func:`~tokendrop.bench.timing.interleaved_rounds`, dense the
  baseline); speed-ups are medians of paired ratios. ``packed`` pads each block to the batch's longest
  image, so beside the ideal speed-up of the per-image counts stands the ideal of the padded counts.

SOURCE is a checkpoint of a TPC run (its config and raw weights), a checkpoint of a plain run (its
weights, TPC attached with the config's ``tpc`` keys) or a config (weights from its ``model.pretrained``).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..reduction import detach
from ..tpc import controller, last_stats, tpc_macs
from .flops import analytic_macs
from .probe import InferStep, input_shape
from .timing import Timing, interleaved_rounds

__all__ = ["TPCModels", "TPCSpeed", "layer_counts", "measure_tpc_speed", "tpc_gmacs", "tpc_report", "tpc_source",
           "tpc_variants", "validation_images"]

MODES = ("dense", "masked", "packed")


def tpc_source(source: str, overrides: Sequence[str] = ()) -> tuple[Any, dict | None]:
    """The run config of ``source`` with ``overrides`` (``KEY=VALUE``) and TPC enabled, and the weights to
    load after TPC is attached (a TPC run's checkpoint), or None (the config's ``model.pretrained`` is
    loaded before: a plain run's checkpoint is put there)."""
    from ..models.pretrained import is_checkpoint_path
    from ..train.checkpoint import load_checkpoint
    from ..train.config import config_from_dict, load_config, merge_dicts, parse_overrides

    extra = [*overrides, "tpc.enabled=true"]
    if not is_checkpoint_path(source):
        return load_config(source, extra), None
    ckpt = load_checkpoint(Path(source))
    data = copy.deepcopy(ckpt["config"])
    trained = bool(data.get("tpc", {}).get("enabled"))
    if not trained:
        data["model"]["pretrained"] = source
    return config_from_dict(merge_dicts(data, parse_overrides(extra))), ckpt["model"] if trained else None


def validation_images(cfg: Any, count: int) -> tuple[torch.Tensor, Any]:
    """The first ``count`` images of the config's validation set (fewer if it has fewer; nothing is
    downloaded) and the data set's :class:`~tokendrop.train.data.DatasetInfo`."""
    from ..train.data import build_datasets

    _, val, info = build_datasets(dataclasses.replace(cfg.data, download=False), cfg.augment, cfg.seed, cfg.model.name)
    return torch.stack([val[i][0] for i in range(min(count, len(val)))]), info


@dataclass
class TPCModels:
    """One trained TPC model three ways: ``dense`` (TPC detached), ``masked`` and ``packed``."""

    dense: nn.Module
    masked: nn.Module
    packed: nn.Module


def tpc_variants(model: nn.Module) -> TPCModels:
    """Copies of a TPC ``model`` in eval mode: without TPC, and with TPC in either mode (same weights)."""
    variants = {}
    for mode in ("masked", "packed"):
        m = copy.deepcopy(model).eval()
        ctrl = controller(m)
        ctrl.params = dataclasses.replace(ctrl.params, mode=mode)
        variants[mode] = m
    return TPCModels(detach(copy.deepcopy(model)).eval(), **variants)


@torch.no_grad()
def layer_counts(model: nn.Module, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode halting of TPC ``model`` on ``images`` (in batches): (L, n) tokens each block processed per
    image (CLS included) and (n, N) the 1-based halting depth of every token."""
    model.eval()
    device = next(model.parameters()).device
    counts, depth = [], []
    for chunk in images.split(batch_size):
        model(chunk.to(device))
        stats = last_stats(model)
        counts.append(stats.counts.cpu())
        depth.append(stats.depth.cpu())
    return torch.cat(counts, dim=1), torch.cat(depth)


def tpc_gmacs(model: nn.Module, counts: torch.Tensor) -> dict[str, float]:
    """Mean per-image GMACs (10⁹ MACs, forward; the papers' "GFLOPs") of TPC ``model`` for per-layer counts
    (L, n): ``packed`` (= ``backbone`` + ``stabiliser`` + ``gates``), ``masked`` (every token, plus the same
    overheads) and ``dense`` (the model without TPC), with the ideal speed-ups ``dense / packed`` and
    ``dense / masked``."""
    _, h, w = input_shape(model)
    parts = {k: float(v.mean()) / 1e9 for k, v in tpc_macs(model, (h, w), counts).items()}
    tokens = int(model.patch_embed.num_patches) + int(getattr(model, "num_prefix_tokens", 1))
    masked = float(tpc_macs(model, (h, w), torch.full((counts.shape[0], 1), tokens))["total"][0]) / 1e9
    dense = analytic_macs(model, (h, w)) / 1e9
    return {"dense": dense, "masked": masked, "packed": parts["total"], "backbone": parts["backbone"],
            "stabiliser": parts["stabiliser"], "gates": parts["gates"], "ideal_speedup_packed": dense / parts["total"],
            "ideal_speedup_masked": dense / masked}


@dataclass
class TPCSpeed:
    """Inference timing of one batch size: each mode against dense (paired), packed against masked."""

    batch_size: int
    dense: Timing
    masked: Timing
    packed: Timing
    packed_over_masked: float  # median over rounds of masked time / packed time
    mean_tokens: list[float]  # per block, this batch (CLS included)
    padded_tokens: list[int]  # per block: the batch's longest image, what packed computes for every image
    ideal_speedup: float  # dense MACs / mean packed MACs of this batch's images
    padded_ideal_speedup: float  # dense MACs / packed MACs at the padded counts


def _batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """The first ``size`` images, repeated in order when there are fewer."""
    reps = -(-size // images.shape[0])
    return images.repeat(reps, *([1] * (images.dim() - 1)))[:size]


def measure_tpc_speed(models: TPCModels, images: torch.Tensor, batch_sizes: Sequence[int], device: torch.device,
                      rounds: int = 5, warmup: int = 2, seed: int = 0,
                      on_round: Callable[[], None] | None = None) -> list[TPCSpeed]:
    """Time inference of the three models (on ``device``) on the first images, per batch size, in
    interleaved rounds."""
    out = []
    for bs in batch_sizes:
        batch = _batch(images, bs).to(device)
        counts, _ = layer_counts(models.packed, batch, bs)
        padded = counts.max(dim=1).values
        gm = tpc_gmacs(models.packed, counts)
        padded_gm = tpc_gmacs(models.packed, padded.unsqueeze(1))
        calls = {mode: InferStep(getattr(models, mode), batch) for mode in MODES}
        t = interleaved_rounds(calls, "dense", rounds, warmup, device, seed, on_round)
        out.append(TPCSpeed(bs, *(Timing.from_paired(t, mode, bs) for mode in MODES), t.speedup_over("packed", "masked"),
                            counts.double().mean(dim=1).tolist(), padded.tolist(), gm["ideal_speedup_packed"],
                            padded_gm["ideal_speedup_packed"]))
    return out


def tpc_report(model: nn.Module, images: torch.Tensor, batch_sizes: Sequence[int], device: torch.device,
               rounds: int = 5, warmup: int = 2, seed: int = 0, count_batch: int = 64,
               on_round: Callable[[], None] | None = None) -> dict[str, Any]:
    """MACs from the halting of ``images`` (counted in batches of ``count_batch``), packed = masked check,
    and the speed of every batch size, as a JSON-ready dict."""
    models = tpc_variants(model)
    for m in (models.dense, models.masked, models.packed):
        m.to(device)
    counts, depth = layer_counts(models.packed, images, count_batch)
    with torch.inference_mode():
        probe = images[:count_batch].to(device)
        diff = (models.masked(probe) - models.packed(probe)).abs().max().item()
    tokens = int(model.patch_embed.num_patches) + int(getattr(model, "num_prefix_tokens", 1))
    params = controller(models.packed).params
    speed = measure_tpc_speed(models, images, batch_sizes, device, rounds, warmup, seed, on_round)
    return {"images": int(images.shape[0]), "tokens": tokens, "blocks": len(model.blocks),
            "params": {k: v for k, v in dataclasses.asdict(params).items() if k != "mode"},
            "mean_tokens": counts.double().mean(dim=1).tolist(), "mean_depth": float(depth.double().mean()),
            "depth_histogram": torch.bincount(depth.flatten() - 1, minlength=len(model.blocks)).tolist(),
            "gmacs": tpc_gmacs(models.packed, counts), "packed_vs_masked_max_abs_logit_diff": diff,
            "speed": [dataclasses.asdict(s) for s in speed]}
