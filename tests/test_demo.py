"""The demo: its speed-up judgement (pure) and its handling of an existing output folder (digits, CPU)."""

import csv
import math
import re
from pathlib import Path

import pytest

from tokendrop.cli import main
from tokendrop.train import demo
from tokendrop.train import trainer as trainer_mod

# Per-epoch training times of a consistent pair: both runs drop nothing in epochs 1-2 (ratio ~1), then the
# PTD run gets faster as its curriculum drops more tokens, by less than the arithmetic allows.
BASE = [10.1, 9.9, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0]
PTD = [10.0, 10.0, 9.9, 9.6, 9.2, 8.6, 8.0, 8.0]
SAME = [True, True, False, False, False, False, False, False]
IDEAL = 1.14


def test_consistent_times_are_reported():
    check = demo.check_speedup(BASE, PTD, SAME, IDEAL)
    assert check.verdict == "ok"
    assert check.speedup == pytest.approx(80.0 / 73.3)
    assert check.noise == pytest.approx(0.1 / 9.9)  # epoch 2: 10.0 s against 9.9 s
    line = demo.speedup_report(check)
    assert line.startswith("PTD training speed-up: measured 1.09×") and "±0.01" in line and "1.14×" in line


def test_slow_baseline_epoch_is_flagged_not_reported():
    base = list(BASE)
    base[6] = 60.0  # the machine was busy during one baseline epoch after the curriculum started
    check = demo.check_speedup(base, PTD, SAME, IDEAL)
    assert check.speedup == pytest.approx(130.0 / 73.3) and check.verdict == "above-ideal"
    line = demo.speedup_report(check)
    assert line.startswith("WARNING: measured 1.77× exceeds the arithmetic ideal 1.14×") and "busy" in line


@pytest.mark.parametrize("slow_run", ["baseline", "ptd"])
def test_busy_epoch_with_identical_work_shows_as_noise(slow_run):
    base, ptd = list(BASE), list(PTD)
    (base if slow_run == "baseline" else ptd)[0] = 30.0  # a busy spell in an epoch where both do the same work
    check = demo.check_speedup(base, ptd, SAME, IDEAL)
    assert check.noise == pytest.approx(abs(base[0] - ptd[0]) / min(base[0], ptd[0]))
    assert check.verdict == "noisy"
    assert demo.speedup_report(check).startswith("WARNING: timings too noisy")


def test_check_speedup_rejects_unpaired_times():
    with pytest.raises(ValueError, match="one baseline time"):
        demo.check_speedup([1.0, 2.0], [1.0], [True], IDEAL)


def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def epochs_trained(err: str) -> list[str]:
    """'run epoch' from the trainers' per-epoch lines, in the order they were printed."""
    words = [line.split() for line in err.splitlines()]
    return [f"{w[0]} {w[2]}" for w in words if len(w) > 2 and w[0] in demo.DEMO_RUNS and w[1] == "epoch"
            and re.fullmatch(r"\d+/\d+", w[2])]  # not the progress bars ("1/2:")


def demo_args(out, *extra):
    return ["demo", "--out", str(out), "--train-subset", "256", "--epochs", "2", *extra]


TINY = ["data.workers=0", "run.threads=1", "optim.batch_size=64", "optim.eval_batch_size=450", "run.device=cpu"]


@pytest.fixture
def digits_demo(monkeypatch):
    """The demo on scikit-learn's digits (all 450 validation images), sized for a test."""
    load = demo.load_config
    monkeypatch.setattr(demo, "_pick_dataset", lambda: "digits")
    monkeypatch.setattr(demo, "load_config", lambda name, overrides=(): load(name, [*overrides, *TINY]))


def test_demo_interleaves_reuses_resumes_and_starts_fresh(digits_demo, tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    original = trainer_mod.Trainer._train_epoch

    def interrupted(self, epoch):  # stop in the PTD run's second epoch, after the baseline's
        if epoch == 1 and self.cfg.token_drop.enabled:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(trainer_mod.Trainer, "_train_epoch", interrupted)
    assert main(demo_args(out)) == 130
    assert (len(metrics(out / "baseline")), len(metrics(out / "ptd"))) == (2, 1)
    capsys.readouterr()
    monkeypatch.setattr(trainer_mod.Trainer, "_train_epoch", original)

    assert main(demo_args(out)) == 0
    captured = capsys.readouterr()
    assert f"baseline: reusing the complete run in {out / 'baseline'}" in captured.err
    assert f"ptd: resuming {out / 'ptd'} after epoch 1/2" in captured.err
    assert epochs_trained(captured.err) == ["ptd 2/2"]  # only the PTD run's second epoch was left

    # a complete folder is reused: nothing retrained or rewritten, the same numbers reprinted
    files = {p: p.read_bytes() for p in out.rglob("*.pt")}
    summary = demo.run_demo(out, epochs=2, train_subset=256)
    assert "reusing the complete run" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*.pt")} == files
    base, ptd = metrics(out / "baseline"), metrics(out / "ptd")
    expected = sum(float(r["epoch_time_sec"]) for r in base) / sum(float(r["epoch_time_sec"]) for r in ptd)
    assert summary["ptd"]["speedup"] == pytest.approx(expected)
    b0, p0 = float(base[0]["epoch_time_sec"]), float(ptd[0]["epoch_time_sec"])  # the one epoch without drop
    assert summary["ptd"]["speedup_noise"] == pytest.approx(abs(b0 - p0) / min(b0, p0))
    assert math.isfinite(summary["ptd"]["ideal_speedup"]) and summary["ptd"]["ideal_speedup"] > 1

    # other settings: the error names the way out, and nothing is touched
    assert main(demo_args(out, "--epochs", "3", "--train-subset", "128")) == 1
    err = capsys.readouterr().err
    assert "differs in: data.train_subset, optim.epochs" in err and "--fresh" in err and "--out" in err
    assert {p: p.read_bytes() for p in out.rglob("*.pt")} == files

    # --fresh deletes only the demo's own runs and trains again, interleaved
    (out / "notes.txt").write_text("mine")
    assert main(demo_args(out, "--epochs", "3", "--train-subset", "128", "--fresh")) == 0
    err = capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    assert [len(metrics(out / name)) for name in ("baseline", "ptd")] == [3, 3]
    assert epochs_trained(err) == ["baseline 1/3", "ptd 1/3", "baseline 2/3", "ptd 2/3", "baseline 3/3", "ptd 3/3"]
