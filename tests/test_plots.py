"""Plots of metrics.csv."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tokendrop.train import plots

HEADER = ("epoch,train_loss,train_acc,val_loss_raw,val_acc_raw,val_loss_ema,val_acc_ema,lr,drop_ratio,"
          "kept_tokens,epoch_time_sec,train_imgs_per_sec")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_PLOTS = ["accuracy.png", "loss.png", "lr.png", "drop_ratio.png", "epoch_time.png"]


def write_run(run_dir: Path, epochs: int = 6, ema: bool = True, time_s: float = 10.0) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [HEADER]
    for e in range(epochs):
        ema_cells = f"{2.5 - 0.2 * e:.3f},{20 + 6 * e:.2f}" if ema else ","
        drop = min(0.35, 0.1 * e)
        rows.append(f"{e},{3.0 - 0.3 * e:.3f},{10 + 7 * e:.2f},{2.8 - 0.25 * e:.3f},{15 + 5 * e:.2f},{ema_cells},"
                    f"{4e-4 * (e + 1) / epochs:.6g},{drop:.3f},{round(64 * (1 - drop))},{time_s},{50000 / time_s:.1f}")
    (run_dir / "metrics.csv").write_text("\n".join(rows) + "\n")
    return run_dir


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_read_metrics(tmp_path):
    run = write_run(tmp_path / "r", epochs=3, ema=False)
    m = plots.read_metrics(run / "metrics.csv")
    assert list(m) == HEADER.split(",")
    assert m["epoch"] == [0.0, 1.0, 2.0]
    assert m["val_acc_raw"] == [15.0, 20.0, 25.0]
    assert all(math.isnan(v) for v in m["val_acc_ema"] + m["val_loss_ema"])
    assert plots.read_metrics(run)["train_acc"] == m["train_acc"]  # a directory is accepted too


@pytest.fixture
def drawn(monkeypatch):
    """Record, per saved file name, the labels of the lines drawn on the figure."""
    from matplotlib.figure import Figure

    seen: dict[str, list[str]] = {}
    save = Figure.savefig

    def spy(fig, fname, *args, **kwargs):
        seen[Path(fname).name] = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
        return save(fig, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return seen


@pytest.mark.parametrize("ema", [True, False])
def test_plot_run_writes_pngs(tmp_path, ema, drawn):
    import matplotlib.pyplot as plt

    run = write_run(tmp_path / ("ema" if ema else "raw"), ema=ema)
    paths = plots.plot_run(run)
    assert [p.name for p in paths] == RUN_PLOTS
    for p in paths:
        assert p.parent == run / "plots"
        assert_png(p)
    assert plt.get_fignums() == []  # every figure closed
    expected = ["train", "val (raw weights)"] + (["val (EMA weights)"] if ema else [])
    assert drawn["accuracy.png"] == expected and drawn["loss.png"] == expected
    assert drawn["drop_ratio.png"] == ["drop ratio", "kept tokens"]
    assert drawn["epoch_time.png"] == ["epoch time", "train images/s"]
    assert drawn["lr.png"] == ["learning rate"]


def test_kept_token_ticks_are_integers(tmp_path, monkeypatch):
    """A narrow range of token counts (47 to 48) would get ticks 47.2, 47.4, … by default."""
    from matplotlib.figure import Figure

    run = write_run(tmp_path / "narrow", epochs=4)
    text = (run / "metrics.csv").read_text().splitlines()
    rows = [r.split(",") for r in text[1:]]
    for i, r in enumerate(rows):
        r[9] = str(48 - i % 2)  # kept_tokens
    (run / "metrics.csv").write_text("\n".join([text[0]] + [",".join(r) for r in rows]) + "\n")
    ticks: dict[str, list[float]] = {}
    save = Figure.savefig

    def spy(fig, fname, *args, **kwargs):
        out = save(fig, fname, *args, **kwargs)
        ticks[Path(fname).name] = [t for t in fig.axes[-1].get_yticks()
                                   if fig.axes[-1].get_ylim()[0] <= t <= fig.axes[-1].get_ylim()[1]]
        return out

    monkeypatch.setattr(Figure, "savefig", spy)
    plots.plot_run(run)
    kept = ticks["drop_ratio.png"]
    assert len(kept) >= 2 and all(float(t).is_integer() for t in kept), kept


def test_plot_run_single_epoch(tmp_path):
    paths = plots.plot_run(write_run(tmp_path / "one", epochs=1))
    assert len(paths) == 5


def test_plot_run_with_compare(tmp_path):
    base = write_run(tmp_path / "baseline", ema=False, time_s=12.0)
    ptd = write_run(tmp_path / "ptd", ema=True, time_s=9.0)
    paths = plots.plot_run(ptd, compare=[base])
    assert [p.name for p in paths] == RUN_PLOTS + ["comparison.png"]
    assert_png(paths[-1])


def test_plot_comparison(tmp_path, drawn):
    runs = {"baseline": write_run(tmp_path / "b", epochs=8, ema=False, time_s=700.0),
            "PTD": write_run(tmp_path / "p", epochs=5, ema=True, time_s=500.0) / "metrics.csv"}
    out = plots.plot_comparison(runs, tmp_path / "cmp" / "comparison.png")
    labels = drawn["comparison.png"]
    # accuracy panel first (EMA when the run has it, else raw), then wall time (minutes past 10 min)
    assert labels == ["baseline (raw, best 50.00%)", "PTD (EMA, best 44.00%)", "baseline (93.3 min)", "PTD (41.7 min)"]
    assert out == tmp_path / "cmp" / "comparison.png"
    assert_png(out)
    with pytest.raises(ValueError):
        plots.plot_comparison({}, tmp_path / "x.png")


def test_missing_or_empty_metrics(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics"):
        plots.plot_run(tmp_path / "nothing")
    run = tmp_path / "empty"
    run.mkdir()
    (run / "metrics.csv").write_text("")
    with pytest.raises(ValueError, match="empty"):
        plots.plot_run(run)
    (run / "metrics.csv").write_text(HEADER + "\n")
    with pytest.raises(ValueError, match="no epochs"):
        plots.plot_run(run)
    assert not (run / "plots").exists() or not any((run / "plots").iterdir())


def write_tpc_run(run_dir: Path, epochs: int = 5) -> Path:
    """A run with TPC columns: 4 blocks, 50 tokens, halting moving earlier epoch by epoch."""
    write_run(run_dir, epochs=epochs)
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    depth, tokens = 4, 50
    head = [f"tpc_active_l{i}" for i in range(depth)] + [f"tpc_halted_l{i}" for i in range(depth)] + ["tpc_depth"]
    out = [lines[0] + "," + ",".join(head)]
    for e, line in enumerate(lines[1:]):
        halted = [0.0, 2.0 * e, 3.0 * e, tokens - 5.0 * e]
        active = [tokens - sum(halted[:i]) for i in range(depth)]
        mean = sum((i + 1) * h for i, h in enumerate(halted)) / tokens
        out.append(line + "," + ",".join(f"{v:g}" for v in (*active, *halted, mean)))
    (run_dir / "metrics.csv").write_text("\n".join(out) + "\n")
    return run_dir


def test_tpc_plots(tmp_path, monkeypatch):
    """A TPC run adds the per-block token curves (first and last epoch among them) and the halting-depth
    histogram of the last epoch, with integer ticks on the token axes."""
    from matplotlib.figure import Figure

    run = write_tpc_run(tmp_path / "tpc")
    seen: dict[str, Figure] = {}
    save = Figure.savefig

    def spy(fig, fname, *args, **kwargs):
        seen[Path(fname).name] = fig
        return save(fig, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    paths = plots.plot_run(run)
    assert [p.name for p in paths] == RUN_PLOTS + ["tpc_active.png", "tpc_depth.png"]
    for p in paths:
        assert_png(p)
    (ax,) = seen["tpc_active.png"].axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines) == ["epoch 0", "epoch 1", "epoch 2", "epoch 3", "epoch 4 (last)"]
    assert list(lines["epoch 4 (last)"].get_ydata()) == [50, 50, 42, 30]  # 50 − cumulative halted
    assert list(lines["epoch 0"].get_xdata()) == [0, 1, 2, 3]
    ax_h, ax_d = seen["tpc_depth.png"].axes
    assert [b.get_height() for b in ax_h.patches] == [0, 8, 12, 30]  # the last epoch's histogram
    assert [b.get_x() + b.get_width() / 2 for b in ax_h.patches] == [1, 2, 3, 4]  # depths 1..L
    assert ax_d.get_lines()[0].get_ydata()[-1] == pytest.approx((8 * 2 + 12 * 3 + 30 * 4) / 50)
    for axis in (ax.yaxis, ax_h.yaxis, ax_h.xaxis):
        lo, hi = axis.get_view_interval()
        ticks = [t for t in axis.get_ticklocs() if lo <= t <= hi]
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)


def test_tpc_plots_pick_at_most_six_epochs(tmp_path, drawn):
    plots.plot_run(write_tpc_run(tmp_path / "long", epochs=11))
    assert drawn["tpc_active.png"] == ["epoch 0", "epoch 2", "epoch 4", "epoch 6", "epoch 8", "epoch 10 (last)"]
