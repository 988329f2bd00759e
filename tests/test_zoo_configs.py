"""The token-reduction zoo's shipped configs: "Which Tokens to Use?" (ImageNet, DeiT-S), TNT's DeiT-S set-up and
the CPU-sized Fashion-MNIST counterparts carry their papers' settings (written here from the papers' text),
and every one of them builds its model and reducers and runs a small input."""

import re

import pytest
import torch

import tokendrop as td
from tokendrop.cli import main
from tokendrop.train import trainer as trainer_mod
from tokendrop.train.config import CONFIG_DIR, load_config, shipped_configs

# "Which Tokens to Use?" supp. Table 4 (ImageNet, DeiT-S): per keep rate r, (warm-up epochs, backbone LR
# scale, backbone freeze epochs); None where the paper has no run (ToMe cannot keep 25 %).
TABLE4 = {
    "topk_l1": {0.25: (5, 1, 0), 0.5: (5, 0.01, 5), 0.7: (5, 0.01, 5), 0.9: (5, 0.01, 5)},
    "topk_l2": {0.25: (5, 1, 0), 0.5: (5, 0.01, 5), 0.7: (5, 0.01, 5), 0.9: (5, 0.01, 5)},
    "topk_linf": {0.25: (5, 1, 0), 0.5: (5, 0.01, 5), 0.7: (5, 0.01, 5), 0.9: (5, 0.01, 5)},
    "topk": {0.25: (5, 1, 0), 0.5: (5, 0.01, 5), 0.7: (5, 0.01, 5), 0.9: (20, 1, 0)},
    "evit": {0.25: (5, 1, 0), 0.5: (5, 0.01, 5), 0.7: (5, 0.01, 5), 0.9: (20, 1, 0)},
    "dynamicvit": {0.25: (20, 0.01, 5), 0.5: (5, 0.01, 5), 0.7: (20, 0.01, 5), 0.9: (20, 0.01, 5)},
    "ats": {0.25: (5, 1, 0), 0.5: (5, 0.01, 5), 0.7: (20, 0.01, 5), 0.9: (5, 0.01, 5)},
    "tome": {0.25: None, 0.5: (5, 0.01, 5), 0.7: (5, 0.01, 5), 0.9: (5, 0.01, 5)},
    "kmedoids": {0.25: (5, 1, 0), 0.5: (5, 0.01, 5), 0.7: (20, 0.01, 5), 0.9: (20, 1, 0)},
    "dpcknn": {0.25: (5, 0.01, 5), 0.5: (20, 0.01, 5), 0.7: (5, 0.01, 5), 0.9: (5, 0.01, 5)},
    "sit": {0.25: (5, 0.01, 5), 0.5: (5, 0.01, 5), 0.7: (5, 0.01, 5), 0.9: (20, 0.01, 5)},
    "patchmerger": {0.25: (5, 0.01, 5), 0.5: (5, 0.01, 5), 0.7: (5, 0.01, 5), 0.9: (5, 0.01, 5)},
    "sinkhorn": {0.25: (5, 1, 0), 0.5: (5, 1, 0), 0.7: (5, 1, 0), 0.9: (5, 1, 0)},
}
# Table 1, DeiT-S on ImageNet, r = 70 %; and each method as tokendrop names it: (reducer, reducer_args)
TABLE1_R70 = {"topk_l1": 77.25, "topk_l2": 77.41, "topk_linf": 77.48, "topk": 79.22, "evit": 79.30,
              "dynamicvit": 79.17, "ats": 79.09, "tome": 79.63, "kmedoids": 78.74, "dpcknn": 78.85, "sit": 77.52,
              "patchmerger": 75.80, "sinkhorn": 64.02}
METHOD = {"topk_l1": ("topk", {"score": "l1"}), "topk_l2": ("topk", {"score": "l2"}),
          "topk_linf": ("topk", {"score": "linf"}), "topk": ("topk", {"score": "cls_attention"}),
          "evit": ("evit", {}), "dynamicvit": ("dynamicvit", {}), "ats": ("ats", {}), "tome": ("tome", {}),
          "kmedoids": ("kmedoids", {"iters": 3}), "dpcknn": ("dpcknn", {"k": 5}), "sit": ("sit", {}),
          "patchmerger": ("patchmerger", {}), "sinkhorn": ("sinkhorn", {})}
