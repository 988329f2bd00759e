"""DynamicViT (Rao et al., NeurIPS 2021): a learned predictor per stage decides which patch tokens to keep.

One :class:`DynamicViT` site per stage, ``before`` its block (the score is predicted on the block's input;
"Which Tokens to Use?" runs stages before blocks 3, 6 and 9 with keep rates r, r², r³ of the original
patches: ``td.Constant(r)`` with ``relative_to="original"``). Its ``PredictorLG`` maps the patch tokens
z (B, N, C) and the previous decision D_prev (B, N) to log-probabilities (channel 0 = keep)::

    h = GELU(Linear_C→C(LayerNorm(z)))
    u = [h[..., :C/2], Σ_n h[..., C/2:]·D_prev / Σ_n D_prev + eps]          (local, global features)
    log p = LogSoftmax(Linear_C/4→2(GELU(Linear_C/2→C/4(GELU(Linear_C→C/2(u))))))

* **Training**: every token stays. ``D = gumbel_softmax(log p, τ=1, hard=True)[..., 0] · D_prev``
  (straight-through) becomes the token state's soft ``policy`` ``[1 (prefix); D]``: from then on each
  attention weights key j by policy_j (a token always attends to itself; float32,
  ``(e·P + ε/T) / (Σ e·P + ε)``). Every block from block 0 uses this softmax-with-policy (an all-ones
  policy before the first stage), as the reference. D_prev is the policy the site finds (the decisions
  of the earlier stages multiplied together), so it lives in the token state, per forward.
* **Evaluation**: keep the ``keep`` patch tokens with the highest keep log-probability, in descending
  order (then the block runs with a plain softmax).

The ratio loss ``ratio_weight · (1/S) Σ_s mean_b (Σ_n D_s[b, n] / P − r_s)²`` (P the original patch count,
so the mean runs over all original positions; r_s the site's target fraction of the original patches,
``TokenState.keep_fraction``: r^s for ``Constant(r)``) is left in ``aux_loss``: each of the S DynamicViT
sites active in the forward contributes ``ratio_weight / S`` times its own term, so
:func:`tokendrop.aux_loss` returns the reference's value. A site whose schedule keeps every token does
not run and adds nothing.

New modules follow the reference init: Linear trunc-normal(std 0.02) weight and zero bias, LayerNorm eps
1e-5. Module names (``in_conv``, ``out_conv``) follow the official predictor's layout.

The official training adds distillation from a full-token teacher (the paper run of "Which Tokens to
Use?" has none): :func:`dynamicvit_distill_loss` (KL on the logits) and
:func:`dynamicvit_token_distill_loss` (student vs teacher final patch tokens at the kept positions, with
:func:`dynamicvit_decision`); the official DeiT recipe weights both by 0.5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from ..reduction.api import last_reduction
from ..reduction.base import Reducer, SiteInputs
from ..reduction.registry import register_reducer
from ..reduction.state import TokenState
from ..train.distill import distill_kl

NAME = "dynamicvit"
TOKEN_DISTILL = ("mse", "kl")


def init_new_module(module: nn.Module) -> None:
    """The reference's init of added modules: Linear trunc-normal(0.02) and zero bias; LayerNorm 1 and 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class PredictorLG(nn.Module):
    """DynamicViT's local-global keep predictor: (B, N, C) tokens and (B, N) previous decision →
    (B, N, 2) log-probabilities, channel 0 = keep."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.in_conv = nn.Sequential(nn.LayerNorm(dim, eps=1e-5), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                      nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1))
        init_new_module(self)

    def forward(self, z: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        h = self.in_conv(z)
        half = h.shape[-1] // 2
        w = prev.to(h.dtype).unsqueeze(-1)
        pooled = (h[..., half:] * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True) + self.eps
        u = torch.cat([h[..., :half], pooled.expand(-1, h.shape[1], -1)], dim=-1)
        return self.out_conv(u)


@register_reducer(NAME)
class DynamicViT(Reducer):
    """DynamicViT stage (see the module docstring). ``dim``: token width C (build per site with a factory,
    ``lambda f: td.reducer("dynamicvit", dim=f.dim)``). ``ratio_weight``: weight of the ratio loss (2.0).
    ``pool_eps``: added to the global feature after the division (1e-6, "Which Tokens to Use?"; the
    official code has 0)."""

    default_position = "before"
    reads_keep_fraction = True  # the ratio loss's target

    def __init__(self, dim: int, ratio_weight: float = 2.0, pool_eps: float = 1e-6) -> None:
        super().__init__()
        if not (isinstance(dim, int) and not isinstance(dim, bool) and dim >= 4):
            raise ValueError(f"dim: {dim!r} must be an int >= 4 (the token width)")
        if not (isinstance(ratio_weight, (int, float)) and ratio_weight >= 0):
            raise ValueError(f"ratio_weight: {ratio_weight!r} is outside the allowed range [0, inf)")
        if not (isinstance(pool_eps, (int, float)) and pool_eps >= 0):
            raise ValueError(f"pool_eps: {pool_eps!r} is outside the allowed range [0, inf)")
        self.ratio_weight = float(ratio_weight)
        self.predictor = PredictorLG(dim, float(pool_eps))

    def extra_repr(self) -> str:
        return f"ratio_weight={self.ratio_weight}, pool_eps={self.predictor.eps}"

    def output_count(self, n_in: int, keep: int) -> int:
        return n_in if self.training else keep

    def begin_forward(self, state: TokenState, x: torch.Tensor, training: bool) -> None:
        """In training: an all-ones policy from block 0 on, and count this forward's DynamicViT sites."""
        if training:
            if state.policy is None:
                state.policy = x.new_ones(x.shape[:2])
            state.scratch[NAME] = state.scratch.get(NAME, 0) + 1

    def forward(self, x: torch.Tensor, keep: int, inputs: SiteInputs) -> torch.Tensor:
        state = inputs.state
        p = state.num_prefix
        logp = self.predictor(x[:, p:], _previous_decision(state, x))
        if self.training:
            return self._mask(x, logp, state)
        score = logp[..., 0].detach()
        mask = state.patch_mask()
        if mask is not None:
            score = score.masked_fill(~mask, float("-inf"))
        return state.select(x, torch.argsort(score, dim=1, descending=True)[:, :keep])

    def _mask(self, x: torch.Tensor, logp: torch.Tensor, state: TokenState) -> torch.Tensor:
        """Training: sample the hard decision, make it the policy and leave the ratio loss."""
        if state.policy is None:
            raise RuntimeError("dynamicvit: no policy in training — its begin_forward did not run")
        p = state.num_prefix
        prev = state.policy[:, p:]
        decision = F.gumbel_softmax(logp, tau=1.0, hard=True)[..., 0] * prev
        state.policy = torch.cat([state.policy[:, :p], decision.to(state.policy.dtype)], dim=1)
        kept = decision.float().sum(dim=1) / state.num_patches
        term = ((kept - state.keep_fraction) ** 2).mean()
        self.aux_loss = term * (self.ratio_weight / max(1, state.scratch.get(NAME, 1)))
        return x


