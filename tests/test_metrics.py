"""metrics.py: metrics.jsonl records, the console line, the log window."""

from __future__ import annotations

import types

import torch

from mpnet_dist.metrics import LogWindow, MetricsWriter, console_line, format_eta, read_metrics


def _cfg(**kw) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{"tensorboard_log_dir": None, "wandb": False, **kw})


def test_records_round_trip_and_only_the_main_process_writes(tmp_path):
    writer = MetricsWriter(_cfg(), tmp_path, enabled=True)
    writer.write({"step": 1, "split": "train", "loss": 2.5})
    writer.write({"step": 1, "split": "valid", "loss": 2.25, "acc": 0.5})
    writer.close()
    MetricsWriter(_cfg(), tmp_path, enabled=False).write({"step": 2, "split": "train", "loss": 9.0})
    assert read_metrics(tmp_path) == [
        {"step": 1, "split": "train", "loss": 2.5},
        {"step": 1, "split": "valid", "loss": 2.25, "acc": 0.5},
    ]
    assert read_metrics(tmp_path / "elsewhere") == []


def test_tensorboard_gets_every_scalar_under_its_split(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = MetricsWriter(_cfg(tensorboard_log_dir=str(tmp_path / "tb")), tmp_path, enabled=True)
    writer.write({"step": 3, "split": "valid", "loss": 1.5, "note": "not a number"})
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert events.Tags()["scalars"] == ["valid/loss"]
    assert [(e.step, e.value) for e in events.Scalars("valid/loss")] == [(3, 1.5)]


def test_window_sums_steps_and_keeps_the_last_lr_and_grad_norm():
    window = LogWindow()
    for loss, norm in ((2.0, 1.5), (4.0, None)):
        step = types.SimpleNamespace(loss_sum=torch.tensor(loss), correct=torch.tensor(1), n_pred_global=10,
                                     n_tokens_global=100, grad_norm=norm)  # fmt: skip
        window.add(step, lr=loss / 10, seconds=0.5)
    assert (float(window.loss), int(window.correct), window.n_pred, window.n_tokens) == (6.0, 2, 20, 200)
    assert (window.steps, window.seconds, window.lr, window.grad_norm) == (2, 1.0, 0.4, 1.5)


def test_console_line_reads_like_the_reference():
    record = {"step": 5, "loss": 2.3456, "acc": 0.25, "lr": 3e-4, "grad_norm": 1.234, "tokens_per_s": 12345.6,
              "data_wait_frac": 0.012, "eta_s": 3725}  # fmt: skip
    line = console_line(record, 10)
    assert line == (
        "step 5/10 | loss 2.3456 | acc 0.250 | lr 3.00e-04 | gnorm 1.23 | 12,346 tok/s | data wait 1.2% | "
        "eta 1:02:05"
    )
    assert format_eta(-3) == "0:00:00"