NOT_YET_REGISTERED = ("sit", "patchmerger", "sinkhorn")  # added on another branch; the build test fails for them here
WHICH = "Which Tokens to Use? (Haurum et al.)"
TNT_PAPER = "TNT (Rao et al. 2024)"


def zoo_configs() -> list[str]:
    return [n for n in shipped_configs() if n.startswith(("which_tokens_", "tnt_", "fashion_mnist_zoo_"))]


def test_the_zoo_has_a_config_per_method():
    names = set(zoo_configs())
    assert {f"which_tokens_{m}" for m in TABLE4} | {"which_tokens_base"} <= names
    fashion = {f"fashion_mnist_zoo_{m}" for m in (*TABLE4, "topk_random", "zero_tp", "tnt", "base")}
    assert fashion <= names and "tnt_deit_small_imagefolder" in names
    assert len(names) == len(TABLE4) + 1 + len(fashion) + 1


def test_which_tokens_base_is_the_papers_imagenet_recipe():
    cfg = load_config("which_tokens_base")
    assert (cfg.model.name, cfg.model.pretrained) == ("deit_small_patch16_224", "deit_small_patch16_224")
    assert cfg.model.drop_path_rate == 0.1 and cfg.data.dataset == "imagefolder"
    o = cfg.optim  # Table 3 and §B: 30 epochs, batch 1024, LR 1e-3 × 1024 / 1024, AdamW wd 0.05, smoothing 0.1
    assert (o.epochs, o.batch_size, o.lr, o.weight_decay, o.betas[0], o.label_smoothing) == (30, 1024, 1e-3, 0.05, 0.9, 0.1)
    assert o.reducer_lr_scale == 1.0 and o.trainable == "all" and not cfg.distill.teacher
    assert cfg.ema.enabled and cfg.ema.decay == 0.9999
    a = cfg.augment  # random resize and crop, flip 50 %, RandAugment, random erasing 25 %, Mixup/CutMix
    assert a.random_resized_crop and a.crop_padding == 0 and a.hflip and a.randaugment_ops > 0
    assert a.random_erasing == 0.25 and a.mixup_alpha > 0 and a.cutmix_alpha > 0
    t = cfg.token_drop  # blocks 4/7/10 (0-based 3/6/9), K_s = int(196 r^s), the same in training and evaluation
    assert (t.blocks, t.schedule, t.keep_rate, t.relative_to, t.when) == ([3, 6, 9], "constant", 0.7, "original", "always")
    assert not t.enabled and cfg.reproduces.startswith(WHICH)


@pytest.mark.parametrize("method", list(TABLE4))
def test_which_tokens_configs_carry_table_4(method):
    name = f"which_tokens_{method}"
    cfg, base = load_config(name), load_config("which_tokens_base")
    warmup, lr_scale, freeze = TABLE4[method][0.7]
    assert (cfg.optim.warmup_epochs, cfg.optim.backbone_lr_scale, cfg.optim.backbone_freeze_epochs) == (warmup, lr_scale, freeze)
    assert cfg.token_drop.enabled and (cfg.token_drop.reducer, cfg.token_drop.reducer_args) == METHOD[method]
    assert cfg.reproduces.startswith(WHICH) and f"{TABLE1_R70[method]:.2f} %" in cfg.reproduces
    # otherwise the base recipe
    for key in ("model", "data", "augment", "ema", "distill", "run"):
        assert getattr(cfg, key) == getattr(base, key), key
    for key in ("epochs", "batch_size", "lr", "weight_decay", "label_smoothing", "reducer_lr_scale", "trainable"):
        assert getattr(cfg.optim, key) == getattr(base.optim, key), key
    # the comment's commands for the other keep rates give Table 4's settings for them
    text = (CONFIG_DIR / f"{name}.yaml").read_text()
    for r in (0.25, 0.5, 0.9):
        line = re.search(rf"^#\s+r = {r:g}: (.*)$", text, re.M).group(1)
        if TABLE4[method][r] is None:
            assert "--set" not in line
            continue
        other = load_config(name, re.findall(r"--set (\S+)", line))
        assert other.token_drop.keep_rate == r
        assert (other.optim.warmup_epochs, other.optim.backbone_lr_scale, other.optim.backbone_freeze_epochs) == TABLE4[method][r]


