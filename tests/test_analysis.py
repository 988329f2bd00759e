"""Reduction-pattern analysis: every metric against values worked by hand or brute force, patterns from
hand-made reducers, and ``tokendrop analyze | sweep | show`` end to end on digits (random weights)."""

from __future__ import annotations

import csv
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr
from timm.models.vision_transformer import VisionTransformer

import tokendrop as td
from tokendrop import analysis as ta
from tokendrop.cli import main
from tokendrop.reduction.registry import _REDUCERS, register_reducer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------- IoA and IoU
def test_ioa_iou_identical_disjoint_and_a_worked_example():
    m = np.array([1, 0, 1, 1], bool)
    assert ta.ioa(m, m) == 1.0 and ta.iou(m, m) == 1.0
    assert ta.ioa(m, ~m) == 0.0 and ta.iou(m, ~m) == 0.0
    # on paper: M1 = {0, 1, 3}, M2 = {0, 2}: M1 ∩ M2 = {0}, M1 ∪ M2 = {0, 1, 2, 3}
    m1, m2 = np.array([1, 1, 0, 1], bool), np.array([1, 0, 1, 0], bool)
    assert ta.ioa(m1, m2) == pytest.approx(1 / 2)
    assert ta.iou(m1, m2) == pytest.approx(1 / 4)
    # batched: one value per sample, torch tensors accepted
    a = torch.tensor([[[1, 1, 0, 1], [1, 0, 1, 1]]], dtype=torch.bool)
    b = torch.tensor([[[1, 0, 1, 0], [1, 0, 1, 1]]], dtype=torch.bool)
    np.testing.assert_allclose(ta.iou(a, b), [[0.25, 1.0]])
    np.testing.assert_allclose(ta.ioa(a, b), [[0.5, 1.0]])
    assert ta.iou(np.zeros(3, bool), np.zeros(3, bool)) == 1.0  # two empty patterns are equal


@pytest.mark.parametrize("num_patches", [4, 5, 6])
def test_lower_bounds_equal_brute_force_over_all_patterns(num_patches):
    patches = range(num_patches)
    for k1, k2 in itertools.product(range(num_patches + 1), repeat=2):
        ioas, ious = [], []
        for s1 in itertools.combinations(patches, k1):
            for s2 in itertools.combinations(patches, k2):
                inter, union = len(set(s1) & set(s2)), len(set(s1) | set(s2))
                ioas.append(inter / k2 if k2 else 1.0)
                ious.append(inter / union if union else 1.0)
        assert ta.ioa_lower_bound(num_patches, k1, k2) == pytest.approx(min(ioas)), (k1, k2)
        assert ta.iou_lower_bound(num_patches, k1, k2) == pytest.approx(min(ious)), (k1, k2)


def test_algorithms_1_and_2_by_hand():
    assert ta.stage_keep_counts(196, 0.7) == [137, 96, 67]  # seed 004's K_s
    assert ta.stage_keep_counts(196, 0.9) == [176, 158, 142]
    # r1 = 0.9, r2 = 0.7: overlaps of at least 176+137-196 = 117, 158+96-196 = 58, 142+67-196 = 13
    assert ta.ioa_lower_bounds(196, 0.9, 0.7) == pytest.approx([117 / 137, 58 / 96, 13 / 67])
    assert ta.iou_lower_bounds(196, 0.9, 0.7) == pytest.approx([117 / 196, 58 / 196, 13 / 196])
    # r1 = 0.7, r2 = 0.5 ([98, 49, 24]): only stage 1 must overlap (137+98-196 = 39)
    assert ta.ioa_lower_bounds(196, 0.7, 0.5) == pytest.approx([39 / 98, 0.0, 0.0])
    with pytest.raises(ValueError, match="r1"):
        ta.ioa_lower_bounds(196, 0.5, 0.7)


