"""Training end to end in one process: resume, accumulation, checkpoints, NaN policy, outputs."""

from __future__ import annotations

import json
import math
import os
import re
import sys
import threading

import pytest
import torch

from mpnet_dist import step as step_module
from mpnet_dist.checkpoint import interval_checkpoints, latest_checkpoint
from mpnet_dist.metrics import read_metrics
from mpnet_dist.train import main
from tests.helpers import REPO, final_weights, tiny_args, train, train_losses


def test_resumed_run_is_bitwise_identical(tiny_corpus, tmp_path):
    full = tmp_path / "full"
    assert train(tiny_args(tiny_corpus, full, "--checkpoint-interval", "3")) == 0
    resumed = tmp_path / "resumed"
    args = tiny_args(tiny_corpus, resumed, "--resume-checkpoint", str(full / "step-00000003"))
    assert train(args) == 0
    full_losses, resumed_losses = train_losses(full), train_losses(resumed)
    assert sorted(resumed_losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed_losses[step] == full_losses[step], step  # bitwise, dropout on
    a, b = final_weights(full), final_weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_run_resumes_with_plain_resume(tiny_corpus, tmp_path):
    """--resume picks the newest complete checkpoint and ignores half-written ones."""
    run_dir = tmp_path / "run"
    assert train(tiny_args(tiny_corpus, run_dir, "--checkpoint-interval", "2", "--total-updates", "4")) == 0
    # simulate a crash while writing step 8: a folder without train_state.json, and a leftover temp folder
    (run_dir / "step-00000008").mkdir()
    (run_dir / ".tmp-step-00000010").mkdir()
    latest = latest_checkpoint(run_dir)
    assert latest.name in ("final", "step-00000004")
    assert train(tiny_args(tiny_corpus, run_dir, "--resume", "--total-updates", "6")) == 0
    state = json.loads((run_dir / "final" / "train_state.json").read_text())
    assert state["step"] == 6
    steps = [r["step"] for r in read_metrics(run_dir) if r["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # every step logged exactly once across the two runs


def test_update_freq_matches_one_big_batch(tiny_corpus, tmp_path):
    """update-freq 4 at batch 4 gives the weights of update-freq 1 at batch 16 (same 16 blocks)."""
    common = (
        "--dropout",
        "0",
        "--attention-dropout",
        "0",
        "--activation-dropout",
        "0",
        "--total-updates",
        "1",
        "--clip-grad-norm",
        "0",
        "--eval-interval-steps",
        "0",
    )
    a, b = tmp_path / "a", tmp_path / "b"
    train(tiny_args(tiny_corpus, a, *common, "--batch-size", "4", "--update-freq", "4"))
    train(tiny_args(tiny_corpus, b, *common, "--batch-size", "16", "--update-freq", "1"))
    wa, wb = final_weights(a), final_weights(b)
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < 1e-6, worst
    la, lb = train_losses(a)[1], train_losses(b)[1]
    assert la == pytest.approx(lb, rel=1e-6)


def test_checkpoint_retention_best_and_final(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_args(tiny_corpus, run_dir, "--checkpoint-interval", "2", "--keep-checkpoints", "1",
                    "--eval-interval-steps", "2"))  # fmt: skip
    assert [step for step, _ in interval_checkpoints(run_dir)] == [6]
    for name in ("best", "final"):
        state = json.loads((run_dir / name / "train_state.json").read_text())
        assert state["world_size"] == 1 and state["model_config"]["encoder_layers"] == 2
    valid = [r for r in read_metrics(run_dir) if r["split"] == "valid"]
    best = json.loads((run_dir / "best" / "train_state.json").read_text())
    assert [r["step"] for r in valid] == [0, 2, 4, 6]  # step 0: the untrained baseline, never "best"
    assert best["best_valid_loss"] == pytest.approx(min(r["loss"] for r in valid[1:]))
    assert (run_dir / "config.yaml").is_file()
    assert not list(run_dir.glob(".tmp-*")) and not list(run_dir.glob(".old-*"))


def test_metrics_record_fields_and_validation_falls(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    tb = tmp_path / "tb"
    train(tiny_args(tiny_corpus, run_dir, "--tensorboard-log-dir", str(tb), "--total-updates", "12",
                    "--eval-interval-steps", "6", "--dropout", "0"))  # fmt: skip
    records = read_metrics(run_dir)
    train_rec = [r for r in records if r["split"] == "train"]
    for key in (
        "step",
        "split",
        "loss",
        "acc",
        "lr",
        "grad_norm",
        "tokens",
        "pred_tokens",
        "tokens_per_s",
        "elapsed_s",
    ):
        assert key in train_rec[-1], key
    valid6 = next(r for r in records if r["split"] == "valid" and r["step"] == 6)
    train6 = next(r for r in train_rec if r["step"] == 6)
    assert (
        valid6["pred_tokens"] == train6["pred_tokens"] and valid6["tokens"] == train6["tokens"]
    )  # one meaning
    assert 0 < valid6["eval_pred_tokens"] and "pred_tokens_seen" not in valid6
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("| field | rows | meaning |") :].split("\n\n")[0]
    documented = set(re.findall(r"`(\w+)`", table))
    for record in records:  # every field written is documented, under its own name
        assert set(record) <= documented, set(record) - documented
    assert train_rec[-1]["tokens"] == 12 * 2 * 4 * 32  # steps x update-freq x batch x block, no padding
    assert train_rec[-1]["pred_tokens"] == 12 * 2 * 4 * round(0.15 * 32)
    evals = [(r["split"], r["step"]) for r in records if r["split"] != "train"]
    assert evals == [("valid", 0), ("valid", 6), ("valid", 12), ("test", 12)]
    valid = [r["loss"] for r in records if r["split"] == "valid"]
    assert valid[-1] < valid[0]  # it learns
    assert all(math.isfinite(r["loss"]) for r in records)
    assert list(tb.rglob("events.out.tfevents.*"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_corpus, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real_loss = step_module.batch_loss
    calls = {"n": 0}

    def poisoned(model, batch):  # NaN from the 5th training micro-batch on (step 3 with update-freq 2)
        calls["n"] += torch.is_grad_enabled()  # evaluation runs under no_grad and is not counted
        loss_sum, correct = real_loss(model, batch)
        return (loss_sum * math.nan if calls["n"] >= 5 else loss_sum), correct

    monkeypatch.setattr(step_module, "batch_loss", poisoned)
    with pytest.raises(step_module.NonFiniteLossError, match="last good checkpoint"):
        train(tiny_args(tiny_corpus, run_dir, "--checkpoint-interval", "2", "--eval-interval-steps", "0"))
    assert [step for step, _ in interval_checkpoints(run_dir)] == [2]
    assert not (run_dir / "final").exists()
    weights = final_weights(run_dir, "step-00000002")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_bad_flag_exits_with_message(capsys):
    assert main(["--batch-size", "zero"]) == 2
    assert "--batch-size" in capsys.readouterr().err


def test_bf16_on_cpu_trains_and_fp16_on_cpu_is_refused(tiny_corpus, tmp_path):
    run_dir = tmp_path / "bf16"
    assert train(tiny_args(tiny_corpus, run_dir, "--mixed-precision", "bf16", "--total-updates", "3")) == 0
    losses = train_losses(run_dir)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        train(tiny_args(tiny_corpus, tmp_path / "fp16", "--mixed-precision", "fp16"))


def test_wandb_offline_run_is_written(tiny_corpus, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    run_dir = tmp_path / "run"
    args = tiny_args(tiny_corpus, run_dir, "--wandb", "--wandb-project", "mpnet-test", "--wandb-name", "tiny",
                     "--total-updates", "2")  # fmt: skip
    assert train(args) == 0
    runs = list((tmp_path / "wandb").rglob("offline-run-*"))
    assert runs, "no offline W&B run directory"
    assert list(runs[0].rglob("*.wandb"))  # the run's event log


def test_unexportable_model_with_export_flag_is_refused_at_start(tiny_corpus, tmp_path):
    from mpnet_dist.model import HFExportError

    with pytest.raises(HFExportError, match="normalize_before"):
        train(
            tiny_args(
                tiny_corpus, tmp_path / "run", "--normalize-before", "--export-hf-dir", str(tmp_path / "hf")
            )
        )
    assert not (tmp_path / "run" / "final").exists()


def test_zero_updates_saves_the_initial_model(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    assert train(tiny_args(tiny_corpus, run_dir, "--total-updates", "0")) == 0
    state = json.loads((run_dir / "final" / "train_state.json").read_text())
    assert state["step"] == 0 and state["tokens"] == 0


def test_log_lines_never_land_on_the_progress_bar(tiny_corpus, tmp_path, monkeypatch):
    """In a terminal the bar is redrawn in place (carriage returns, no newline) on stderr while log lines go to
    stdout: each log line must start on a line of its own, not after the bar's text."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    terminal = os.fdopen(slave, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    args = tiny_args(tiny_corpus, tmp_path / "run", "--total-updates", "6", "--checkpoint-interval", "2")
    assert train(args) == 0
    terminal.close()
    reader.join(timeout=30)
    text = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
    assert "train:" in text and "it/s" in text  # the bar was drawn
    logged = [line for line in text.split("\n") if "[mpnet]" in line or "step 3/6 |" in line]
    assert len(logged) > 5
    for line in logged:  # what the terminal shows: the text after the last carriage return
        assert line.split("\r")[-1].lstrip().startswith(("[mpnet]", "step ")), repr(line)