def test_tnt_config_is_the_papers_deit_small_setup():
    cfg = load_config("tnt_deit_small_imagefolder")
    # TNT §4: frozen pretrained backbone, only the noise allocator (α heads) trained, 40 epochs, β = 0.02;
    # DeiT-S-Distil.; single-layer pruning at the 3rd layer with s = 25; supp. A: noise after layers 1-5
    assert (cfg.model.name, cfg.model.pretrained) == ("deit_small_distilled_patch16_224",) * 2
    assert cfg.optim.trainable == "reducer" and cfg.optim.epochs == 40 and cfg.data.dataset == "imagefolder"
    t = cfg.token_drop
    assert t.enabled and t.reducer == "tnt" and t.reducer_args == {"similarity": 25, "beta": 0.02}
    assert t.blocks == [3] and t.when == "always"  # before block 3 = after the 3rd block (index 2)
    assert sorted(t.blocks + t.train_only_blocks) == [1, 2, 3, 4, 5]  # noise after blocks 0-4
    assert t.schedule == "constant" and t.keep_rate == 0.7
    assert cfg.reproduces.startswith(TNT_PAPER) and "79.82 %" in cfg.reproduces  # Table 9, K = 0.7
    # its code's optimiser: lr 5e-4 × 8 GPUs × 256 / 512, 5 warm-up epochs, cosine to 1e-5
    assert cfg.optim.lr == pytest.approx(5e-4 * 8 * 256 / 512) and cfg.optim.batch_size == 256
    assert cfg.optim.warmup_epochs == 5 and cfg.optim.lr * cfg.optim.min_lr_ratio == pytest.approx(1e-5)


FASHION = {m: TABLE4[m][0.7] for m in TABLE4}
FASHION.update(topk_random=TABLE4["topk"][0.7], zero_tp=TABLE4["topk"][0.7])  # training-free pruning: Top-K's


@pytest.mark.parametrize("method", [*FASHION, "tnt"])
def test_fashion_mnist_zoo_mirrors_the_protocol(method):
    cfg, baseline = load_config(f"fashion_mnist_zoo_{method}"), load_config("fashion_mnist_baseline")
    assert cfg.model.name == "hybrid_vit_tiny" and cfg.model.pretrained == "runs/fashion_mnist_baseline/best.pt"
    assert cfg.data.dataset == "fashion-mnist" and (cfg.data.train_subset, cfg.data.val_subset) == (6000, 0)
    assert cfg.augment == baseline.augment and cfg.ema == baseline.ema and cfg.optim.batch_size == 128
    o = cfg.optim
    assert o.warmup_epochs == 0 and o.lr == pytest.approx(1e-3 * o.batch_size / 1024)  # the paper's LR-norm rule
    t = cfg.token_drop
    assert t.enabled and (t.blocks, t.keep_rate, t.relative_to, t.when) == ([1, 2, 3], 0.7, "original", "always")
    if method == "tnt":
        assert o.trainable == "reducer" and t.reducer == "tnt"
        assert cfg.reproduces.startswith(TNT_PAPER)
        return
    _, lr_scale, freeze = FASHION[method]
    assert o.trainable == "all" and o.backbone_lr_scale == lr_scale
    assert o.backbone_freeze_epochs == pytest.approx(freeze / 30 * o.epochs)  # the same share of the run
    if method in METHOD:
        assert (t.reducer, t.reducer_args) == METHOD[method] and cfg.reproduces.startswith(WHICH)
    else:
        assert cfg.reproduces.startswith(TNT_PAPER)  # TNT's baselines: random drop and Zero-TP


@pytest.fixture(scope="module")
def models():
    """One random-weight backbone per model name (nothing is downloaded: pretrained weights load only in training)."""
    cache = {}

    def get(name, in_chans, side):
        cfg = load_config(name, ["token_drop.enabled=false"])
        if cfg.model.name not in cache:  # built as training builds it, the sites are attached by the test
            cache[cfg.model.name] = trainer_mod.build_run_model(cfg, 10, in_chans, side)
        return cache[cfg.model.name]

    return get


