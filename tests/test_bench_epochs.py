"""tokendrop bench --epochs-timed: the verdict on constructed numbers, the per-drop-ratio config, a tiny
end-to-end run on synthetic data and argument errors. No timing assertions."""

from __future__ import annotations

import json

import pytest
import torch

from tokendrop.bench.command import run
from tokendrop.bench.epochs import (ARITHMETIC_GAIN_FRACTION, DATA_BOUND_FRACTION, STEP_HEADROOM,
                                    constant_drop_config, final_drop_ratio, verdict)
from tokendrop.train.config import load_config
from tokendrop.train.trainer import token_drop_schedule

from test_bench import parse

TINY = ["data.dataset=synthetic", "data.synthetic.channels=1", "data.synthetic.size=28", "data.synthetic.classes=10",
        "data.synthetic.train_images=64", "data.synthetic.val_images=16", "data.workers=0", "optim.batch_size=16",
        "optim.eval_batch_size=16"]


def test_verdict_outcomes():
    # epochs at the data rate, far below the step: the pipeline bounds them
    assert verdict(data_rate=1000, step_rate=3000, epoch_rate=950, step_speedup=1.4, ideal_speedup=1.5).kind == "data-bound"
    # epochs well below the data rate; the step gains 0.05 of an ideal 0.5
    v = verdict(data_rate=10_000, step_rate=1000, epoch_rate=900, step_speedup=1.05, ideal_speedup=1.5)
    assert v.kind == "launch/overhead-bound" and "1.050×" in v.reason and "1.500×" in v.reason
    # the step realises 80 % of the ideal gain
    assert verdict(10_000, 1000, 900, 1.4, 1.5).kind == "arithmetic-bound"
    # at the thresholds
    gain = 1 + ARITHMETIC_GAIN_FRACTION * 0.5
    assert verdict(10_000, 1000, 900, gain, 1.5).kind == "arithmetic-bound"
    assert verdict(10_000, 1000, 900, gain - 1e-6, 1.5).kind == "launch/overhead-bound"
    # near the data rate but also at the step's rate: not data-bound (the model is what limits)
    assert verdict(1000, 1000, 900, 1.0, 1.5).kind == "launch/overhead-bound"
    assert verdict(1000, 1.01 * 900 / STEP_HEADROOM, 900, 1.0, 1.5).kind == "data-bound"
    assert verdict(1000, 1000, 0.99 * 1000 * DATA_BOUND_FRACTION, 1.0, 1.5).kind == "launch/overhead-bound"


def test_constant_drop_config():
    cfg = load_config("fashion_mnist_ptd")
    assert final_drop_ratio(cfg) == 0.35
    assert final_drop_ratio(load_config("fashion_mnist_ptd", ["token_drop.schedule=constant",
                                                               "token_drop.keep_rate=0.7"])) == 0.3
    fixed = constant_drop_config(cfg, 0.35, 3, torch.device("cpu"))
    assert [token_drop_schedule(fixed)(e) for e in (0, 2)] == [pytest.approx(0.35)] * 2
    assert fixed.optim.epochs == 3 and fixed.data.val_subset == cfg.optim.eval_batch_size and not fixed.data.download
    assert fixed.optim.clip_grad == cfg.optim.clip_grad and fixed.ema == cfg.ema  # the step is the config's
    off = constant_drop_config(load_config("fashion_mnist_baseline"), 0.0, 1, torch.device("cpu"))
    assert off.token_drop.enabled and token_drop_schedule(off)(0) == 0.0


def test_epochs_timed_end_to_end(tmp_path, capsys, restore_threads):
    out = tmp_path / "epochs.json"
    argv = ["--config", "fashion_mnist_ptd", *[x for s in TINY for x in ("--set", s)], "--epochs-timed", "1",
            "--rounds", "1", "--warmup", "0", "--data-batches", "1", "--threads", "1", "--device", "cpu",
            "--json", str(out), "--no-progress"]
    assert run(parse(argv)) == 0
    report = json.loads(out.read_text())
    assert "--epochs-timed 1" in report["command"] and report["settings"]["warmup_epochs"] == 1
    (e,) = report["epochs"]
    assert e["config"] == "fashion_mnist_ptd" and e["train_images"] == 64 and e["epochs_timed"] == 1
    base, drop = e["rows"]
    assert (base["drop_ratio"], drop["drop_ratio"]) == (0.0, 0.35)
    assert (base["kept_tokens"], drop["kept_tokens"]) == (49, 31)  # 7 × 7 patches, int(49 · 0.65)
    assert base["speedup"] == 1.0 and base["ideal_speedup"] == 1.0 and drop["ideal_speedup"] > 1.2
    for r in e["rows"]:
        assert len(r["epoch_imgs_per_s"]) == 1 and r["imgs_per_s"] > 0 and r["step_imgs_per_s"] > 0
    assert drop["speedup"] > 0 and drop["step_speedup"] > 0 and e["data"]["images_per_s"] > 0
    assert e["verdict"]["kind"] in ("data-bound", "launch/overhead-bound", "arithmetic-bound")
    assert "clip-grad 1, EMA torch_ema (decay 0.999)" in e["train_step"]
    stdout = capsys.readouterr().out
    assert f"verdict fashion_mnist_ptd: {e['verdict']['kind']}" in stdout and "data pipeline alone" in stdout


@pytest.mark.parametrize("argv,flag", [
    (["--epochs-timed", "0", "--config", "fashion_mnist_ptd"], "--epochs-timed"),
    (["--epochs-timed", "1.5", "--config", "fashion_mnist_ptd"], "--epochs-timed"),
    (["--epochs-timed", "1"], "--epochs-timed"),
    (["--epochs-timed", "1", "--config", "fashion_mnist_ptd", "--drop-ratios", "0.2", "0.3"], "--drop-ratios"),
    (["--epochs-timed", "1", "--config", "fashion_mnist_ptd", "--ema", "torch_ema"], "--ema"),
    (["--epochs-timed", "1", "--config", "fashion_mnist_ptd", "--model", "hybrid_vit_tiny"], "--model"),
    (["--epochs-timed", "1", "--config", "fashion_mnist_baseline"], "--drop-ratios"),
])
def test_bad_epochs_arguments(argv, flag, capsys):
    assert run(parse([*argv, "--no-progress"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and "error" in err[0]


def test_the_data_rate_is_the_pipeline_the_trainer_uses():
    """With data.pipeline=gpu the batches are made on the device: that loader is timed, without workers."""
    from tokendrop.bench.pipeline import data_throughput
    from tokendrop.train.config import config_from_dict

    base = {"data": {"dataset": "synthetic", "workers": 0, "synthetic": {"train_images": 64, "val_images": 8, "size": 16}},
            "augment": {"mixup_alpha": 0.0, "cutmix_alpha": 0.0}, "optim": {"batch_size": 16}, "run": {"device": "cpu"}}
    on_device = data_throughput(config_from_dict({**base, "data": {**base["data"], "pipeline": "gpu"}}), batches=3)
    workers = data_throughput(config_from_dict({**base, "data": {**base["data"], "pipeline": "cpu"}}), batches=3)
    assert on_device.source.endswith("batches made on cpu") and on_device.workers == 0 and on_device.images_per_s > 0
    assert "made on" not in workers.source and workers.images_per_s > 0