# ------------------------------------------------------------------------------ homogeneity and NMI
def test_homogeneity_and_nmi_by_hand():
    c = np.array([0, 0, 1, 1, 2])
    relabelled = np.array([7, 7, 3, 3, 5])
    assert ta.nmi(c, relabelled) == pytest.approx(1.0)
    assert ta.homogeneity(c, relabelled) == pytest.approx(1.0)
    # independent clusterings: no information either way
    assert ta.nmi([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0, abs=1e-12)
    assert ta.homogeneity([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0, abs=1e-12)
    # on paper: C = {0,1}{2,3}, K = {0,1,2}{3}; n_ck: (0,0)=2, (1,0)=1, (1,1)=1; n_c = 2, 2; n_k = 3, 1
    c1, c2 = [0, 0, 1, 1], [0, 0, 0, 1]
    h_c = math.log(2)
    h_k = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    mi = 0.5 * math.log(4 * 2 / (2 * 3)) + 0.25 * math.log(4 * 1 / (2 * 3)) + 0.25 * math.log(4 * 1 / (2 * 1))
    h_c_given_k = -(0.5 * math.log(2 / 3) + 0.25 * math.log(1 / 3) + 0.25 * math.log(1 / 1))
    assert ta.nmi(c1, c2) == pytest.approx(mi / ((h_c + h_k) / 2))
    assert ta.homogeneity(c1, c2) == pytest.approx(1 - h_c_given_k / h_c)
    # batched over two leading axes
    np.testing.assert_allclose(ta.nmi(np.array([[c1, c1]]), np.array([[c2, c1]])), [[mi / ((h_c + h_k) / 2), 1.0]])


def test_homogeneity_and_nmi_equal_scikit_learn_per_sample():
    """The batched metrics against scikit-learn's per-sample scores, edge cases included: one cluster on
    both sides (NMI 1), one cluster on one side, identical and relabelled clusterings, dropped patches (-1)."""
    from sklearn.metrics import homogeneity_score, normalized_mutual_info_score

    rng = np.random.default_rng(0)
    c1 = rng.integers(0, 16, (64, 49))
    c2 = rng.integers(-1, 24, (64, 49))
    c1[0], c2[0] = 0, 0
    c1[1], c2[1] = 0, np.arange(49) % 5
    c1[2], c2[2] = np.arange(49) % 7, (np.arange(49) % 7 + 3) % 7
    c1[3], c2[3] = np.arange(49) % 2, 0
    nmi_ref = [normalized_mutual_info_score(a, b, average_method="arithmetic") for a, b in zip(c1, c2)]
    hom_ref = [homogeneity_score(a, b) for a, b in zip(c1, c2)]
    np.testing.assert_allclose(ta.nmi(c1, c2), nmi_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ta.homogeneity(c1, c2), hom_ref, rtol=0, atol=1e-12)
    assert ta.nmi(c1, c2)[:4].tolist() == pytest.approx([1.0, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(ta.nmi(c1.reshape(8, 8, 49), c2.reshape(8, 8, 49)), np.reshape(nmi_ref, (8, 8)),
                               atol=1e-12)


# -------------------------------------------------------------------- averaged patterns and Pearson
def test_averaged_pattern_and_pearson():
    masks = np.array([[[1, 1, 0], [1, 0, 0]],  # image 1: stages passed 3, 2, 1
                      [[0, 1, 1], [0, 1, 0]]], bool)  # image 2: 1, 3, 2
    np.testing.assert_allclose(ta.averaged_pattern(masks), [2.0, 2.5, 1.5])
    assert ta.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert ta.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 10)), rng.normal(size=(3, 10))
    np.testing.assert_allclose(ta.pearson(a, b), [pearsonr(x, y).statistic for x, y in zip(a, b)])


# ---------------------------------------------------------------------------- feature alignment
def test_procrustes_and_cka():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 5))
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    y = 3.0 * x @ q + 1.5  # rotated, scaled, shifted
    assert ta.procrustes_distance(x, y) == pytest.approx(0.0, abs=1e-9)
    assert ta.cka(x, y) == pytest.approx(1.0)
    assert ta.procrustes_distance(x, np.pad(x, ((0, 0), (0, 2)))) == pytest.approx(0.0, abs=1e-9)  # other width
    # one feature each, on paper: centred unit vectors (1, 0, -1)/√2 and (1, -1, 0)/√2 have a·b = 1/2
    a, b = np.array([[1.0], [0.0], [-1.0]]), np.array([[2.0], [0.0], [1.0]])
    assert ta.procrustes_distance(a, b) == pytest.approx(2 - 2 * 0.5)
    assert ta.cka(a, b) == pytest.approx(0.5 ** 2)
    unrelated = rng.normal(size=(20, 5))
    assert 0.5 < ta.procrustes_distance(x, unrelated) <= 2.0
    np.testing.assert_allclose(ta.procrustes_distance(np.stack([x, x]), np.stack([y, x])), [0, 0], atol=1e-9)


