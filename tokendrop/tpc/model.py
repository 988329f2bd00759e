"""TPC-ViT on our ViTs and timm's ViT/DeiT: a halting controller over all blocks (research/tpc-vit-spec.md §3).

:func:`attach_tpc` swaps the model's class for a subclass whose ``forward_features`` runs the controller
(weights untouched) and registers the controller as ``model.tpc`` and as a whole-model extension, so
:func:`tokendrop.detach` undoes it and :func:`tokendrop.aux_loss` collects its ponder and distribution
losses. Per layer ``l``: the block runs on the tokens still running (``masked``: all tokens, the others
masked as keys and left unchanged; ``packed``: only those tokens, packed per image), the gates read the
block output ``y``, the break probability ``b`` is regularised, the tracker advances, and the CLS output
accumulates ``p_cls^l · y_cls^l``; the head reads ``norm(Σ_l p_cls^l y_cls^l)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..models.attention import attend
from ..reduction.api import _unwrap, add_extension, extensions, sites
from .halting import Tracker, distribution_loss
from .params import TPCParams
from .stabiliser import neighbour_bias

__all__ = ["TPCController", "TPCStats", "attach_tpc", "controller", "last_stats"]

_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


@dataclass
class TPCStats:
    """What the last forward did (detached): ``active`` (L, B, N) the tokens each layer processed (prefix
    included); ``depth`` (B, N) 1-based halting layer ``M``; ``ponder`` (B, N) ``ρ = M + R``; ``pause``
    (L, B, N) the raw pause probability P1; ``distribution`` (L,) the layer distribution ``D``;
    ``gate_logits`` (L, 2) mean pre-sigmoid ``γ·y_i − β`` of the two gates over the processed tokens (to
    spot a saturated gate); the two unweighted loss terms."""

    active: torch.Tensor
    depth: torch.Tensor
    ponder: torch.Tensor
    pause: torch.Tensor
    distribution: torch.Tensor
    gate_logits: torch.Tensor
    ponder_loss: torch.Tensor
    distribution_loss: torch.Tensor

    @property
    def counts(self) -> torch.Tensor:
        """(L, B) tokens each layer processed per image, prefix included (what MAC counts need)."""
        return self.active.sum(dim=-1)


class TPCController(nn.Module):
    """The halting controller of one model (its only parameters: ``gamma`` and ``beta`` when learned)."""

    aux_loss: torch.Tensor | None = None

    def __init__(self, params: TPCParams, depth: int, num_prefix: int) -> None:
        super().__init__()
        self.params = params
        self.depth = depth
        self.num_prefix = num_prefix
        self.centre = params.centre(depth)
        if params.learn_gates:
            self.gamma = nn.Parameter(torch.tensor(float(params.gamma)))
            self.beta = nn.Parameter(torch.tensor(float(params.beta)))
        else:
            self.gamma, self.beta = float(params.gamma), float(params.beta)
        self.stats: TPCStats | None = None

    def extra_repr(self) -> str:
        changed = {f.name: getattr(self.params, f.name) for f in dataclasses.fields(self.params)
                   if getattr(self.params, f.name) != f.default}
        return ", ".join(f"{k}={v!r}" for k, v in changed.items())

    def undo(self, model: nn.Module) -> None:
        """Restore ``model``'s class and remove the controller (called by :func:`tokendrop.detach`)."""
        model.__class__ = model._tpc_original_class
        del model.tpc

    # ------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, blocks: nn.Module) -> torch.Tensor:
        """Run ``blocks`` on the embedded tokens ``x`` (B, N, C) with halting; returns ``Σ_l p_cls^l y_cls^l``
        (B, C). Leaves the losses in ``aux_loss`` and the bookkeeping in ``stats``."""
        B, N, _ = x.shape
        L = len(blocks)
        tracker = Tracker.start(B, N, self.params.delta, x.device)
        paused = torch.zeros(B, N, dtype=torch.bool, device=x.device)
        out = x.new_zeros(B, x.shape[-1])
        actives, pauses, logits, D = [], [], [], []
        for layer, block in enumerate(blocks):
            active = tracker.alive & ~paused
            y = self._block(block, x, active)
            p1, p2, z = self._gates(y, active)
            b = self._break(p1, p2, active)
            p = tracker.step(torch.ones_like(b) if layer == L - 1 else b, active)
            D.append(self._layer_mass(b, p, p1 * p2, active))
            out = out + p[:, :1].to(y.dtype) * y[:, 0]
            paused = self._pauses(p1, active, tracker.alive, sits_out_last=layer + 2 == L)
            actives.append(active)
            pauses.append(p1.detach())
            logits.append(z)
            x = y
        D = torch.stack(D)
        ponder = tracker.rho.mean()
        distr = distribution_loss(D, self.centre, avit=self.params.distribution == "avit")
        self.aux_loss = self.params.phi_p * ponder + self.params.phi_d * distr
        self.stats = TPCStats(torch.stack(actives), tracker.depth, tracker.rho.detach(), torch.stack(pauses),
                              D.detach(), torch.stack(logits), ponder.detach(), distr.detach())
        return out

    def _block(self, block: nn.Module, x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """The block output for the ``active`` tokens; every other token keeps its state."""
        if self.params.mode == "masked":
            return _masked_block(block, x, active, self._stabiliser)
        return _packed_block(block, x, active, self._stabiliser)

    def _stabiliser(self, present: torch.Tensor | None, tokens: int) -> Callable | None:
        """The κ-nearest-key logit bias for ``tokens`` slots with ``present`` keys (None when it is dense)."""
        kappa = self.params.kappa
        if kappa is None or kappa >= tokens:
            return None
        return lambda q, k: neighbour_bias(q, k, kappa, present, self.params.metric, self.params.shared_neighbours)

    def _gates(self, y: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pause P1 and non-restart P2 probabilities (B, N) and the mean pre-sigmoid values (2,)."""
        i1, i2 = self.params.dims
        z = self.gamma * y[..., [i1, i2]].float() - self.beta  # (B, N, 2)
        probs = z.sigmoid()
        p2 = probs[..., 1] if self.params.restart_gate else torch.ones_like(probs[..., 1])
        w = active.unsqueeze(-1).float()
        mean_z = (z.detach() * w).sum(dim=(0, 1)) / w.sum().clamp_min(1.0)
        return probs[..., 0], p2, mean_z

    def _break(self, p1: torch.Tensor, p2: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Regularised break probability ``ξ·b + (1−ξ)·mean_active(b)`` (Eq. 9), zero where not active."""
        xi = self.params.xi
        w = active.float()
        count = w.sum(dim=1, keepdim=True).clamp_min(1.0)

        def regularise(t: torch.Tensor) -> torch.Tensor:
            return t if xi == 1.0 else xi * t + (1.0 - xi) * (t * w).sum(dim=1, keepdim=True) / count

        b = regularise(p1) * regularise(p2) if self.params.regularise == "gates" else regularise(p1 * p2)
        return b * w

    def _layer_mass(self, b: torch.Tensor, p: torch.Tensor, raw: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """``D^l``: per-image mean of ``b`` over the processed tokens, averaged over the images that processed
        any (``active``); the mean halting weight (``halting``); the mean raw gate over all tokens (``avit``)."""
        kind = self.params.distribution
        if kind == "halting":
            return p.mean()
        if kind == "avit":
            return raw.mean()
        count = active.sum(dim=1).float()
        per_image = b.sum(dim=1) / count.clamp_min(1.0)
        has = (count > 0).float()
        return (per_image * has).sum() / has.sum().clamp_min(1.0)

    def _pauses(self, p1: torch.Tensor, active: torch.Tensor, alive: torch.Tensor, sits_out_last: bool) -> torch.Tensor:
        """Tokens that sit out the next layer (``restart_mode="skip"``): running patch tokens this layer
        processed with P1 ≥ 0.5. None sits out the last layer, which halts every running token."""
        paused = torch.zeros_like(alive)
        if self.params.restart_mode == "skip" and not sits_out_last:
            paused = alive & active & (p1.detach() >= 0.5)
            paused[:, :self.num_prefix] = False
        return paused


def _masked_block(block: nn.Module, x: torch.Tensor, present: torch.Tensor | None,
                  stabiliser: Callable[[torch.Tensor | None, int], Callable | None]) -> torch.Tensor:
    """A pre-norm timm block on ``x`` (B, T, C) whose absent tokens (``present`` False) are zeroed before
    and after each LayerNorm (Algorithm 1 line 9, as A-ViT), ignored as keys, and keep their input state."""
    if present is None:
        bias, keep = None, (lambda t: t)
    else:
        bias = torch.zeros(present.shape, device=x.device).masked_fill(~present, torch.finfo(torch.float32).min)
        a = present.unsqueeze(-1).to(x.dtype)
        keep = lambda t: t * a  # noqa: E731
    h = keep(x)
    attn_out, _ = attend(block.attn, keep(block.norm1(h)), bias, logit_bias=stabiliser(present, x.shape[1]))
    h = h + block.drop_path1(block.ls1(attn_out))
    y = h + block.drop_path2(block.ls2(block.mlp(keep(block.norm2(keep(h))))))
    return y if present is None else torch.where(present.unsqueeze(-1), y, x)


def _packed_block(block: nn.Module, x: torch.Tensor, active: torch.Tensor,
                  stabiliser: Callable[[torch.Tensor | None, int], Callable | None]) -> torch.Tensor:
    """The block on only the ``active`` tokens of each image, packed in token order and padded to the batch's
    longest (padding masked as keys); results are scattered back, every other token keeps its state."""
    B, N, C = x.shape
    n = active.sum(dim=1)
    lo, hi = torch.stack([n.min(), n.max()]).tolist()  # the one host sync per layer: the packed width
    if hi == 0:
        return x
    if lo == N:
        return _masked_block(block, x, None, stabiliser)
    order = torch.sort((~active).to(torch.int8), dim=1, stable=True).indices[:, :hi]  # active first, in order
    valid = torch.arange(hi, device=x.device) < n.unsqueeze(1)
    packed = x.gather(1, order.unsqueeze(-1).expand(-1, -1, C))
    y = _masked_block(block, packed, None if lo == hi else valid, stabiliser)
    slot = order.masked_fill(~valid, N).unsqueeze(-1).expand(-1, -1, C)  # padding goes to a spare row
    return torch.cat([x, x.new_zeros(B, 1, C)], dim=1).scatter(1, slot, y.to(x.dtype))[:, :N]


class TPCModel:
    """Mixin placed before a timm ``VisionTransformer`` class: the same embedding and head, with the blocks
    run by the halting controller ``self.tpc``. ``forward_features`` returns ``norm(Σ p_cls y_cls)`` as one
    token (B, 1, C), which the model's token pooling hands to the head."""

    _tpc_original_class: type

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                         is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("TPC-ViT does not support attention masks from the caller")
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        return self.norm(self.tpc(x, self.blocks)).unsqueeze(1)


_PATCHED: dict[type, type] = {}


def _tpc_class(cls: type) -> type:
    """The TPC subclass of model class ``cls`` (created once per class)."""
    if cls not in _PATCHED:
        _PATCHED[cls] = type(f"TPC{cls.__name__}", (TPCModel, cls), {"_tpc_original_class": cls})
    return _PATCHED[cls]


def _check_model(base: nn.Module) -> None:
    """``TypeError`` for a model TPC cannot run (it needs a timm-style ViT with a class token read by the head)."""
    name = type(base).__name__
    blocks = getattr(base, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or not hasattr(base, "_pos_embed"):
        raise TypeError(f"{name}: expected a ViT with `blocks` (ours or timm's VisionTransformer)")
    if getattr(base, "cls_token", None) is None or getattr(base, "global_pool", None) != "token" \
            or getattr(base, "attn_pool", None) is not None or hasattr(base, "head_dist"):
        raise TypeError(f"{name}: TPC-ViT needs a class token read by a single head (global_pool='token')")
    for i, block in enumerate(blocks):
        missing = [p for p in _BLOCK_PARTS if not hasattr(block, p)]
        if missing or not hasattr(block.attn, "qkv"):
            raise TypeError(f"block {i} ({type(block).__name__}) is not a timm pre-norm ViT Block (missing {missing or ['attn.qkv']})")


def attach_tpc(model: nn.Module, **params: Any) -> nn.Module:
    """Turn ``model`` (our hybrid ViTs, timm ViT/DeiT with a class token) into TPC-ViT in place; weights are
    untouched and :func:`tokendrop.detach` restores the original forward. ``params`` are the fields of
    :class:`~tokendrop.tpc.params.TPCParams` (defaults: the reconstruction's choices). The ponder and
    distribution losses, already weighted by ``phi_p`` and ``phi_d``, come from :func:`tokendrop.aux_loss`;
    the bookkeeping of each forward from :func:`last_stats`. Returns ``model``."""
    allowed = [f.name for f in dataclasses.fields(TPCParams)]
    unknown = [k for k in params if k not in allowed]
    if unknown:
        raise ValueError(f"{unknown[0]}: not a TPC parameter (allowed: {', '.join(allowed)})")
    if "dims" in params:
        params["dims"] = tuple(params["dims"])
    config = TPCParams(**params)
    base = _unwrap(model)
    _check_model(base)
    if sites(base) or extensions(base):
        raise ValueError("model: it already has reduction sites or a controller; tokendrop.detach(model) first")
    if hasattr(base, "tpc"):
        raise ValueError(f"model: {type(base).__name__} already has an attribute `tpc`")
    config.check(len(base.blocks), int(base.blocks[0].attn.qkv.in_features))
    base.tpc = TPCController(config, len(base.blocks), int(getattr(base, "num_prefix_tokens", 1)))
    base.__class__ = _tpc_class(type(base))
    add_extension(base, base.tpc)
    return model


def controller(model: nn.Module) -> TPCController | None:
    """The model's TPC controller, or None."""
    return next((e for e in extensions(model) if isinstance(e, TPCController)), None)


def last_stats(model: nn.Module) -> TPCStats | None:
    """The bookkeeping of the model's last TPC forward (None before one, or without TPC)."""
    ctrl = controller(model)
    return None if ctrl is None else ctrl.stats
