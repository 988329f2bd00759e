"""ToMe's throughput-vs-``r`` table (Bolya et al., ICLR 2023, Table 1's shape): for a ViT, merge ``r``
tokens in every block (:func:`tokendrop.tome`) and report, per ``r``, the tokens that leave the last
block, analytic MACs, the ideal speed-up they allow and the measured inference speed-up against
``r = 0`` (interleaved rounds, median of paired ratios, as every other benchmark here)."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .flops import attached_macs
from .probe import InferStep, input_batch, input_shape
from .timing import Timing, interleaved_rounds


@dataclass
class ToMeRow:
    """One ``r`` of the table (MACs per image, forward)."""

    model: str
    r: int
    batch_size: int
    tokens_out: int  # tokens (prefix included) leaving the last block, after its merge
    macs_analytic: int
    ideal_speedup: float
    timing: Timing

    def to_dict(self) -> dict:
        return asdict(self)


def _last_block_tokens(model: nn.Module, images: torch.Tensor) -> int:
    """Tokens (prefix included) leaving the last block, read from a real forward's records."""
    from .. import last_reduction

    model.eval()
    with torch.inference_mode():
        model(images[:1])
    records = last_reduction(model).records
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    return prefix + records[-1].kept


def measure_tome(name: str, model: nn.Module, rs: Sequence[int], batch_size: int, device: torch.device,
                 rounds: int, warmup: int, seed: int = 0, prop_attn: bool = True,
                 on_round: Callable[[], None] | None = None) -> list[ToMeRow]:
    """The ToMe table of ``model`` (left unchanged: each ``r`` runs on a deep copy) for the merge counts
    ``rs`` at ``batch_size``; ``r = 0`` is always the baseline."""
    from ..methods.tome import tome

    if any(not isinstance(r, int) or r < 0 for r in rs):
        raise ValueError(f"r: {list(rs)!r} must be whole numbers >= 0")
    rs = sorted({0, *rs})
    model = model.to(device).eval()
    images, _ = input_batch(model, batch_size, device, seed)
    img_size = input_shape(model)[1:]
    variants: dict[int, nn.Module] = {}
    for r in rs:
        variants[r] = tome(copy.deepcopy(model), r, prop_attn=prop_attn) if r else model
    calls = {f"r={r}": InferStep(m, images) for r, m in variants.items()}
    paired = interleaved_rounds(calls, "r=0", rounds, warmup, device, seed, on_round)
    base_macs = attached_macs(model, img_size, training=False)
    rows = []
    for r, m in variants.items():
        macs = attached_macs(m, img_size, training=False) if r else base_macs
        tokens = _last_block_tokens(m, images) if r else model.patch_embed.num_patches + int(
            getattr(model, "num_prefix_tokens", 1))
        rows.append(ToMeRow(name, r, batch_size, tokens, macs, base_macs / macs,
                            Timing.from_paired(paired, f"r={r}", batch_size)))
    return rows


def format_table(rows: Sequence[ToMeRow]) -> str:
    """A Markdown table of ``rows``."""
    lines = ["| model | r | batch | tokens out of the last block | GMAC | ideal × | measured × (q25–q75) | img/s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        t = row.timing
        lines.append(f"| {row.model} | {row.r} | {row.batch_size} | {row.tokens_out} | "
                     f"{row.macs_analytic / 1e9:.3f} | {row.ideal_speedup:.3f} | {t.speedup:.3f} "
                     f"({t.speedup_q25:.3f}–{t.speedup_q75:.3f}) | {t.images_per_s:.1f} |")
    return "\n".join(lines)
