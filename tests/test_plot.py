"""`mpnet-dist plot`: the plotted series are the metrics.jsonl numbers, runs overlay, the PNG is a real picture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpnet_dist.plot import CURVES_FILE, main, plot_runs, refresh_curves
from tests.helpers import assert_png_has_a_picture


def write_run(run_dir: Path, scale: float = 1.0) -> list[dict]:
    """A synthetic run: train records every 10 steps, validation at 0, 20, 40 (step 0 with the unigram line)."""
    records = []
    for step in range(10, 50, 10):
        records.append({"step": step, "split": "train", "loss": scale * (8 - step / 10), "acc": step / 100,
                        "lr": 1e-3 * step / 40, "grad_norm": 2.0 / step, "tokens": step * 1000,
                        "tokens_per_s": 5000.0 + step})  # fmt: skip
    for step in (0, 20, 40):
        record = {"step": step, "split": "valid", "loss": scale * (9 - step / 10), "acc": step / 80,
                  "tokens": step * 1000}  # fmt: skip
        if step == 0:
            record["unigram_loss"] = 6.5 * scale
        records.append(record)
    records.append({"step": 40, "split": "test", "loss": 1.0, "acc": 0.9, "tokens": 40000})
    run_dir.mkdir(parents=True)
    # Out of step order on purpose (a resumed run appends): the plot sorts by step.
    lines = [json.dumps(r) for r in reversed(records)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return records


def lines_by_label(fig) -> dict[str, dict[str, tuple[list, list]]]:
    out: dict[str, dict[str, tuple[list, list]]] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            out.setdefault(ax.get_title(), {})[line.get_label()] = (
                list(line.get_xdata()),
                list(line.get_ydata()),
            )
    return out


def test_plotted_series_are_the_metrics(tmp_path):
    a, b = tmp_path / "run_a", tmp_path / "run_b"
    write_run(a)
    write_run(b, scale=0.5)
    out = tmp_path / "curves.png"
    fig = plot_runs([a, b], out)
    panels = lines_by_label(fig)
    loss = panels["loss (nats / predicted token)"]
    assert loss["run_a train"] == ([10000, 20000, 30000, 40000], [7.0, 6.0, 5.0, 4.0])
    assert loss["run_a valid"] == ([0, 20000, 40000], [9.0, 7.0, 5.0])
    assert loss["run_b valid"] == ([0, 20000, 40000], [4.5, 3.5, 2.5])
    assert loss["run_a unigram"][1] == [6.5, 6.5] and loss["run_b unigram"][1] == [3.25, 3.25]
    assert "run_a test" not in loss  # the test split is a single end point, not a curve
    acc = panels["accuracy (predicted tokens)"]
    assert acc["run_b valid"] == ([0, 20000, 40000], [0.0, 0.25, 0.5])
    assert panels["learning rate"]["run_a train"][1] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert panels["tokens / s"]["run_b train"][1] == [5010.0, 5020.0, 5030.0, 5040.0]
    assert panels["gradient norm (before clipping)"]["run_a train"][1] == pytest.approx(
        [0.2, 0.1, 2 / 30, 0.05]
    )
    notes = fig.axes[-1].texts[0].get_text()
    assert (
        "run_a: step 40, acc 0.500\n  loss 5.000, -1.50 vs unigram" in notes
    )  # the latest, not the last line
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert {"run_a train", "run_b valid", "run_b unigram"} <= set(legend)
    assert_png_has_a_picture(out)


def test_cli_writes_png_and_refuses_a_folder_without_metrics(tmp_path, capsys):
    write_run(tmp_path / "run")
    out = tmp_path / "sub" / "c.png"
    assert main([str(tmp_path / "run"), "-o", str(out)]) == 0
    assert_png_has_a_picture(out)
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "empty" in err[0] and "metrics.jsonl" in err[0]


def test_refresh_never_raises_and_warns_once(tmp_path, caplog, monkeypatch):
    import logging

    import mpnet_dist.plot as plot_module

    monkeypatch.setattr(logging.getLogger("mpnet_dist"), "propagate", True)  # setup_logging may have cut it
    plot_module._warned = False
    (tmp_path / "metrics.jsonl").write_text("{not json\n")
    with caplog.at_level("WARNING", logger="mpnet_dist"):
        refresh_curves(tmp_path)
        refresh_curves(tmp_path)
    assert len([r for r in caplog.records if "curves.png" in r.getMessage()]) == 1
    assert not (tmp_path / CURVES_FILE).exists()