def test_spearman_by_hand():
    # ranks 1 3 2 4 against 1 2 3 4: Σd² = 2, rho = 1 − 6·2 / (4·15) = 0.8
    rho, p = ta.spearman([1, 2, 3, 4], [10, 30, 20, 40])
    assert rho == pytest.approx(0.8) and 0 < p < 1
    rho, _ = ta.spearman([1, 2, 3], [5, 5, 5])
    assert math.isnan(rho)


# ------------------------------------------------------------------------------------- patterns
def small_vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=6, num_heads=3, num_classes=5).eval()


class LastK(td.Reducer):
    """Keep the last ``keep`` patch tokens (by current position)."""

    def forward(self, x, keep, inputs):
        n = x.shape[1] - inputs.state.num_prefix
        return inputs.state.select(x, torch.arange(n - keep, n).expand(x.shape[0], keep))


class PairMerge(td.Reducer):
    """Merge current tokens (2j, 2j+1) into token j."""

    def output_count(self, n_in, keep):
        return n_in // 2

    def forward(self, x, keep, inputs):
        n = x.shape[1] - inputs.state.num_prefix
        return inputs.state.merge(x, (torch.arange(n) // 2).expand(x.shape[0], n), n // 2)


def test_patterns_of_pruning_merging_and_idle_sites():
    model = small_vit()
    images = torch.randn(2, 3, 32, 32)
    td.attach(model, PairMerge(), blocks=[1], schedule=td.Constant(0.5), when="eval")  # 16 → 8 tokens
    td.attach(model, LastK(), blocks=[3], schedule=td.Constant(0.5), when="eval")  # 8 → 4: the last 4
    td.attach(model, LastK(), blocks=[4], schedule=td.Constant(1.0), when="eval")  # keeps all: no record
    with torch.no_grad():
        model(images)
    p = ta.site_patterns(model, 2)
    assert p.blocks == [1, 3, 4]
    pairs = [q // 2 for q in range(16)]
    last = [q // 2 - 4 if q >= 8 else -1 for q in range(16)]  # tokens 4..7 (patches 8..15) survive as 0..3
    assert p.labels[:, 0].tolist() == [pairs] * 2
    assert p.labels[:, 1].tolist() == [last] * 2
    assert p.labels[:, 2].tolist() == [last] * 2  # the idle site inherits
    even = [q % 2 == 0 for q in range(16)]  # representatives: the smaller patch of each pair
    assert p.keep[:, 0].tolist() == [even] * 2
    assert p.keep[:, 1].tolist() == [[e and q >= 8 for q, e in enumerate(even)]] * 2
    assert p.merged.tolist() == [[True, True, True]] * 2  # tokens still carry two patches
    assert p.kept.tolist() == [[8, 4, 4]] * 2


def test_pruning_keep_mask_is_assignment_and_collect_counts_hits():
    model = small_vit()
    td.attach(model, "topk", blocks=[2], schedule=td.Constant(0.25), when="eval")
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 0])
    with torch.no_grad():
        logits = model(images)
    rec = td.last_reduction(model).records[0]
    p = ta.site_patterns(model, 6)
    assert p.keep[:, 0].tolist() == (rec.assignment >= 0).tolist()
    assert not p.merged.any() and p.kept.tolist() == [[4]] * 6
    coll = ta.collect(model, [(images[:4], labels[:4]), (images[4:], labels[4:])], torch.device("cpu"), max_images=5)
    assert coll.patterns.keep.shape == (5, 1, 16) and coll.features.shape == (5, 48)
    assert coll.accuracy == pytest.approx(100 * (logits[:5].argmax(1) == labels[:5]).float().mean().item())


# --------------------------------------------------------------------------------- the commands
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random-weight hybrid_vit_tiny checkpoint on digits (8×8 = 64 patches, 4 blocks)."""
    from tokendrop.train.checkpoint import save_atomic
    from tokendrop.train.config import config_from_dict
    from tokendrop.train.trainer import build_run_model

    cfg = config_from_dict({"model": {"name": "hybrid_vit_tiny"}, "data": {"dataset": "digits", "workers": 0}})
    torch.manual_seed(0)
    model = build_run_model(cfg, 10, 1, 32)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_atomic({"model": model.state_dict(), "config": cfg.to_dict(), "epoch": 0}, path)
    return path


COMMON = ["--max-images", "8", "--batch-size", "8", "--no-progress"]
TWO = ["--methods", "topk", "topk:score=l2"]


def test_analyze_end_to_end(checkpoint, tmp_path):
    out = tmp_path / "an"
    assert main(["analyze", "--checkpoint", str(checkpoint), *TWO, "--keep-rates", "0.9", "0.5", *COMMON,
                 "--out", str(out)]) == 0
    rep = json.loads((out / "analysis.json").read_text())
    for name in ("keep_rate_consistency.png", "similarity_iou.png", "similarity_nmi.png", "averaged_patterns.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert rep["blocks"] == [1, 2, 3] and rep["images"] == 8 and rep["num_patches"] == 64
    runs = {(r["method"], r["keep_rate"]): r for r in rep["runs"]}
    assert runs["topk", 0.5]["kept"] == [32, 16, 8]  # int(64 · 0.5^s)
    assert runs["topk", 0.9]["kept"] == [57, 51, 46]
    # the unreduced accuracy, independently: the trainer's evaluation on the same 8 images
    from tokendrop.analysis.common import load_source
    from tokendrop.cli import build_parser
    from tokendrop.train.trainer import evaluate

    src = load_source(build_parser().parse_args(["analyze", "--checkpoint", str(checkpoint), "--set", "data.workers=0"]))
    assert rep["unreduced"]["accuracy"] == pytest.approx(evaluate(src.model, src.loader(8, 8), src.device, "off").acc)
    for row in rep["keep_rate_consistency"]:
        assert row["ioa_lower_bound"] - 1e-9 <= row["ioa"] <= 1.0
        if row["method"] == "topk:score=l2":
            assert row["ioa"] == 1.0  # whole rings at the lower rate lie inside those of the higher one
    stage1 = [r for r in rep["method_similarity"] if r["keep_rate"] == 0.9 and r["stage"] == 1][0]
    # topk keeps 57 and the ℓ2 rings 60 of 64 patches: at least 53 shared, union at most 64
    assert stage1["iou_lower_bound"] == pytest.approx(53 / 64) and stage1["iou"] >= 53 / 64
    assert [p["metric"] for p in rep["proxies"]] == ["iou", "nmi", "procrustes", "procrustes"]


def test_analyze_covers_every_registered_method_including_merging(checkpoint, tmp_path):
    register_reducer("test_pair_merge")(PairMerge)
    try:
        registered = list(td.REDUCERS)
        out = tmp_path / "an"
        assert main(["analyze", "--checkpoint", str(checkpoint), "--keep-rates", "0.5", *COMMON, "--max-images", "4",
                     "--out", str(out)]) == 0
    finally:
        _REDUCERS.pop("test_pair_merge")
    rep = json.loads((out / "analysis.json").read_text())
    assert rep["methods"] == registered and "test_pair_merge" in registered
    merge = [r for r in rep["runs"] if r["method"] == "test_pair_merge"][0]
    assert merge["merging_images"] == [1.0, 1.0, 1.0] and merge["kept"] == [32, 16, 8]
    assert merge["averaged_pattern"][0][:4] == [4.0, 1.0, 2.0, 1.0]  # patch 0 leads every merge; 2 only the first


def test_sweep_end_to_end(checkpoint, tmp_path):
    out = tmp_path / "sw"
    assert main(["sweep", "--checkpoint", str(checkpoint), *TWO, "--keep-rates", "0.4", "--sites", "1,2,3", "2",
                 "--rounds", "1", *COMMON, "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert (out / "sweep.png").read_bytes()[:8] == PNG_MAGIC
    assert len(rows) == 1 + 2 * 1 * 2 and rows[0]["method"] == "none"
    g = {(r["method"], r["blocks"]): float(r["gflops"]) for r in rows}
    for m in ("topk", "topk:score=l2"):
        assert g["none", ""] > g[m, "2"] > g[m, "1,2,3"]
    tokens = {(r["method"], r["blocks"]): r["tokens"] for r in rows}
    assert tokens["topk", "1,2,3"] == "25/10/4" and tokens["topk", "2"] == "25"  # int(64 · 0.4^s)
    # the Pareto flags, by brute force
    acc = [float(r["accuracy"]) for r in rows]
    for i, r in enumerate(rows):
        dominated = any(g2 <= float(r["gflops"]) and a2 >= acc[i] and (g2, a2) != (float(r["gflops"]), acc[i])
                        for g2, a2 in zip((float(q["gflops"]) for q in rows), acc))
        assert (r["pareto_gflops"] == "True") == (not dominated)
    assert all(float(r["images_per_s"]) > 0 for r in rows)
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["machine"]["date"] and len(meta["rows"]) == len(rows)


FINETUNE = ["--finetune-epochs", "1", "--finetune-set", "data.train_subset=64", "optim.batch_size=32", "optim.lr=3e-3",
            "data.val_subset=16", "run.threads=1"]


def _plain_accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * (model.eval()(images).argmax(1) == labels).float().mean().item()


def test_sweep_finetune_end_to_end_interrupted_resumed_reused(checkpoint, tmp_path, capsys, monkeypatch, one_thread):
    from tokendrop.train import trainer as trainer_mod
    from tokendrop.train.config import config_from_dict
    from tokendrop.train.data import build_datasets
    from tokendrop.train.trainer import build_run_model

    original, epochs_trained = trainer_mod.Trainer._train_epoch, []

    def counted(self, epoch):
        epochs_trained.append(self.out_dir.name)
        if epochs_trained == ["none", "topk_r0.7_b1-2-3"] and interrupt:
            raise KeyboardInterrupt  # Ctrl-C in the second point's epoch
        return original(self, epoch)

    monkeypatch.setattr(trainer_mod.Trainer, "_train_epoch", counted)
    out = tmp_path / "sw"
    argv = ["sweep", "--checkpoint", str(checkpoint), "--methods", "topk", "dynamicvit", "--keep-rates", "0.7",
            "--rounds", "1", "--max-images", "24", "--batch-size", "12", "--no-progress", *FINETUNE, "--out", str(out)]
    interrupt = True
    assert main(argv) == 130
    assert "same --out reuses the finished points" in capsys.readouterr().err
    assert (out / "finetune" / "none" / "last.pt").exists() and not (out / "sweep.csv").exists()
    none_stamp = (out / "finetune" / "none" / "last.pt").stat().st_mtime_ns
    interrupt, epochs_trained[:] = False, []
    assert main(argv) == 0  # resumed: the baseline reused, both points trained
    err = capsys.readouterr().err
    assert epochs_trained == ["topk_r0.7_b1-2-3", "dynamicvit_r0.7_b1-2-3"]
    assert err.count("sweep: fine-tune ") == 3 and err.count("reused ") == 1 and err.count("trained 1 epoch(s)") == 2
    assert (out / "finetune" / "none" / "last.pt").stat().st_mtime_ns == none_stamp
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(r["method"], r["keep_rate"], r["blocks"]) for r in rows] == [
        ("none", "1.0", ""), ("topk", "0.7", "1,2,3"), ("dynamicvit", "0.7", "1,2,3")]
    assert (out / "sweep.png").read_bytes()[:8] == PNG_MAGIC
    # every fine-tuned accuracy, independently: the saved last.pt rebuilt from its own config, a plain loop
    # over the sweep's 24 validation images (the first of the checkpoint's validation set)
    src_cfg = config_from_dict(torch.load(checkpoint, weights_only=False)["config"])
    val = build_datasets(src_cfg.data, src_cfg.augment, src_cfg.seed)[1]
    images = torch.stack([val[i][0] for i in range(24)])
    labels = torch.tensor([int(val[i][1]) for i in range(24)])
    start = torch.load(checkpoint, weights_only=False)["model"]
    changed = 0
    for row, name in zip(rows, ["none", "topk_r0.7_b1-2-3", "dynamicvit_r0.7_b1-2-3"]):
        ckpt = torch.load(out / "finetune" / name / "last.pt", weights_only=False)
        cfg = config_from_dict(ckpt["config"])
        assert ckpt["epoch"] == 0 and cfg.optim.epochs == 1  # the baseline as long as every point
        td_cfg = cfg.token_drop
        if name == "none":
            assert not td_cfg.enabled
        else:
            assert (td_cfg.enabled, td_cfg.reducer, td_cfg.keep_rate, td_cfg.blocks, td_cfg.when, td_cfg.relative_to) == (
                True, row["method"], 0.7, [1, 2, 3], "always", "original")
        assert not torch.equal(ckpt["model"]["head.weight"], start["head.weight"])  # it trained from the start weights
        model = build_run_model(cfg, 10, 1, 32)
        model.load_state_dict(ckpt["model"])
        assert float(row["accuracy_finetuned"]) == pytest.approx(_plain_accuracy(model, images, labels), abs=1e-4)
        changed += float(row["accuracy_finetuned"]) != float(row["accuracy"])
        # the ideal speed-up is the MAC ratio to the unreduced model
        assert float(row["ideal_speedup"]) == pytest.approx(float(rows[0]["gflops"]) / float(row["gflops"]), rel=1e-4)
        assert float(row["speedup"]) > 0
    assert changed  # the fine-tuned column is not the post-hoc one
    assert any(".token_site.reducer." in k for k in torch.load(out / "finetune" / "dynamicvit_r0.7_b1-2-3" / "last.pt",
                                                               weights_only=False)["model"])
    assert rows[1]["tokens_finetuned"] == rows[1]["tokens"] == "44/31/21"  # int(64 · 0.7^s)
    # the Pareto front is on the fine-tuned accuracy, by brute force
    pts = [(float(r["gflops"]), float(r["accuracy_finetuned"])) for r in rows]
    for r, (g, a) in zip(rows, pts):
        dominated = any(g2 <= g and a2 >= a and (g2, a2) != (g, a) for g2, a2 in pts)
        assert (r["pareto_gflops"] == "True") == (not dominated)
    # the same command again reuses every point: no epoch trained, nothing rewritten, the same numbers
    stamps = {p: p.stat().st_mtime_ns for p in (out / "finetune").rglob("*.pt")}
    epochs_trained.clear()
    assert main(argv) == 0
    assert epochs_trained == [] and capsys.readouterr().err.count("reused ") == 3
    assert {p: p.stat().st_mtime_ns for p in (out / "finetune").rglob("*.pt")} == stamps
    again = list(csv.DictReader((out / "sweep.csv").open()))
    assert [r["accuracy_finetuned"] for r in again] == [r["accuracy_finetuned"] for r in rows]
    # other fine-tune settings into the same --out: a one-line error naming --fresh, nothing written
    csv_stamp = (out / "sweep.csv").stat().st_mtime_ns
    assert main([*argv, "--finetune-set", "optim.lr=1e-4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optim.lr" in err[0] and "--fresh" in err[0], err
    assert (out / "sweep.csv").stat().st_mtime_ns == csv_stamp and epochs_trained == []
    assert {p: p.stat().st_mtime_ns for p in (out / "finetune").rglob("*.pt")} == stamps
    # other start weights (another checkpoint) into the same --out: the same
    other = tmp_path / "other.pt"
    ckpt = torch.load(checkpoint, weights_only=False)
    ckpt["model"]["head.bias"] = ckpt["model"]["head.bias"] + 1.0
    torch.save(ckpt, other)
    assert main([*argv[:2], str(other), *argv[3:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other weights" in err[0] and "--fresh" in err[0], err
    assert (out / "sweep.csv").stat().st_mtime_ns == csv_stamp and epochs_trained == []
    # --fresh deletes the earlier fine-tunes and trains again
    argv = [*argv[:2], str(other), *argv[3:]]
    argv[argv.index("dynamicvit")] = "--fresh"
    assert main(argv) == 0
    assert epochs_trained == ["none", "topk_r0.7_b1-2-3"]
    assert sorted(p.name for p in (out / "finetune").iterdir()) == ["none", "start.pt", "topk_r0.7_b1-2-3"]
    assert torch.equal(torch.load(out / "finetune" / "start.pt")["model"]["head.bias"], ckpt["model"]["head.bias"])


@pytest.mark.parametrize("args,flag", [
    (["--finetune-epochs", "-1"], "--finetune-epochs"),
    (["--finetune-epochs", "two"], "--finetune-epochs"),
    (["--finetune-epochs", "1", "--finetune-set", "optim.bogus=1"], "--finetune-set"),
    (["--finetune-epochs", "1", "--finetune-set", "lr=1e-4"], "--finetune-set"),
    (["--finetune-epochs", "1", "--finetune-set", "optim.lr=-1"], "--finetune-set"),
    (["--finetune-epochs", "1", "--finetune-set", "token_drop.keep_rate=0.5"], "--finetune-set"),
    (["--finetune-epochs", "1", "--finetune-set", "optim.epochs=3"], "--finetune-set"),
    (["--finetune-set", "optim.lr=1e-4"], "--finetune-set"),
    (["--fresh"], "--fresh"),
])
def test_sweep_bad_finetune_arguments_exit_2_and_write_nothing(checkpoint, tmp_path, capsys, args, flag):
    out = tmp_path / "out"
    assert main(["sweep", "--checkpoint", str(checkpoint), "--methods", "topk", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tokendrop sweep: error: {flag}"), err
    assert not out.exists()


def test_show_end_to_end(checkpoint, tmp_path):
    out = tmp_path / "maps.png"
    assert main(["show", "--checkpoint", str(checkpoint), *TWO, "--images", "2", "--keep-rate", "0.5",
                 "--no-progress", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("command", ["analyze", "sweep", "show"])
@pytest.mark.parametrize("args,flag", [
    (["--methods", "nope"], "--methods"),
    (["--methods", "topk:score=bogus"], "--methods"),
    (["--keep-rates", "0"], "--keep-rate"),
    (["--keep-rates", "1.5"], "--keep-rate"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_bad_arguments_exit_2_and_write_nothing(checkpoint, tmp_path, capsys, command, args, flag):
    if command == "show" and args[0] in ("--keep-rates", "--batch-size"):  # show's own names for a rate and a count
        args, flag = {"--keep-rates": (["--keep-rate", args[1]], flag), "--batch-size": (["--images", "0"], "--images")}[args[0]]
    out = tmp_path / "out"
    code = main([command, "--checkpoint", str(checkpoint), *args, "--out", str(out / "x.png" if command == "show" else out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and flag in err[0], err
    assert not out.exists()


def test_weights_from_ema_pretrained_or_random(checkpoint, tmp_path, capsys):
    from tokendrop.analysis.common import load_source
    from tokendrop.cli import build_parser
    from tokendrop.train.checkpoint import save_atomic
    from tokendrop.train.ema import build_ema

    ckpt = torch.load(checkpoint, weights_only=False)
    ema = build_ema(load_source(build_parser().parse_args(["show", "--checkpoint", str(checkpoint)])).model, 0.9, "torch_ema")
    with torch.no_grad():
        for p in ema.module.parameters():
            p.add_(1.0)
    path = tmp_path / "with_ema.pt"
    save_atomic({**ckpt, "ema": ema.state_dict()}, path)

    def weights(*argv):
        args = build_parser().parse_args(["show", *argv])
        src = load_source(args, int(args.seed))
        return src.model.state_dict()["head.weight"]

    torch.testing.assert_close(weights("--checkpoint", str(path)), ckpt["model"]["head.weight"])
    torch.testing.assert_close(weights("--checkpoint", str(path), "--ema"), ckpt["model"]["head.weight"] + 1.0)
    torch.testing.assert_close(weights("--model", "hybrid_vit_tiny", "--dataset", "digits", "--pretrained", str(checkpoint)),
                               ckpt["model"]["head.weight"])
    # random weights come from --seed (the fixture drew its weights after seed 0 too)
    torch.testing.assert_close(weights("--model", "hybrid_vit_tiny", "--dataset", "digits"), ckpt["model"]["head.weight"])
    assert not torch.equal(weights("--model", "hybrid_vit_tiny", "--dataset", "digits", "--seed", "1"),
                           ckpt["model"]["head.weight"])
    assert main(["show", "--model", "hybrid_vit_tiny", "--out", str(tmp_path / "x.png")]) == 2
    assert "--dataset: required with --model" in capsys.readouterr().err
    assert main(["show", "--checkpoint", str(checkpoint), "--ema", "--out", str(tmp_path / "x.png")]) == 2
    assert "--ema" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("command", ["analyze", "sweep", "show"])
def test_missing_checkpoint_and_bad_block_exit_2(checkpoint, tmp_path, capsys, command):
    out = tmp_path / "out"
    assert main([command, "--checkpoint", str(tmp_path / "none.pt"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--checkpoint" in err[0] and "does not exist" in err[0]
    flag = "--sites" if command == "sweep" else "--blocks"
    assert main([command, "--checkpoint", str(checkpoint), "--methods", "topk", flag, "4", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and "[0, 3]" in err[0]
    assert not out.exists()


def test_cli_arguments_import_no_torch():
    path = Path(ta.__file__).parent / "cli_args.py"
    code = (f"import runpy, sys; runpy.run_path({str(path)!r}); "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
