"""Typed training configuration: dataclasses loaded from YAML, overridden with ``--set a.b=value``.

Every field declares its allowed values (``choices``) or range (``lo``/``hi``); an unknown key or an
out-of-range value raises :class:`ConfigError` naming the key. Shipped configs live in
``tokendrop/configs/*.yaml`` and are found by name.
"""

from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration key is unknown or its value is out of range."""


def _f(default: Any, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
       hi_open: bool = False, choices: tuple | None = None, doc: str = "") -> Any:
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "choices": choices, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = _f("hybrid_vit_ptd", doc="backbone registered with timm (hybrid_vit_ptd, hybrid_vit_ctd, hybrid_vit_tiny, or any timm ViT)")
    drop_rate: float = _f(0.1, lo=0.0, hi=1.0, hi_open=True, doc="dropout after the position embedding, attention projection and MLP")
    drop_path_rate: float = _f(0.1, lo=0.0, hi=1.0, hi_open=True, doc="maximum stochastic-depth rate (linear over blocks)")
    pretrained: str = _f("", doc="start from these weights: a checkpoint path (ours, timm's or a state dict) or a timm model name whose published weights to download; '' = random init")


@dataclass
class SyntheticConfig:
    channels: int = _f(3, choices=(1, 3), doc="data.dataset=synthetic: image channels (1 or 3)")
    size: int = _f(32, lo=4, doc="data.dataset=synthetic: image side in pixels")
    classes: int = _f(100, lo=2, doc="data.dataset=synthetic: number of classes")
    train_images: int = _f(50000, lo=1, doc="data.dataset=synthetic: training images")
    val_images: int = _f(10000, lo=1, doc="data.dataset=synthetic: validation images")


@dataclass
class DataConfig:
    dataset: str = _f("cifar100", choices=("cifar10", "cifar100", "fashion-mnist", "digits", "imagefolder", "synthetic"), doc="data set (synthetic: generated, shaped by data.synthetic.*)")
    root: str = _f("data", doc="directory holding (or receiving) the data set files")
    download: bool = _f(True, doc="download CIFAR through torchvision when missing (needs the internet)")
    img_size: int = _f(0, lo=0, doc="input side in pixels; 0 = native: the data set's size (CIFAR 32, Fashion-MNIST 28, digits 32), for imagefolder the model's (32 for hybrid_vit_*, a timm model's pretrained input size)")
    train_subset: int = _f(0, lo=0, doc="train on this many images (a fixed random subset); 0 = all")
    val_subset: int = _f(0, lo=0, doc="validate on this many images; 0 = all")
    workers: int = _f(2, lo=0, doc="DataLoader worker processes")
    pipeline: str = _f("auto", choices=("auto", "cpu", "gpu"), doc="where training batches are made: cpu = DataLoader workers; gpu = the uint8 set resident on the run's device, augmented there (crop, flip, RandAugment, AutoAugment, erasing; not RandomResizedCrop/resizing/DDP); auto = gpu on CUDA when supported and the set fits in memory")
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class AugmentConfig:
    crop_padding: int = _f(4, lo=0, doc="RandomCrop(img_size, padding); 0 disables")
    random_resized_crop: bool = _f(False, doc="RandomResizedCrop(img_size, scale 0.08-1) instead of resizing the image (the ImageNet recipes); crop_padding must be 0")
    hflip: bool = _f(True, doc="random horizontal flip")
    randaugment_ops: int = _f(2, lo=0, doc="RandAugment num_ops; 0 disables")
    randaugment_magnitude: int = _f(10, lo=0, hi=30, doc="RandAugment magnitude")
    autoaugment: bool = _f(False, doc="AutoAugment with the CIFAR-10 policy (the CTD recipe)")
    random_erasing: float = _f(0.0, lo=0.0, hi=1.0, doc="RandomErasing probability (random fill)")
    mixup_alpha: float = _f(0.0, lo=0.0, doc="Mixup beta-distribution alpha; 0 disables")
    cutmix_alpha: float = _f(0.0, lo=0.0, doc="CutMix beta-distribution alpha; 0 disables")
    mix_prob: float = _f(1.0, lo=0.0, hi=1.0, doc="probability of mixing a batch at all")
    mix_switch_prob: float = _f(0.5, lo=0.0, hi=1.0, doc="probability of CutMix instead of Mixup when both are on")


@dataclass
class OptimConfig:
    epochs: int = _f(200, lo=1, doc="training epochs")
    batch_size: int = _f(128, lo=1, doc="training batch size (per process)")
    eval_batch_size: int = _f(256, lo=1, doc="evaluation batch size")
    lr: float = _f(4e-4, lo=0.0, lo_open=True, doc="AdamW peak learning rate")
    weight_decay: float = _f(0.05, lo=0.0, doc="AdamW weight decay")
    betas: list = _f([0.9, 0.999], doc="AdamW betas")
    warmup_epochs: float = _f(5.0, lo=0.0, doc="linear warm-up length in epochs")
    min_lr_ratio: float = _f(0.0, lo=0.0, hi=1.0, doc="cosine floor as a fraction of lr")
    lr_unit: str = _f("epoch", choices=("epoch", "step"), doc="evaluate warmup+cosine per epoch (PTD notebook) or per step (baseline notebook)")
    label_smoothing: float = _f(0.0, lo=0.0, hi=1.0, hi_open=True, doc="label smoothing of the cross-entropy")
    clip_grad: float = _f(1.0, lo=0.0, doc="global gradient-norm clipping; 0 disables")
    reducer_lr_scale: float = _f(1.0, lo=0.0, doc="LR factor of the reduction methods' own parameters")
    backbone_lr_scale: float = _f(1.0, lo=0.0, doc="LR factor of the backbone (blocks, final norm, CLS token); the head and embeddings keep 1")
    backbone_freeze_epochs: float = _f(0.0, lo=0.0, doc="epochs at the start during which the backbone's LR is 0")
    trainable: str = _f("all", choices=("all", "reducer"), doc="train every parameter, or only the reduction methods' own (TNT's α heads)")


@dataclass
class EmaConfig:
    enabled: bool = _f(False, doc="keep an exponential moving average of the weights, validate it every epoch")
    decay: float = _f(0.9999, lo=0.0, hi=1.0, doc="EMA decay")
    warmup: str = _f("torch_ema", choices=("torch_ema", "none"), doc="torch_ema: decay_n = min(decay, (1+n)/(10+n)), parameters only (the PTD/CTD notebooks); none: timm ModelEmaV3 with a constant decay (parameters and buffers)")


@dataclass
class TokenDropConfig:
    enabled: bool = _f(False, doc="attach token reduction sites (see token_drop.when)")
    reducer: str = _f("topk", doc="reduction method, any name in tokendrop.REDUCERS (topk, ...)")
    reducer_args: dict = _f({}, doc="keyword arguments of the method, e.g. {score: l2} or {prop_attn: false}")
    score: str = _f("cls_attention", choices=("cls_attention", "random", "gradient", "l1", "l2", "linf"), doc="token saliency of topk (reducer_args.score wins when given)")
    when: str = _f("train", choices=("train", "eval", "always"), doc="active in training only (PTD/CTD: evaluation sees every token), at evaluation only, or always (post-hoc methods fine-tuned with their reduction)")
    position: str = _f("auto", choices=("auto", "inside", "before"), doc="inside the block (after the attention residual) or before it; auto = the method's default")
    blocks: list = _f([0], doc="0-based block indices of the drop sites")
    train_only_blocks: list = _f([], doc="further blocks where the method runs in training only and keeps every token (TNT's noise allocator after blocks 0-4)")
    schedule: str = _f("curriculum", choices=("curriculum", "linear", "cosine", "step", "constant"), doc="drop-ratio schedule shape")
    start: float = _f(40.0, lo=0.0, doc="curriculum start epoch t_s")
    end: float = _f(140.0, lo=0.0, doc="curriculum end epoch t_e (> start)")
    initial: float = _f(0.0, lo=0.0, hi=1.0, hi_open=True, doc="drop ratio before t_s")
    final: float = _f(0.35, lo=0.0, hi=1.0, hi_open=True, doc="drop ratio from t_e on (not read by the constant schedule)")
    keep_rate: float = _f(0.65, lo=0.0, hi=1.0, lo_open=True, doc="constant schedule: the fraction of tokens kept, as td.Constant(keep_rate)")
    gamma: float = _f(2.0, lo=0.0, lo_open=True, doc="curriculum exponent")
    steps: int = _f(4, lo=1, doc="number of steps of the step schedule")
    relative_to: str = _f("entering", choices=("entering", "original"), doc="keep count over tokens entering the site or over the original patches")
    per_step: bool = _f(False, doc="move the schedule every step (fractional epoch) instead of once per epoch (the reference)")


@dataclass
class TPCConfig:
    """TPC-ViT (``tokendrop.attach_tpc``); every key but ``enabled`` is a :class:`~tokendrop.tpc.TPCParams`
    field, range-checked by ``TPCParams.check`` (the model-dependent bounds when the model is built)."""

    enabled: bool = _f(False, doc="TPC-ViT: per-token halting over all blocks (attach_tpc after the pretrained weights are loaded); excludes token_drop.enabled")
    mode: str = _f("masked", doc="masked (every token computed, halted ones masked: the paper's way) or packed (each block runs only its running tokens; same result)")
    gamma: float = _f(5.0, doc="gate scale γ of σ(γ·y_i − β)")
    beta: float = _f(40.0, doc="gate shift β, subtracted as A-ViT does (the paper's literal +β halts every token at block 0); the gate opens at y_i ≈ β/γ")
    dims: list = _f([0, 1], doc="block-output channels (i₁, i₂) feeding the pause and non-restart gates")
    restart_gate: bool = _f(True, doc="false: non-restart probability 1, b = P1 (A-ViT's gate)")
    delta: float = _f(0.01, doc="a token halts once its cumulative break probability reaches 1 − δ, δ in (0, 1)")
    xi: float = _f(0.5, doc="distribution regulariser b ← ξ·b + (1−ξ)·mean_active(b), ξ in [0, 1] (1 = off)")
    regularise: str = _f("break", doc="apply the regulariser to b (break, Eq. 9) or to P1 and P2 separately (gates)")
    phi_p: float = _f(5e-4, doc="weight φ_p of the ponder loss (>= 0)")
    phi_d: float = _f(0.1, doc="weight φ_d of the distribution loss (>= 0)")
    kappa: int | None = _f(100, doc="stabiliser: each query attends to its κ nearest keys (>= 1); null = dense attention")
    metric: str = _f("euclidean", doc="stabiliser's key ranking: euclidean or dot")
    shared_neighbours: bool = _f(False, doc="stabiliser: one key set for all heads")
    target_depth: float | None = _f(None, doc="0-based centre of the Gaussian layer prior; null = round(2L/3) (8 of 12 blocks)")
    distribution: str = _f("active", doc="D^l: mean b over the processed tokens (active), mean halting weight (halting), or A-ViT's loss (avit)")
    restart_mode: str = _f("none", doc="none (a halted token never returns) or skip (a running patch token with P1 >= 0.5 sits out the next block)")
    learn_gates: bool = _f(False, doc="make γ and β learnable parameters (tpc.gamma, tpc.beta)")

    def params(self) -> dict[str, Any]:
        """The ``attach_tpc`` keyword arguments."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "enabled"}
        out["dims"] = tuple(out["dims"])
        return out


