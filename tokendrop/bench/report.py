"""The output of ``tokendrop bench``: the stdout table of a report and its plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["format_epochs", "format_report", "format_tpc", "plot_report"]


def _f(v: Any, fmt: str, width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}{fmt}}"


def format_report(report: dict) -> str:
    """The stdout table of a report."""
    m = report["machine"]
    lines = [f"tokendrop bench — {m['device']}, {m['cpu']}, {m['torch_threads']} threads, torch {m['torch_version']}, "
             f"{m['date']}",
             "speed-ups: median of paired ratios against d = 0 (interleaved rounds); min×: ratio of the fastest steps; "
             "MACs per image, forward; inference rows run the reducer (PTD itself evaluates with all tokens)", ""]
    if "tpc" in report:
        return "\n".join([lines[0], "", *format_tpc(report["tpc"])])
    if "epochs" in report:
        return "\n".join([lines[0], *(x for e in report["epochs"] for x in ["", *format_epochs(e)])])
    if "train_step_description" in report["settings"]:
        lines.insert(2, f"training step: {report['settings']['train_step_description']}")
    head = (f"{'model':<16}{'blk':>4}{'bs':>5}{'d':>6}{'kept':>6}{'train ms':>10}{'img/s':>8}{'ideal':>7}{'train×':>8}"
            f"{'eff':>6}{'min×':>7}{'infer ms':>10}{'infer×':>8}{'eff':>6}{'GMAC cnt':>10}{'GMAC ana':>10}{'diff%':>7}"
            f"{'mem MB':>9}{'mem/0':>7}")
    lines += [head, "-" * len(head)]
    for r in report["rows"]:
        tr, inf = r["train"] or {}, r["infer"] or {}
        lines.append(
            f"{r['model']:<16}{','.join(map(str, r['blocks'])):>4}{r['batch_size']:>5}{r['drop_ratio']:>6.2f}"
            f"{','.join(map(str, r['kept_tokens'])):>6}"
            f"{_f(tr.get('median_s') and 1e3 * tr['median_s'], '.1f', 10)}{_f(tr.get('images_per_s'), '.1f', 8)}"
            f"{r['ideal_speedup']:>7.3f}{_f(tr.get('speedup'), '.3f', 8)}{_f(r['train_efficiency'], '.2f', 6)}"
            f"{_f(tr.get('speedup_of_minima'), '.3f', 7)}"
            f"{_f(inf.get('median_s') and 1e3 * inf['median_s'], '.1f', 10)}{_f(inf.get('speedup'), '.3f', 8)}"
            f"{_f(r['infer_efficiency'], '.2f', 6)}"
            f"{_f(r['macs_counted'] and r['macs_counted'] / 1e9, '.4f', 10)}{r['macs_analytic'] / 1e9:>10.4f}"
            f"{_f(r['macs_agreement_pct'], '.2f', 7)}{_f(r['peak_memory_mb'], '.0f', 9)}{_f(r['memory_vs_no_drop'], '.2f', 7)}")
    if report["overheads"]:
        lines += ["", "overheads (training step, median paired ratio):"]
        for o in report["overheads"]:
            lines.append(f"  {o['model']} bs {o['batch_size']}: saliency at d = 0 (block {o['block']}) "
                         f"{o['saliency_overhead_pct']:+.2f} % of the step; explicit softmax(QKᵀ) attention step / ours "
                         f"= {o['explicit_over_ours']:.3f} ({1e3 * o['explicit_step_median_s']:.1f} vs "
                         f"{1e3 * o['step_median_s']:.1f} ms)")
    for p in report["projections"]:
        lines += ["", f"projection {p['config']} ({p['model']}, blocks {p['blocks']}, {p['schedule']}, "
                      f"{p['epochs']} epochs × {p['steps_per_epoch']} steps at batch {p['batch_size']}):"]
        for pt in p["points"]:
            lines.append(f"  d = {pt['drop_ratio']:.3f}: kept {pt['kept_tokens']}, {pt['macs_per_image'] / 1e9:.4f} GMAC, "
                         f"{pt['step_s']:.3f} s/step")
        lines.append(f"  predicted {p['predicted_hours']:.2f} h against {p['no_drop_hours']:.2f} h without drop: "
                     f"{p['speedup']:.3f}× (ideal {p['ideal_speedup']:.3f}×)")
        for n in p["notes"]:
            lines.append(f"  note: {n}")
    if report.get("tome"):
        from .tome_table import ToMeRow, format_table
        from .timing import Timing

        lines += ["", "ToMe: r tokens merged in every block, inference, speed-up against r = 0 (median of paired ratios):",
                  format_table([ToMeRow(**(r | {"timing": Timing(**r["timing"])})) for r in report["tome"]])]
    for d in report["data_pipeline"]:
        lines += ["", f"data pipeline {d['config']}: {d['images_per_s']:.0f} images/s with {d['workers']} workers "
                      f"({d['source']}); model {d['model_images_per_s_min']:.0f}–{d['model_images_per_s_max']:.0f} images/s "
                      f"over the schedule → bound by the {d['bound_by']}"]
    return "\n".join(lines)


def format_tpc(t: dict) -> list[str]:
    """The stdout lines of a ``--tpc`` result."""
    g, p = t["gmacs"], t["params"]
    lines = [f"TPC-ViT {t['source']} ({t['model']}, {t['blocks']} blocks, {t['tokens']} tokens, κ {p['kappa']}, "
             f"gate σ({p['gamma']:g}·y − {p['beta']:g}); {t['images']} validation images of {t['dataset']}):",
             "  tokens per block (mean): " + " ".join(f"{n:.1f}" for n in t["mean_tokens"])
             + f"; mean halting depth {t['mean_depth']:.2f}",
             f"  GMACs per image: dense {g['dense']:.4f}, masked {g['masked']:.4f}, packed {g['packed']:.4f} (backbone "
             f"{g['backbone']:.4f} + stabiliser {g['stabiliser']:.4f} + gates {g['gates']:.6f}); ideal speed-up packed "
             f"{g['ideal_speedup_packed']:.3f}×, masked {g['ideal_speedup_masked']:.3f}×",
             f"  packed − masked logits: max |Δ| {t['packed_vs_masked_max_abs_logit_diff']:.2e}", ""]
    head = (f"{'bs':>5}{'dense ms':>10}{'masked ms':>11}{'packed ms':>11}{'packed×':>9}{'masked×':>9}"
            f"{'packed/masked':>15}{'ideal':>7}{'padded ideal':>14}")
    lines += [head, "-" * len(head)]
    for s in t["speed"]:
        lines.append(f"{s['batch_size']:>5}{1e3 * s['dense']['median_s']:>10.2f}{1e3 * s['masked']['median_s']:>11.2f}"
                     f"{1e3 * s['packed']['median_s']:>11.2f}{s['packed']['speedup']:>9.3f}{s['masked']['speedup']:>9.3f}"
                     f"{s['packed_over_masked']:>15.3f}{s['ideal_speedup']:>7.3f}{s['padded_ideal_speedup']:>14.3f}")
    return lines



def format_epochs(e: dict) -> list[str]:
    """The stdout lines of one config's ``--epochs-timed`` result."""
    d = e["data"]
    lines = [f"epochs {e['config']} ({e['model']}, blocks {e['blocks']}, batch {e['batch_size']}, {e['train_images']} "
             f"training images; {e['epochs_timed']} timed epoch(s) after {e['warmup_epochs']} untimed warm-up epoch):",
             f"  training step: {e['train_step']}"]
    head = f"  {'d':>6}{'kept':>6}{'epoch img/s':>13}{'epoch×':>8}{'step img/s':>12}{'step×':>8}{'ideal':>8}"
    lines += [head, "  " + "-" * (len(head) - 2)]
    for r in e["rows"]:
        lines.append(f"  {r['drop_ratio']:>6.3f}{r['kept_tokens']:>6}{r['imgs_per_s']:>13.1f}{r['speedup']:>8.3f}"
                     f"{r['step_imgs_per_s']:>12.1f}{r['step_speedup']:>8.3f}{r['ideal_speedup']:>8.3f}")
    lines.append(f"  data pipeline alone: {d['images_per_s']:.0f} img/s with {d['workers']} workers ({d['source']})")
    lines += [f"  note: {n}" for n in e["notes"]]
    lines.append(f"  verdict {e['config']}: {e['verdict']['kind']} — {e['verdict']['reason']}")
    return lines


