"""Starting from pretrained weights: a local checkpoint (ours, timm's or a plain state dict) or the weights
timm publishes for a model name — adapted to the model at hand (new head, other image size or channels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

REDUCER_MARK = ".token_site."


class PretrainedError(RuntimeError):
    """The pretrained weights cannot be had or do not fit; the message says why and what to do."""


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did."""

    source: str
    loaded: int  # tensors copied
    skipped: list[str] = field(default_factory=list)  # re-initialised: the head when the classes differ
    adapted: list[str] = field(default_factory=list)  # resampled position embedding, summed input channels


def is_checkpoint_path(source: str) -> bool:
    """Whether ``source`` names a file (an existing path or a checkpoint suffix) rather than a timm model."""
    return Path(source).expanduser().exists() or source.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights in a checkpoint file: ours (``model``), timm/DeiT-style (``state_dict``, ``model``),
    a plain state dict or a ``.safetensors`` file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PretrainedError(f"model.pretrained: checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise PretrainedError(f"model.pretrained: {path} is not a readable checkpoint ({type(e).__name__})") from None
    for key in ("model", "state_dict", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedError(f"model.pretrained: {path} holds no state dict (looked for model, state_dict)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def timm_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The weights timm publishes for ``name`` (downloads them, or reads timm's cache)."""
    import timm

    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception as e:  # noqa: BLE001 - network, hub or unknown-tag failures all end here
        raise PretrainedError(
            f"model.pretrained: could not get timm's weights for {name!r} ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            "offline, download them where you have internet and set model.pretrained=PATH to the file") from None


def _adapt(model_sd: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], num_prefix: int,
           report: LoadReport) -> dict[str, torch.Tensor]:
    """Fit ``sd`` to ``model_sd``: resample the position embedding, adapt the input channels, drop a head
    of another class count."""
    from timm.layers import resample_abs_pos_embed
    from timm.models._manipulate import adapt_input_conv

    out = {}
    for k, v in sd.items():
        target = model_sd.get(k)
        if target is None or target.shape == v.shape:
            out[k] = v
        elif k == "pos_embed":
            n_new, n_old = target.shape[1] - num_prefix, v.shape[1] - num_prefix
            side_new, side_old = int(round(n_new ** 0.5)), int(round(n_old ** 0.5))
            if side_new ** 2 != n_new or side_old ** 2 != n_old:
                raise PretrainedError(f"model.pretrained: cannot resample pos_embed {tuple(v.shape)} to {tuple(target.shape)}")
            out[k] = resample_abs_pos_embed(v, [side_new, side_new], [side_old, side_old], num_prefix_tokens=num_prefix)
            report.adapted.append(f"pos_embed {side_old}x{side_old} -> {side_new}x{side_new}")
        elif v.ndim == 4 and target.ndim == 4 and v.shape[0] == target.shape[0] and v.shape[2:] == target.shape[2:]:
            out[k] = adapt_input_conv(target.shape[1], v)
            report.adapted.append(f"{k} input channels {v.shape[1]} -> {target.shape[1]}")
        elif k.startswith(("head.", "head_dist.")):
            report.skipped.append(k)
        else:
            raise PretrainedError(f"model.pretrained: {k} has shape {tuple(v.shape)} in {report.source} but "
                                  f"{tuple(target.shape)} in the model (a different architecture?)")
    return out


def load_pretrained(model: nn.Module, source: str) -> LoadReport:
    """Load ``source`` — a checkpoint path, or a timm model name whose published weights to use — into
    ``model``. The head is re-initialised when the class count differs; the position embedding is
    resampled to the model's grid and the first convolution adapted to its input channels. Reduction
    sites' own parameters may be missing (they start fresh); any other missing weight is an error."""
    report = LoadReport(source=source, loaded=0)
    sd = read_state_dict(source) if is_checkpoint_path(source) else timm_state_dict(source)
    model_sd = model.state_dict()
    sd = _adapt(model_sd, sd, int(getattr(model, "num_prefix_tokens", 1)), report)
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if REDUCER_MARK not in k and k not in report.skipped]
    if missing:
        raise PretrainedError(f"model.pretrained: {source} lacks {len(missing)} weights of the model "
                              f"(first: {missing[0]}); is it a checkpoint of this architecture?")
    report.loaded = len(sd) - len(result.unexpected_keys)
    return report
