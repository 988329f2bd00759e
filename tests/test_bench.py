"""tokendrop bench: MAC counts against closed forms, paired timing arithmetic, the schedule projection
against a hand computation, a tiny end-to-end run and argument errors. No timing assertions."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import pytest
import torch

from tokendrop import build_model
from tokendrop.bench.probe import DropProbe, FixedBatchStep, StepSpec, build_train_step, config_model, input_batch
from tokendrop.bench.projection import drop_points, epoch_drop_ratios, project_schedule, steps_per_epoch, train_set_size
from tokendrop.bench.timing import PairedTiming, interleaved_rounds
from tokendrop.bench.command import add_arguments, run
from tokendrop.bench.flops import count_macs
from tokendrop.train.trainer import token_drop_schedule
from tokendrop.train.config import config_from_dict

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tokendrop bench")
    add_arguments(parser)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------ closed forms
def tiny_macs(kept: int | None, block: int, num_classes: int = 100, in_chans: int = 3) -> int:
    """hybrid_vit_tiny at 32 px by hand: stem 3→16 (s2) → 32 (s1) → 96 (s2), 8×8 = 64 patches + CLS,
    E = 96, 3 heads of 32, MLP 96→192→96, 4 blocks; an inside drop at ``block`` keeps ``kept`` patches,
    scoring them by the CLS row q_cls·Kᵀ (H·T·D MACs) when it drops any."""
    stem = 16 * in_chans * 9 * 16 * 16 + 32 * 16 * 9 * 16 * 16 + 96 * 32 * 9 * 8 * 8
    E, H, D, hidden = 96, 3, 32, 192

    def attn(n: int) -> int:
        return n * E * 3 * E + 2 * H * n * n * D + n * E * E

    def mlp(n: int) -> int:
        return n * E * hidden + n * hidden * E

    n = 65
    total = stem
    for b in range(4):
        total += attn(n)
        if b == block and kept is not None:
            total += H * n * D if kept < 64 else 0
            n = 1 + kept
        total += mlp(n)
    return total + E * num_classes


@pytest.mark.parametrize("block,drop,kept", [(0, 0.0, 64), (1, 0.25, 48), (3, 0.5, 32), (0, 0.35, 41)])
def test_macs_closed_form_and_counted(block, drop, kept):
    model = build_model("hybrid_vit_tiny", num_classes=100)
    probe = DropProbe(model, [block])
    probe.set(drop)
    assert probe.kept() == [kept]  # int(64 · (1 − d))
    assert probe.analytic_macs() == tiny_macs(kept, block)
    model.eval()
    counted = count_macs(model, torch.randn(2, 3, 32, 32)) // 2
    assert counted == tiny_macs(kept, block)  # FlopCounterMode sees the CLS-row saliency too


def test_seed_000_ideal_speedup_matches_design():
    probe = DropProbe(build_model("hybrid_vit_ptd", num_classes=100), [0])
    m0, m35 = probe.analytic_macs(0.0), probe.analytic_macs(0.35)
    assert probe.kept() == [166]
    assert m0 == pytest.approx(0.91e9, rel=0.01) and m35 == pytest.approx(0.61e9, rel=0.01)
    assert m0 / m35 == pytest.approx(1.49, abs=0.01)


# ------------------------------------------------------------------------------------ paired timing
def test_paired_timing_arithmetic():
    t = PairedTiming("base", [1.0, 1.0, 2.0, 2.0], {"v": [0.5, 1.0, 1.0], "w": [1.1, 1.1 * math.sqrt(2), 2.2]})
    # references: geometric means of the bracketing baselines = 1, √2, 2
    assert t.speedup("v") == pytest.approx(2.0)  # ratios 2, √2, 2
    assert t.overhead("w") == pytest.approx(0.1)  # every round 10 % slower
    assert t.speedup("base") == 1.0
    assert t.median("base") == 1.5 and t.median("v") == 1.0
    lo, hi = t.speedup_quartiles("v")
    assert lo <= t.speedup("v") <= hi


def test_interleaved_rounds_order():
    calls: list[str] = []
    fns = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    t = interleaved_rounds(fns, "a", rounds=3, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    timed = calls[3:]
    assert len(timed) == 3 * 3 + 1 and timed[-1] == "a"
    assert [timed[i] for i in (0, 3, 6, 9)] == ["a"] * 4  # every round starts with the baseline
    assert len(t.baseline) == 4 and all(len(v) == 3 for v in t.variants.values())
    with pytest.raises(ValueError, match="baseline"):
        interleaved_rounds(fns, "z", rounds=1)


# ----------------------------------------------------------------------------------- projection
TINY_CONFIG = {
    "model": {"name": "hybrid_vit_tiny", "drop_rate": 0.0, "drop_path_rate": 0.0},
    "data": {"dataset": "digits", "workers": 0},
    "augment": {"randaugment_ops": 0},
    "optim": {"epochs": 4, "batch_size": 100},
    "token_drop": {"enabled": True, "blocks": [0], "schedule": "curriculum", "start": 1, "end": 3,
                   "final": 0.5, "gamma": 1.0},
}


def test_projection_against_hand_computation():
    cfg = config_from_dict(TINY_CONFIG)
    schedule = token_drop_schedule(cfg)
    assert train_set_size(cfg) == 1347
    steps = steps_per_epoch(1347, 100, drop_last=False)
    assert steps == 14 and steps_per_epoch(1347, 100, drop_last=True) == 13
    epoch_drops = epoch_drop_ratios(schedule, cfg.optim.epochs)
    assert epoch_drops == [[0.0], [0.0], [0.25], [0.5]]  # d(t) for t = 0, 1, 2, 3
    model, kwargs = config_model(cfg)
    assert kwargs["num_classes"] == 10 and kwargs["in_chans"] == 1
    probe = DropProbe(model, cfg.token_drop.blocks)
    step_s = {0.0: 1.0, 0.25: 0.8, 0.5: 0.6}
    proj = project_schedule(probe, epoch_drops, step_s, steps, 100)
    # By hand: keeps 64, 64, 48, 32 patch tokens at block 0; one grey channel in, a 10-class head.
    macs = [tiny_macs(k, 0, 10, 1) for k in (64, 64, 48, 32)]
    assert proj.ideal_speedup == pytest.approx(4 * macs[0] / sum(macs), rel=1e-12)
    assert proj.predicted_s == pytest.approx(14 * (1.0 + 1.0 + 0.8 + 0.6))
    assert proj.no_drop_s == pytest.approx(14 * 4 * 1.0)
    assert proj.speedup == pytest.approx(4 / 3.4)
    assert [p["kept_tokens"] for p in proj.points] == [[64], [48], [32]]
    # Between measured points the step time is interpolated linearly in MACs.
    half = project_schedule(probe, [[0.25]], {0.0: 1.0, 0.5: 0.6}, 1, 100)
    m0, m25, m50 = (tiny_macs(k, 0, 10, 1) for k in (64, 48, 32))
    assert half.predicted_s == pytest.approx(0.6 + 0.4 * (m25 - m50) / (m0 - m50))
    with pytest.raises(ValueError, match="d = 0"):
        project_schedule(probe, epoch_drops, {0.5: 0.6}, steps, 100)


def test_drop_points_and_per_step():
    from tokendrop import Curriculum

    ed = epoch_drop_ratios(Curriculum(1, 3, final=0.5, gamma=1.0), 4, steps=2, per_step=True)
    assert ed == [[0.0, 0.0], [0.0, 0.125], [0.25, 0.375], [0.5, 0.5]]
    assert drop_points(ed, extra=[0.1, 0.2, 0.6]) == [0.0, 0.1, 0.2, 0.5]


# -------------------------------------------------------------------------------------- command
def test_command_tiny_run(tmp_path, capsys, restore_threads):
    cfg_path = tmp_path / "tiny.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(TINY_CONFIG))
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = run(parse(["--model", "hybrid_vit_tiny", "--batch-sizes", "2", "--drop-ratios", "0.5", "--rounds", "2",
                    "--warmup", "1", "--threads", "1", "--data-batches", "2", "--config", str(cfg_path),
                    "--device", "cpu", "--json", str(out), "--plot", str(png), "--no-progress"]))
    assert rc == 0
    report = json.loads(out.read_text())
    assert {"tool", "command", "machine", "settings", "notes", "rows", "overheads", "projections",
            "data_pipeline"} <= set(report)
    assert {"platform", "cpu", "torch_threads", "torch_version", "device", "date"} <= set(report["machine"])
    assert report["machine"]["torch_threads"] == 1 and report["machine"]["device"] == "cpu"
    rows = {r["drop_ratio"]: r for r in report["rows"]}
    assert set(rows) == {0.0, 0.5}
    base, drop = rows[0.0], rows[0.5]
    assert drop["kept_tokens"] == [32] and base["kept_tokens"] == [64]
    assert base["ideal_speedup"] == 1.0 and drop["ideal_speedup"] > 1.0
    assert drop["ideal_train_speedup"] > 1.0
    for r in (base, drop):
        assert r["macs_agreement_pct"] < 2.0
        for mode in ("train", "infer"):
            t = r[mode]
            assert t["median_s"] > 0 and t["images_per_s"] > 0 and t["speedup"] > 0
        assert r["train_efficiency"] == pytest.approx(r["train"]["speedup"] / r["ideal_speedup"])
        assert r["peak_memory_mb"] > 0
    assert base["train"]["speedup"] == 1.0 and base["memory_vs_no_drop"] == 1.0
    (o,) = report["overheads"]
    assert o["step_median_s"] > 0 and o["explicit_over_ours"] > 0 and math.isfinite(o["saliency_overhead_pct"])
    (p,) = report["projections"]
    assert p["epochs"] == 4 and p["batch_size"] == 100 and p["measured_batch_size"] == 2
    macs = [tiny_macs(k, 0, 10, 1) for k in (64, 64, 48, 32)]
    assert p["ideal_speedup"] == pytest.approx(4 * macs[0] / sum(macs))
    assert p["predicted_s"] > 0 and p["speedup"] > 0
    (d,) = report["data_pipeline"]
    assert d["images_per_s"] > 0 and d["source"] == "digits" and d["bound_by"] in ("model", "data pipeline")
    assert png.read_bytes()[:8] == PNG_MAGIC
    stdout = capsys.readouterr().out
    assert "hybrid_vit_tiny" in stdout and "projection" in stdout


def test_config_block_out_of_range(tmp_path, capsys):
    import yaml

    cfg_path = tmp_path / "bad.yaml"
    cfg_path.write_text(yaml.safe_dump({**TINY_CONFIG, "token_drop": {**TINY_CONFIG["token_drop"], "blocks": [4]}}))
    assert run(parse(["--model", "hybrid_vit_tiny", "--config", str(cfg_path)])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--config" in err[0] and "token_drop.blocks" in err[0]


@pytest.mark.parametrize("argv,flag", [
    (["--model", "no_such_vit"], "--model"),
    (["--drop-ratios", "1.0"], "--drop-ratios"),
    (["--drop-ratios", "-0.1"], "--drop-ratios"),
    (["--drop-ratios", "abc"], "--drop-ratios"),
    (["--blocks", "4"], "--blocks"),
    (["--blocks", "-1"], "--blocks"),
    (["--batch-sizes", "0"], "--batch-sizes"),
    (["--device", "quantum"], "--device"),
    (["--config", "no_such_config_name"], "--config"),
    (["--rounds", "0"], "--rounds"),
    (["--amp", "fp16"], "--amp"),
    (["--clip-grad", "-1"], "--clip-grad"),
    (["--ema", "ema"], "--ema"),
])
def test_bad_arguments(argv, flag, capsys):
    rc = run(parse(["--model", "hybrid_vit_tiny", "--no-progress", *argv] if argv[0] != "--model" else
                   [*argv, "--no-progress"]))
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and "error" in err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is absent")
def test_missing_cuda_is_a_usage_error(capsys):
    assert run(parse(["--model", "hybrid_vit_tiny", "--device", "cuda"])) == 2
    assert "--device" in capsys.readouterr().err


def test_reducer_option_benchmarks_any_method(tmp_path, capsys, restore_threads):
    out = tmp_path / "bench.json"
    rc = run(parse(["--model", "hybrid_vit_tiny", "--batch-sizes", "2", "--drop-ratios", "0.5", "--rounds", "1",
                    "--warmup", "0", "--threads", "1", "--skip", "memory", "overheads", "data", "--reducer", "topk",
                    "--device", "cpu", "--reducer-args", "{score: l2}", "--json", str(out), "--no-progress"]))
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["settings"]["reducer"] == "topk" and report["settings"]["reducer_args"] == {"score": "l2"}
    drop = {r["drop_ratio"]: r for r in report["rows"]}[0.5]
    # the radial score acts before block 0, so block 0's attention already sees the ring it keeps
    assert drop["kept_tokens"] == [32] and drop["macs_agreement_pct"] < 2.0
    assert run(parse(["--model", "hybrid_vit_tiny", "--reducer", "nope"])) == 2
    assert "--reducer: reducer: unknown method 'nope'" in capsys.readouterr().err
    assert run(parse(["--model", "hybrid_vit_tiny", "--reducer-args", "{scroe: l2}"])) == 2
    assert "no argument 'scroe'" in capsys.readouterr().err


def test_tome_table_counts_and_ideal(tmp_path, restore_threads):
    """ToMe's r table: tokens leaving the last block follow the official cap (at most half the patch tokens
    per block), the ideal is the ratio of analytic MACs, and r = 0 is the baseline of the paired timing."""
    model = build_model("hybrid_vit_tiny", num_classes=10)  # 4 blocks, 64 patch tokens at 32 px
    out = tmp_path / "tome.json"
    assert run(parse(["--model", "hybrid_vit_tiny", "--tome-r", "6", "20", "--batch-sizes", "2", "--rounds", "1",
                      "--warmup", "0", "--threads", "1", "--json", str(out), "--no-progress"])) == 0
    rows = {r["r"]: r for r in json.loads(out.read_text())["tome"]}
    assert sorted(rows) == [0, 6, 20]

    def tokens_out(r: int) -> int:
        n = model.patch_embed.num_patches
        for _ in model.blocks:
            n -= min(r, n // 2)
        return 1 + n

    assert [rows[r]["tokens_out"] for r in (0, 6, 20)] == [tokens_out(0), tokens_out(6), tokens_out(20)] == [65, 41, 7]
    for r in (6, 20):
        assert rows[r]["ideal_speedup"] == pytest.approx(rows[0]["macs_analytic"] / rows[r]["macs_analytic"])
        assert rows[r]["macs_analytic"] < rows[0]["macs_analytic"]
    assert rows[0]["timing"]["speedup"] == 1.0 and rows[0]["ideal_speedup"] == 1.0


def test_tome_table_rejects_negative_r(capsys):
    assert run(parse(["--model", "hybrid_vit_tiny", "--tome-r", "-1", "--no-progress"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tome-r" in err[0]


# ------------------------------------------------------------------------------- the training step
STEP_CONFIG = {
    "seed": 3,
    "model": {"name": "hybrid_vit_tiny", "drop_rate": 0.0, "drop_path_rate": 0.0},
    "data": {"dataset": "synthetic", "workers": 0, "synthetic": {"classes": 10, "train_images": 32, "val_images": 8}},
    "augment": {"randaugment_ops": 0},
    "optim": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "warmup_epochs": 0, "clip_grad": 0.5, "label_smoothing": 0.1},
    "ema": {"enabled": True, "decay": 0.99, "warmup": "torch_ema"},
    "token_drop": {"enabled": True, "blocks": [1], "schedule": "constant", "keep_rate": 0.5},
}


def test_bench_step_is_the_trainers(tmp_path):
    """Three steps of the bench's step and of the step the trainer built, from the same weights on the same
    batch: identical parameters, EMA weights and loss sums."""
    import copy

    from tokendrop.train.trainer import Trainer

    cfg = config_from_dict(STEP_CONFIG)
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.setup()
    device = torch.device("cpu")
    ours = build_train_step(copy.deepcopy(trainer.model), StepSpec.from_config(cfg), device)
    images, targets = input_batch(trainer.model, 8, device, seed=1)
    theirs = trainer.train_step
    assert [(g["role"], g["lr"], g["weight_decay"], g["fused"]) for g in ours.optimizer.param_groups] == \
        [(g["role"], g["lr"], g["weight_decay"], g["fused"]) for g in theirs.optimizer.param_groups]
    bench_step = FixedBatchStep(ours, images, targets)
    for _ in range(3):
        bench_step()
        theirs.net.train()
        theirs(images, targets)
    assert ours.poll().loss_sum == theirs.poll().loss_sum
    for a, b in zip(ours.model.parameters(), theirs.model.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ours.ema.module.parameters(), theirs.ema.module.parameters(), strict=True):
        assert torch.equal(a, b)


def _steps(spec: StepSpec, steps: int = 3) -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    model = build_model("hybrid_vit_tiny", num_classes=10)
    step = build_train_step(model, spec, torch.device("cpu"))
    fixed = FixedBatchStep(step, *input_batch(model, 4, torch.device("cpu")))
    for _ in range(steps):
        fixed()
    return model, step


def _grad_norm(model: torch.nn.Module) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])))


def test_step_options_change_what_runs():
    model, step = _steps(StepSpec())
    assert step.ema is None and step.amp == "auto"
    free = _grad_norm(model)
    clipped, _ = _steps(StepSpec(clip_grad=free / 10))
    assert _grad_norm(clipped) == pytest.approx(free / 10, rel=1e-4)  # the last step's gradients, clipped
    for rule in ("torch_ema", "none"):
        model, step = _steps(StepSpec(ema=rule))
        assert step.ema is not None
        assert any(not torch.equal(a, b) for a, b in zip(step.ema.module.parameters(), model.parameters()))
    _, fp32 = _steps(StepSpec(amp="off"), 1)
    _, bf16 = _steps(StepSpec(amp="bf16"), 1)
    assert fp32.poll().loss_sum != bf16.poll().loss_sum


def test_memory_probe_builds_the_same_step():
    from tokendrop.bench.memory import MemorySpec, _build_for_memory

    spec = StepSpec(clip_grad=0.25, ema="torch_ema")
    fixed = _build_for_memory(MemorySpec("hybrid_vit_tiny", {"num_classes": 10}, batch_size=2,
                                         step=dataclasses.asdict(spec)), torch.device("cpu"))
    assert fixed.step.max_norm == 0.25 and fixed.step.ema is not None and fixed.step.optimizer.defaults["fused"]


def test_step_flags_in_report(tmp_path, capsys, restore_threads):
    out = tmp_path / "bench.json"
    rc = run(parse(["--model", "hybrid_vit_tiny", "--batch-sizes", "2", "--drop-ratios", "0.5", "--rounds", "1",
                    "--warmup", "0", "--threads", "1", "--skip", "memory", "overheads", "counts", "inference",
                    "--device", "cpu", "--clip-grad", "0.5", "--ema", "torch_ema", "--amp", "off", "--compile",
                    "--json", str(out), "--no-progress"]))
    assert rc == 0
    settings = json.loads(out.read_text())["settings"]
    assert settings["train_step"] | {"clip_grad": 0.5, "ema": "torch_ema", "amp": "off"} == settings["train_step"]
    captured = capsys.readouterr()
    assert "clip-grad 0.5, EMA torch_ema" in captured.out and "compile off" in captured.out
    assert captured.err.count("notice: --compile") == 1
