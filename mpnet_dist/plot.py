"""Training curves from metrics.jsonl: `mpnet-dist plot RUN_DIR [RUN_DIR ...] [-o curves.png]`, and the
RUN_DIR/curves.png that training refreshes at every evaluation.

Panels, all against tokens seen: loss (train, validation, and the run's unigram baseline as a dotted line),
accuracy, learning rate, tokens/s and gradient norm. Several runs are overlaid, one colour each.
Matplotlib's Agg canvas is used directly (no pyplot): no display needed, no global figure state.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from mpnet_dist.metrics import read_metrics

logger = logging.getLogger("mpnet_dist")

CURVES_FILE = "curves.png"
# (panel title, record field, splits drawn, log scale)
PANELS = (
    ("loss (nats / predicted token)", "loss", ("train", "valid"), False),
    ("accuracy (predicted tokens)", "acc", ("train", "valid"), False),
    ("learning rate", "lr", ("train",), False),
    ("tokens / s", "tokens_per_s", ("train",), False),
    ("gradient norm (before clipping)", "grad_norm", ("train",), True),
)
_STYLE = {
    "train": {"linestyle": "-", "alpha": 0.55},
    "valid": {"linestyle": "-", "marker": "o", "markersize": 3},
}


class PlotError(ValueError):
    """A run directory without metrics to plot; the message names it."""


def series(records: list[dict[str, Any]], split: str, field: str) -> tuple[list[float], list[float]]:
    """(tokens seen, value) of every `split` record holding a finite `field`, in step order."""
    points = [
        (r["tokens"], r[field])
        for r in sorted(records, key=lambda r: r["step"])
        if r.get("split") == split and isinstance(r.get(field), (int, float)) and math.isfinite(r[field])
    ]
    return [p[0] for p in points], [p[1] for p in points]


def unigram_baseline(records: list[dict[str, Any]]) -> float | None:
    found = [r["unigram_loss"] for r in records if r.get("split") == "valid" and "unigram_loss" in r]
    return found[0] if found else None


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Folder names, or whole paths when two runs share a name."""
    names = [d.resolve().name or str(d) for d in run_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in run_dirs]


def build_figure(runs: dict[str, list[dict[str, Any]]]) -> Any:
    """One figure, a panel per PANELS entry, every run overlaid. Lines are labelled 'RUN SPLIT'."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 8.5))
    FigureCanvasAgg(fig)
    # Fixed margins: a constrained layout would measure every label first and double the drawing time.
    axes = fig.subplots(2, 3, gridspec_kw={"left": 0.05, "right": 0.98, "top": 0.95, "bottom": 0.07,
                                           "wspace": 0.22, "hspace": 0.3}).ravel()  # fmt: skip
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (title, field, splits, log_scale) in zip(axes, PANELS, strict=False):
        for colour, (label, records) in zip(colours, runs.items(), strict=True):
            for split in splits:
                x, y = series(records, split, field)
                if x:
                    ax.plot(x, y, color=colour, label=f"{label} {split}", **_STYLE[split])
            baseline = unigram_baseline(records) if field == "loss" else None
            if baseline is not None:
                ax.axhline(baseline, color=colour, linestyle=":", label=f"{label} unigram")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("tokens seen")
        ax.grid(alpha=0.3)
        if log_scale and any(line.get_ydata().size for line in ax.get_lines()):
            ax.set_yscale("log")
        if field == "loss":
            _zoom_on_training(ax)
    axes[0].legend(fontsize=8)
    _notes(axes[-1], runs)
    return fig


def _zoom_on_training(ax: Any) -> None:
    """The untrained step-0 loss (~ln V) would squash every later point into a sliver: clip it off the top."""
    later = [
        y for line in ax.get_lines() for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True) if x > 0
    ]
    if later:
        low, high = min(later), max(later)
        ax.set_ylim(low - 0.05 * (high - low + 1e-9), high + 0.15 * (high - low + 1e-9))


def _notes(ax: Any, runs: dict[str, list[dict[str, Any]]]) -> None:
    """Last panel: each run's latest validation figures against its unigram baseline, as text."""
    ax.axis("off")
    lines = ["latest validation"]
    for label, records in runs.items():
        valid = sorted((r for r in records if r.get("split") == "valid"), key=lambda r: r["step"])
        if not valid:
            lines.append(f"{label}: none yet")
            continue
        last, baseline = valid[-1], unigram_baseline(records)
        gap = f", {last['loss'] - baseline:+.2f} vs unigram" if baseline is not None else ""
        # Two lines per run: one would run past the figure's right edge with a long run name.
        lines += [f"{label}: step {last['step']}, acc {last['acc']:.3f}", f"  loss {last['loss']:.3f}{gap}"]
    ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", fontsize=9, family="monospace")


def save_figure(fig: Any, out: Path) -> None:
    """Written to a temporary name and renamed, so a viewer never opens a half-written PNG."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, out)


def plot_runs(run_dirs: list[Path], out: Path) -> Any:
    runs = {}
    for label, run_dir in zip(run_labels(run_dirs), run_dirs, strict=True):
        if not (run_dir / "metrics.jsonl").is_file():
            raise PlotError(f"{run_dir}: no metrics.jsonl (give the --checkpoint-dir of a training run)")
        runs[label] = read_metrics(run_dir)
    fig = build_figure(runs)
    save_figure(fig, out)
    return fig


_warned = False


def refresh_curves(run_dir: Path) -> None:
    """Training's hook (rank 0, after each evaluation): redraw RUN_DIR/curves.png; a failure only warns, once."""
    global _warned
    try:
        plot_runs([run_dir], run_dir / CURVES_FILE)
    except Exception as err:  # plotting must never stop training
        if not _warned:
            _warned = True
            logger.warning(
                "could not draw %s (%s: %s); training goes on", run_dir / CURVES_FILE, type(err).__name__, err
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mpnet-dist plot",
        description="Draw training curves (loss with the unigram baseline, accuracy, learning rate, tokens/s, "
        "gradient norm, against tokens seen) from the metrics.jsonl of one or more runs, overlaid.",
    )
    parser.add_argument(
        "run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="a training --checkpoint-dir"
    )
    parser.add_argument(
        "-o", "--output", type=Path, default=Path(CURVES_FILE), help="PNG to write (default %(default)s)"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        plot_runs(args.run_dirs, args.output)
    except PlotError as err:
        print(f"mpnet-dist plot: error: {err}", file=sys.stderr)
        return 2
    print(f"mpnet-dist plot: wrote {args.output}")
    return 0