def _previous_decision(state: TokenState, x: torch.Tensor) -> torch.Tensor:
    """(B, N) D_prev: the soft policy in training, else presence (all ones without padding)."""
    p = state.num_prefix
    if state.policy is not None:
        return state.policy[:, p:]
    mask = state.patch_mask()
    return mask.to(x.dtype) if mask is not None else x.new_ones(x.shape[0], x.shape[1] - p)


def dynamicvit_decision(model: nn.Module) -> torch.Tensor | None:
    """(B, N) the final keep decision of the last training forward over its patch tokens (1 = kept by
    every stage; in training the tokens are still the original patches in order), or None when no soft
    policy was active (evaluation, or no DynamicViT site)."""
    state = last_reduction(model)
    if state is None or state.policy is None:
        return None
    return state.policy[:, state.num_prefix:]


def dynamicvit_distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                            temperature: float = 1.0) -> torch.Tensor:
    """The official logit distillation: ``KL(softmax(teacher) ‖ softmax(student))``, batch mean, float32
    (``temperature`` 1 in the reference)."""
    return distill_kl(student_logits, teacher_logits, temperature)


def dynamicvit_token_distill_loss(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor,
                                  decision: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """The official token distillation: the student's final patch tokens (B, N, C, after the final norm,
    from a training forward where every token is still present) against the full-token teacher's, at the
    positions the final ``decision`` (B, N) keeps (> 0.5). ``kind="mse"``: mean squared error over the kept
    tokens and channels (the official DeiT recipe); ``"kl"``: KL of the channel softmaxes, averaged over
    the kept tokens (its LV-ViT recipe). 0 when nothing is kept."""
    if kind not in TOKEN_DISTILL:
        raise ValueError(f"kind: {kind!r} is not one of {', '.join(TOKEN_DISTILL)}")
    if student_tokens.shape != teacher_tokens.shape or student_tokens.shape[:2] != decision.shape:
        raise ValueError(f"decision: shapes differ (student {tuple(student_tokens.shape)}, teacher "
                         f"{tuple(teacher_tokens.shape)}, decision {tuple(decision.shape)})")
    kept = decision.detach() > 0.5
    if not kept.any():
        return student_tokens.new_zeros((), dtype=torch.float32)
    s, t = student_tokens[kept].float(), teacher_tokens[kept].float()
    if kind == "mse":
        return (s - t).pow(2).mean()
    return F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), reduction="batchmean", log_target=True)