@pytest.mark.parametrize("name", zoo_configs())
def test_zoo_config_builds_and_runs(name, models):
    cfg = load_config(name)
    deit = cfg.model.name.startswith("deit")
    in_chans, side = (3, 64) if deit else (1, 28)  # 16 patches of DeiT, 49 of hybrid_vit_tiny
    model = models(name, in_chans, side)
    td.detach(model)
    trainer_mod.build_token_drop(model, cfg)  # reducer names and arguments as in training
    t = cfg.token_drop
    assert len(td.sites(model)) == (len(t.blocks) + len(t.train_only_blocks) if t.enabled else 0)
    x = torch.randn(2, in_chans, side, side)
    with torch.no_grad():
        model.train()
        assert torch.isfinite(model(x)).all()
        model.eval()
        assert torch.isfinite(model(x)).all()
    if not t.enabled:
        return
    patches = (side // 16) ** 2 if deit else 49
    kept = [r.kept for r in td.last_reduction(model).records]
    if t.relative_to == "original":
        target = [int(patches * t.keep_rate ** s) for s in (1, 2, 3)]
    else:
        target = [int(patches * t.keep_rate)]
    score = t.reducer_args.get("score", "")
    if score in ("l1", "l2", "linf"):  # whole rings (a 4×4 grid has few): fewer at each site, never more
        assert kept and all(b <= a for a, b in zip([patches, *kept], kept))
    elif t.reducer == "evit":
        assert kept == [k + 1 for k in target]  # and the fused token
    elif t.reducer == "ats":
        assert all(k <= c for k, c in zip(kept, target))
    else:
        assert kept == target


def test_missing_baseline_checkpoint_says_how_to_make_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no runs/ here
    out = tmp_path / "zoo"
    code = main(["train", "--config", "fashion_mnist_zoo_topk", "--out", str(out), "--no-progress",
                 "--set", "data.dataset=digits", "--set", "data.workers=0"])
    assert code != 0 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "runs/fashion_mnist_baseline/best.pt" in err[0]
    assert "tokendrop train --config fashion_mnist_baseline --out runs/fashion_mnist_baseline" in err[0]


def test_train_only_blocks_run_the_method_in_training_and_reduce_nothing():
    from tokendrop.train.config import config_from_dict

    cfg = config_from_dict({"model": {"name": "hybrid_vit_tiny", "drop_rate": 0.0, "drop_path_rate": 0.0},
                            "token_drop": {"enabled": True, "reducer": "tnt", "reducer_args": {"similarity": 4},
                                           "when": "always", "blocks": [2], "train_only_blocks": [1, 3],
                                           "schedule": "constant", "keep_rate": 0.5}})
    model = trainer_mod.build_run_model(cfg, 10, 1, 28)
    calls = []
    for site in td.sites(model):
        forward = site.reducer.forward
        site.reducer.forward = lambda x, keep, inputs, f=forward, b=site.block: (calls.append((b, keep)), f(x, keep, inputs))[1]
    assert {s.block: s.when for s in td.sites(model)} == {1: "train", 2: "always", 3: "train"}
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        model.train()
        model(x)
        assert calls == [(1, 49), (2, 24), (3, 49)]  # every site adds noise; the train-only ones keep all 49
        calls.clear()
        model.eval()
        model(x)
    assert calls == [(2, 24)] and [r.kept for r in td.last_reduction(model).records] == [24]  # int(49 · 0.5)
    run = trainer_mod.Trainer.__new__(trainer_mod.Trainer)  # metrics.csv's drop_ratio: the config's schedule
    run.cfg, run.model = cfg, model
    assert run._drop_ratio() == pytest.approx(0.5)
    # a train-only block the model lacks is named by its key
    bad = config_from_dict({"model": {"name": "hybrid_vit_tiny"}, "token_drop": {
        "enabled": True, "reducer": "tnt", "blocks": [2], "train_only_blocks": [7], "schedule": "constant"}})
    with pytest.raises(ValueError, match=r"^token_drop.train_only_blocks: index 7 is outside the allowed range \[0, 3\]"):
        trainer_mod.build_run_model(bad, 10, 1, 28)
