"""TPC-ViT in training and measurement: the ``tpc`` config section, a fine-tuning run on digits with its
halting columns, and ``tokendrop bench --tpc`` (MACs against a hand formula, the command end to end)."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import tokendrop as td
from tokendrop.bench.command import add_arguments, run as bench_run
from tokendrop.bench.timing import PairedTiming
from tokendrop.bench.tpc import tpc_gmacs
from tokendrop.cli import main
from tokendrop.train import trainer as trainer_mod
from tokendrop.train.config import ConfigError, load_config

FAST = ["data.dataset=digits", "data.train_subset=128", "data.val_subset=100", "data.workers=0",
        "optim.batch_size=64", "optim.eval_batch_size=100", "run.threads=1"]
# gates that halt tokens at varied depths on random-scale activations (research/tpc-vit-spec.md §4.2)
HALTING = ["tpc.gamma=1", "tpc.beta=-0.5", "tpc.kappa=32"]
DEPTH, TOKENS = 4, 65  # hybrid_vit_tiny at 32 px: 4 blocks, 64 patches + CLS


def sets(*items):
    return [x for item in (*FAST, *items) for x in ("--set", item)]


def read_rows(run_dir):
    with open(Path(run_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------- config
def test_tpc_section_defaults_and_values():
    cfg = load_config("fashion_mnist_baseline")
    t = cfg.tpc
    assert not t.enabled and t.mode == "masked"
    # the paper's values (seed 003 §4.1) and the spec's choices (§4)
    assert (t.gamma, t.beta, t.delta, t.xi, t.phi_p, t.phi_d, t.kappa) == (5.0, 40.0, 0.01, 0.5, 5e-4, 0.1, 100)
    assert (t.dims, t.target_depth, t.restart_mode, t.distribution, t.restart_gate) == ([0, 1], None, "none", "active", True)
    cfg = load_config("fashion_mnist_baseline", ["tpc.enabled=true", "tpc.kappa=null", "tpc.target_depth=2",
                                                  "tpc.dims=[3, 5]", "tpc.mode=packed"])
    assert cfg.tpc.kappa is None and cfg.tpc.target_depth == 2.0 and cfg.tpc.params()["dims"] == (3, 5)
    assert cfg.tpc.params()["mode"] == "packed" and "enabled" not in cfg.tpc.params()


@pytest.mark.parametrize("override, key", [
    ("tpc.delta=0", "tpc.delta"), ("tpc.delta=1", "tpc.delta"), ("tpc.xi=1.5", "tpc.xi"), ("tpc.kappa=0", "tpc.kappa"),
    ("tpc.kappa=2.5", "tpc.kappa"), ("tpc.mode=dense", "tpc.mode"), ("tpc.dims=[0, 0]", "tpc.dims"),
    ("tpc.gamma=0", "tpc.gamma"), ("tpc.phi_d=-1", "tpc.phi_d"), ("tpc.restart_mode=always", "tpc.restart_mode"),
    ("tpc.target_depth=-1", "tpc.target_depth"), ("tpc.tau=1", "tpc.tau"),
])
def test_tpc_range_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"^{key}:"):
        load_config("fashion_mnist_baseline", [override])


@pytest.mark.parametrize("config, override, key", [
    ("fashion_mnist_ptd", "tpc.enabled=true", "tpc.enabled"),  # token drop is on there
    ("fashion_mnist_baseline", "tpc.dims=[0, 96]", "tpc.dims"),  # hybrid_vit_tiny is 96 wide
    ("fashion_mnist_baseline", "tpc.target_depth=4", "tpc.target_depth"),  # 4 blocks: centre in [0, 3]
])
def test_tpc_errors_exit_2_in_one_line_and_write_nothing(tmp_path, capsys, config, override, key):
    out = tmp_path / "run"
    assert main(["train", "--config", config, "--out", str(out), "--no-progress",
                 *sets("tpc.enabled=true", override)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tokendrop: error: {key}:"), err
    assert not out.exists()


def test_missing_pretrained_checkpoint_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "fashion_mnist_tpc", "--out", "run", "--no-progress", *sets()]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("tokendrop: error: model.pretrained: checkpoint runs/fashion_mnist_baseline/best.pt does not "
                       "exist; make it with: tokendrop train --config fashion_mnist_baseline --out runs/fashion_mnist_baseline")
    assert not (tmp_path / "run").exists()


TPC_TABLE = {  # config: (model, pretrained, epochs, lr, (γ, β, δ, ξ, φ_p, φ_d, κ, target depth), mode)
    "tpc_deit_small_imagefolder": ("deit_small_patch16_224", "deit_small_patch16_224", 100, 1e-4,
                                   (5.0, 40.0, 0.01, 0.5, 5e-4, 0.1, 100, 8.0), "masked"),
    "fashion_mnist_tpc": ("hybrid_vit_tiny", "runs/fashion_mnist_baseline/best.pt", 3, 2e-4,
                          (5.0, 5.0, 0.01, 0.5, 5e-4, 0.1, 25, 2.0), "packed"),
}


@pytest.mark.parametrize("name", list(TPC_TABLE))
def test_tpc_configs_carry_their_hyperparameters(name):
    model, pretrained, epochs, lr, gates, mode = TPC_TABLE[name]
    cfg = load_config(name)
    t = cfg.tpc
    assert (cfg.model.name, cfg.model.pretrained, cfg.optim.epochs, cfg.optim.lr) == (model, pretrained, epochs, lr)
    assert (t.gamma, t.beta, t.delta, t.xi, t.phi_p, t.phi_d, t.kappa, t.target_depth) == gates
    assert t.enabled and t.mode == mode and t.dims == [0, 1] and not cfg.token_drop.enabled
    assert cfg.reproduces.startswith("TPC-ViT (Zhu)")
    if name.startswith("tpc_deit"):  # Adam (no decoupled decay), ImageNet-style images at 224 px
        assert cfg.optim.weight_decay == 0.0 and cfg.data.dataset == "imagefolder" and cfg.data.img_size == 224


# ------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def tpc_run(tmp_path_factory):
    """One epoch of fashion_mnist_tpc on digits, fine-tuned from a saved hybrid_vit_tiny state dict."""
    root = tmp_path_factory.mktemp("tpc")
    torch.manual_seed(3)
    start = td.build_model("hybrid_vit_tiny", num_classes=10, in_chans=1)
    torch.save(start.state_dict(), root / "start.pt")
    out = root / "run"
    code = main(["train", "--config", "fashion_mnist_tpc", "--out", str(out), "--no-progress",
                 *sets("optim.epochs=1", f"model.pretrained={root / 'start.pt'}", *HALTING)])
    assert code == 0
    return out


def test_tpc_run_logs_halting_columns_in_range(tpc_run):
    (row,) = read_rows(tpc_run)
    columns = [f"tpc_active_l{i}" for i in range(DEPTH)] + [f"tpc_halted_l{i}" for i in range(DEPTH)] + ["tpc_depth"]
    assert list(row) == list(trainer_mod.METRIC_COLUMNS) + columns
    assert math.isfinite(float(row["train_loss"])) and math.isfinite(float(row["val_loss_raw"]))
    active = [float(row[f"tpc_active_l{i}"]) for i in range(DEPTH)]
    halted = [float(row[f"tpc_halted_l{i}"]) for i in range(DEPTH)]
    depth = float(row["tpc_depth"])
    assert active[0] == TOKENS and all(0 <= a <= TOKENS for a in active)
    assert active[-1] < TOKENS  # tokens halted: the checks below are not vacuous
    assert 1.0 <= depth <= DEPTH
    # a token that halts at depth M was processed by blocks 0..M-1, and by no later one (restart_mode none)
    for i in range(DEPTH):
        assert active[i] == pytest.approx(TOKENS - sum(halted[:i]), abs=1e-9)
    assert sum(halted) == pytest.approx(TOKENS)
    assert depth == pytest.approx(sum(active) / TOKENS)
    assert depth == pytest.approx(sum((i + 1) * h for i, h in enumerate(halted)) / TOKENS)
    for name in ("plots/tpc_active.png", "plots/tpc_depth.png", "best.pt"):
        assert (tpc_run / name).is_file(), name


def test_tpc_checkpoint_evaluates_to_the_logged_accuracy(tpc_run):
    (row,) = read_rows(tpc_run)
    result = trainer_mod.evaluate_checkpoint(tpc_run / "last.pt", "cpu")
    assert result["val_acc_raw"] == pytest.approx(float(row["val_acc_raw"]), abs=1e-6)
    assert result["val_loss_raw"] == pytest.approx(float(row["val_loss_raw"]), rel=1e-5)


def test_tpc_fine_tune_starts_from_the_pretrained_weights(tmp_path):
    """model.pretrained is loaded into the plain model, then TPC is attached (and its losses train)."""
    torch.manual_seed(5)
    start = td.build_model("hybrid_vit_tiny", num_classes=10, in_chans=1)
    torch.save(start.state_dict(), tmp_path / "start.pt")
    cfg = load_config("fashion_mnist_tpc", [*FAST, f"model.pretrained={tmp_path / 'start.pt'}", *HALTING])
    trainer = trainer_mod.Trainer(cfg, tmp_path / "run", progress=False)
    trainer.setup()
    assert td.tpc.controller(trainer.model) is not None
    loaded = trainer.model.state_dict()
    for k, v in start.state_dict().items():
        assert torch.equal(loaded[k], v), k
    trainer.model.train()
    trainer.model(torch.randn(2, 1, 32, 32))
    aux = td.aux_loss(trainer.model)
    stats = td.tpc.last_stats(trainer.model)
    assert aux.item() == pytest.approx(5e-4 * stats.ponder_loss.item() + 0.1 * stats.distribution_loss.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------- bench
def tiny_vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3, mlp_ratio=4.0,
                             num_classes=5, qkv_bias=True).eval()


def test_tpc_gmacs_equal_the_hand_formula():
    model = td.attach_tpc(tiny_vit(), kappa=20)
    counts = torch.tensor([[65, 65], [40, 65], [10, 30]])  # (L, B): tokens per block and image
    C, hidden, H, d, classes = 48, 192, 3, 16, 5

    def block(n):
        return n * C * 3 * C + 2 * H * n * n * d + n * C * C + 2 * n * C * hidden

    def stabiliser(n):  # the κ-nearest ranking: H·n²·d for the distances, H·n·d for ‖k‖², only where κ < n
        return n * n * H * d + n * H * d if n > 20 else 0

    embed = 48 * 3 * 4 * 4 * 8 * 8
    per_image = []
    for b in range(2):
        ns = counts[:, b].tolist()
        per_image.append(embed + sum(block(n) + stabiliser(n) + 4 * n + C for n in ns) + C * classes)
    dense = embed + 3 * block(65) + C * classes
    masked = dense + 3 * (stabiliser(65) + 4 * 65 + C)
    g = tpc_gmacs(model, counts)
    assert g["packed"] * 1e9 == pytest.approx(sum(per_image) / 2, rel=1e-12)
    assert g["dense"] * 1e9 == dense and g["masked"] * 1e9 == pytest.approx(masked, rel=1e-12)
    assert g["ideal_speedup_packed"] == pytest.approx(2 * dense / sum(per_image))
    assert g["backbone"] + g["stabiliser"] + g["gates"] == pytest.approx(g["packed"])


def test_paired_ratio_between_two_variants():
    t = PairedTiming("base", [1.0, 1.0, 1.0], {"slow": [2.0, 4.0], "fast": [1.0, 1.0]})
    assert t.speedup_over("fast", "slow") == 3.0  # median of 2/1 and 4/1, round by round


def bench(argv):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return bench_run(parser.parse_args(argv))


def test_bench_tpc_measures_a_tpc_run(tpc_run, tmp_path, capsys):
    out = tmp_path / "tpc.json"
    assert bench(["--tpc", str(tpc_run / "last.pt"), "--batch-sizes", "1", "4", "--rounds", "1", "--warmup", "0",
                  "--tpc-images", "8", "--threads", "1", "--json", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert report["command"].startswith(f"tokendrop bench --tpc {tpc_run / 'last.pt'} --tpc-images 8 --batch-sizes 1 4")
    t = report["tpc"]
    assert t["images"] == 8 and t["tokens"] == TOKENS and t["blocks"] == DEPTH and t["dataset"] == "digits"
    assert t["mean_tokens"][0] == TOKENS and sum(t["depth_histogram"]) == 8 * TOKENS
    assert t["mean_depth"] == pytest.approx(sum(t["mean_tokens"]) / TOKENS)
    assert t["packed_vs_masked_max_abs_logit_diff"] < 1e-4
    g = t["gmacs"]
    assert g["packed"] <= g["masked"] and g["dense"] < g["masked"]
    assert [s["batch_size"] for s in t["speed"]] == [1, 4]
    for s in t["speed"]:
        assert s["dense"]["speedup"] == 1.0 and s["packed"]["median_s"] > 0 and s["packed_over_masked"] > 0
        assert s["padded_ideal_speedup"] <= s["ideal_speedup"] + 1e-12  # padding only adds work
        assert all(p >= m for p, m in zip(s["padded_tokens"], s["mean_tokens"]))
    assert "TPC-ViT" in capsys.readouterr().out


@pytest.mark.parametrize("argv, flag", [
    (["--tpc", "fashion_mnist_tpc", "--model", "hybrid_vit_tiny"], "--model"),
    (["--tpc-set", "tpc.kappa=null"], "--tpc-set"),
    (["--tpc-images", "8"], "--tpc-images"),
    (["--tpc", "no_such_config"], "--tpc"),
    (["--tpc", "fashion_mnist_tpc", "--tpc-set", "tpc.delta=2"], "tpc.delta"),
    (["--tpc", "fashion_mnist_tpc", "--tpc-images", "0"], "--tpc-images"),
])
def test_bench_tpc_bad_arguments(argv, flag, capsys):
    assert bench([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0], err