def plot_report(report: dict, path: Path) -> None:
    """Measured (training, inference; bars: quartiles of the paired ratios) and ideal speed-up against drop
    ratio, one panel per model and batch size, one colour per block; written with matplotlib's Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels: dict[tuple[str, int], list[dict]] = {}
    for r in report["rows"]:
        panels.setdefault((r["model"], r["batch_size"]), []).append(r)
    n = max(1, len(panels))
    fig = Figure(figsize=(5.2 * n, 4.2), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for ax, ((model, bs), rows) in zip(axes, panels.items()):
        by_block: dict[str, list[dict]] = {}
        for r in rows:
            by_block.setdefault(",".join(map(str, r["blocks"])), []).append(r)
        for i, (blk, rs) in enumerate(by_block.items()):
            rs = sorted(rs, key=lambda r: r["drop_ratio"])
            c = colours[i % len(colours)]
            d = [r["drop_ratio"] for r in rs]
            ax.plot(d, [r["ideal_speedup"] for r in rs], "--", color=c, alpha=0.7, label=f"block {blk} ideal (MACs)")
            for mode, style, label in (("train", "o-", "training step"), ("infer", "x:", "inference (reduced)")):
                if all(r[mode] for r in rs):
                    y = [r[mode]["speedup"] for r in rs]
                    err = [[v - r[mode]["speedup_q25"] for v, r in zip(y, rs)],
                           [r[mode]["speedup_q75"] - v for v, r in zip(y, rs)]]
                    ax.errorbar(d, y, yerr=err, fmt=style, color=c, capsize=2, lw=1.2, label=f"block {blk} {label}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("drop ratio d")
        ax.set_ylabel("speed-up over d = 0")
        ax.set_title(f"{model}, batch {bs}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    m = report["machine"]
    fig.suptitle(f"{m['device']} ({m['cpu']}, {m['torch_threads']} threads), torch {m['torch_version']}, {m['date']}",
                 fontsize=8)
    fig.savefig(path, dpi=120)