@dataclass
class DistillConfig:
    teacher: str = _f("", doc="teacher for a KL term on the logits: a checkpoint path (built as model.name) or a timm model name with its published weights; '' = no distillation")
    weight: float = _f(0.5, lo=0.0, doc="weight of the teacher's KL term added to the task loss")
    temperature: float = _f(1.0, lo=0.0, lo_open=True, doc="softmax temperature of the KL term (scaled by T²)")


@dataclass
class RunConfig:
    device: str = _f("auto", doc="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    amp: str = _f("auto", choices=("auto", "bf16", "off"), doc="auto = bf16 autocast on CUDA, fp32 elsewhere")
    compile: bool = _f(False, doc="torch.compile the model (CUDA only; optional; composes with cuda_graphs)")
    cuda_graphs: bool = _f(True, doc="on CUDA, capture the whole training step in a CUDA graph once per keep count and batch shape and replay it; what cannot be captured (gradient saliency, DDP, a failed capture) runs eagerly with a notice; no effect elsewhere")
    deterministic: bool = _f(False, doc="torch.use_deterministic_algorithms where PyTorch allows")
    threads: int = _f(0, lo=0, doc="CPU threads for torch; 0 = PyTorch's default")
    nan_check_every: int = _f(50, lo=1, doc="read the device's non-finite-loss flag every N training steps (and at each epoch's end): a NaN stops the run at most N steps later, last.pt keeps the last good epoch")


@dataclass
class Config:
    name: str = _f("run", doc="run name (the default run directory is runs/NAME)")
    reproduces: str = _f("", doc="the published result this config reproduces (paper, table, figure)")
    seed: int = _f(42, lo=0, doc="random seed")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    token_drop: TokenDropConfig = field(default_factory=TokenDropConfig)
    tpc: TPCConfig = field(default_factory=TPCConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        """Plain nested dict (for YAML and checkpoints)."""
        return dataclasses.asdict(self)


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert ``value`` to the field type ``typ``; raise ConfigError naming ``key`` otherwise."""
    if get_origin(typ) in (Union, types.UnionType):  # ``X | None``: null or an X
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~")):
            return None
        (typ,) = [t for t in get_args(typ) if t is not type(None)]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if typ is float:
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not math.isfinite(out):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return out
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if typ is dict or get_origin(typ) is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else {}
        if value is None:
            value = {}
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: expected a mapping of argument names to values, got {value!r}")
        return value
    if typ is list or get_origin(typ) is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    return value


def _check(key: str, value: Any, meta: dict) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        below = lo is not None and (value <= lo if meta.get("lo_open") else value < lo)
        above = hi is not None and (value >= hi if meta.get("hi_open") else value > hi)
        if below or above:
            left = "(" if meta.get("lo_open") else "["
            right = ")" if meta.get("hi_open") else "]"
            rng = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
            raise ConfigError(f"{key}: {value!r} is outside the allowed range {rng}")


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    hints = get_type_hints(type(obj))
    names = {f.name: f for f in dataclasses.fields(obj)}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"{key}: unknown key (allowed: {', '.join(names)})")
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(current))}")
            _apply(current, v, key + ".")
            continue
        value = _coerce(key, v, hints[k])
        _check(key, value, names[k].metadata)
        setattr(obj, k, value)


def _validate(cfg: Config) -> None:
    """Cross-field checks that single-field ranges cannot express."""
    td = cfg.token_drop
    if td.enabled and td.schedule != "constant" and td.end <= td.start:
        raise ConfigError(f"token_drop.end: {td.end} must be greater than token_drop.start ({td.start})")
    if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in td.blocks) or not td.blocks:
        raise ConfigError(f"token_drop.blocks: {td.blocks!r} must be a non-empty list of block indices >= 0")
    if len(set(td.blocks)) != len(td.blocks):
        raise ConfigError(f"token_drop.blocks: {td.blocks!r} names a block twice")
    extra = td.train_only_blocks
    if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in extra) or len(set(extra)) != len(extra):
        raise ConfigError(f"token_drop.train_only_blocks: {extra!r} must be distinct block indices >= 0")
    if set(extra) & set(td.blocks):
        raise ConfigError(f"token_drop.train_only_blocks: block {min(set(extra) & set(td.blocks))} is also in token_drop.blocks")
    if len(cfg.optim.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas: {cfg.optim.betas!r} must be two numbers in [0, 1)")
    if (cfg.augment.mixup_alpha > 0 or cfg.augment.cutmix_alpha > 0) and cfg.optim.batch_size % 2:
        raise ConfigError(f"optim.batch_size: {cfg.optim.batch_size} must be even when Mixup/CutMix is on")
    if cfg.augment.random_resized_crop and cfg.augment.crop_padding:
        raise ConfigError("augment.random_resized_crop: use either it or RandomCrop with padding (set augment.crop_padding=0)")
    if cfg.augment.autoaugment and cfg.augment.randaugment_ops:
        raise ConfigError("augment.autoaugment: use either AutoAugment or RandAugment (set augment.randaugment_ops=0)")
    _validate_tpc(cfg)


def _validate_tpc(cfg: Config) -> None:
    """The ``tpc`` keys through ``TPCParams.check`` (its messages name the parameter: prefixed ``tpc.``)."""
    from ..tpc.params import TPCParams

    try:
        TPCParams(**cfg.tpc.params()).check()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"tpc.{e}") from None
    if cfg.tpc.enabled and cfg.token_drop.enabled:
        raise ConfigError("tpc.enabled: TPC-ViT halts tokens itself and cannot be combined with token reduction sites; "
                          "set token_drop.enabled=false (or tpc.enabled=false)")


def config_path(name_or_path: str) -> Path:
    """Resolve a shipped config name (``cifar100_ptd_mix_ema``) or a YAML path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():  # a directory named like a shipped config (a run's) is no config
        if not p.is_file():
            raise ConfigError(f"config: file {p} does not exist")
        return p
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise ConfigError(f"config: no shipped config named {name_or_path!r} (see `tokendrop configs`)")
    return shipped


def parse_overrides(items: list[str]) -> dict:
    """Turn ``["optim.lr=1e-3", "token_drop.blocks=[0,1]"]`` into a nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def merge_dicts(base: dict, extra: dict) -> dict:
    """Merge ``extra`` into ``base`` recursively (in place); returns ``base``."""
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge_dicts(base[k], v)
        else:
            base[k] = v
    return base


def _check_constant_keys(data: dict, cfg: Config) -> None:
    """A constant schedule reads ``keep_rate`` (as ``td.Constant``), not ``final`` (a drop ratio): a config
    that sets ``final`` for it, and no ``keep_rate``, most likely meant the other quantity."""
    given = data.get("token_drop") or {}
    if cfg.token_drop.schedule == "constant" and "final" in given and "keep_rate" not in given:
        final = cfg.token_drop.final
        raise ConfigError(f"token_drop.final: a constant schedule reads token_drop.keep_rate (the fraction kept, as "
                          f"td.Constant); set token_drop.keep_rate={round(1 - final, 9):g} for a drop ratio of {final:g}")


def config_from_dict(data: dict) -> Config:
    """Build and validate a :class:`Config` from a nested dict."""
    cfg = Config()
    _apply(cfg, data or {})
    _check_constant_keys(data or {}, cfg)
    _validate(cfg)
    return cfg


def _read_yaml(name_or_path: str, seen: tuple[str, ...] = ()) -> dict:
    """A config file as a dict, with its ``base:`` config (a shipped name or path) merged underneath."""
    path = config_path(name_or_path)
    if str(path) in seen:
        raise ConfigError(f"base: {path} includes itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config: {path} is not valid YAML ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping")
    data.setdefault("name", path.stem)
    base = data.pop("base", None)
    if base is None:
        return data
    ref = Path(str(base))
    if ref.suffix in (".yaml", ".yml") and not ref.is_absolute():
        ref = path.parent / ref  # a relative base file is found next to the config
    parent = _read_yaml(str(ref), seen + (str(path),))
    return merge_dicts(parent, data)


def load_config(name_or_path: str, overrides: list[str] | None = None) -> Config:
    """Load a shipped or user YAML config (following ``base:``), apply ``--set`` overrides, validate."""
    return config_from_dict(merge_dicts(_read_yaml(name_or_path), parse_overrides(overrides or [])))


def shipped_configs() -> list[str]:
    """Names of the configs shipped with the package."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def config_reference() -> list[tuple[str, str, str]]:
    """(key, default, description) for every config key — the README's key table."""
    rows = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, prefix + f.name + ".")
            else:
                rows.append((prefix + f.name, repr(value), f.metadata.get("doc", "")))

    walk(Config(), "")
    return rows
