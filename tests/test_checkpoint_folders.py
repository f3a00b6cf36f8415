"""checkpoint/folders.py: finding the newest complete checkpoint, resolving a path, pruning."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from mpnet_dist.checkpoint import (
    CheckpointError,
    TrainState,
    interval_checkpoints,
    latest_checkpoint,
    prune_checkpoints,
    resolve_checkpoint,
    step_name,
)
from mpnet_dist.checkpoint.state import write_train_state


def checkpoint(run_dir: Path, name: str, step: int) -> Path:
    folder = run_dir / name
    folder.mkdir(parents=True)
    write_train_state(folder, TrainState(step=step, model_config={}, tokenizer_name="t"))
    return folder


def test_newest_complete_checkpoint_wins_and_incomplete_ones_are_ignored(tmp_path):
    assert latest_checkpoint(tmp_path / "none") is None
    for step in (2, 4):
        checkpoint(tmp_path, step_name(step), step)
    (tmp_path / step_name(8)).mkdir()  # a crash while saving: no train_state.json
    checkpoint(tmp_path, "best", 2)
    assert [s for s, _ in interval_checkpoints(tmp_path)] == [2, 4]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000004"
    checkpoint(tmp_path, "final", 4)
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000004"  # a tie prefers step-N
    shutil.rmtree(tmp_path / "final")
    checkpoint(tmp_path, "final", 5)
    assert latest_checkpoint(tmp_path) == tmp_path / "final"


def test_resolve_takes_a_folder_final_or_the_newest(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        resolve_checkpoint(tmp_path / "missing")
    (tmp_path / "run").mkdir()
    with pytest.raises(CheckpointError, match="not a complete mpnet-dist checkpoint"):
        resolve_checkpoint(tmp_path / "run")
    step = checkpoint(tmp_path / "run", step_name(3), 3)
    assert resolve_checkpoint(tmp_path / "run") == step
    assert resolve_checkpoint(step) == step
    final = checkpoint(tmp_path / "run", "final", 1)
    assert resolve_checkpoint(tmp_path / "run") == final  # final first, even when older


def test_prune_keeps_the_newest_and_the_resumed_one(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint(tmp_path, step_name(step), step)
    assert prune_checkpoints(tmp_path, -1) == []
    removed = prune_checkpoints(tmp_path, 2, protect=tmp_path / "step-00000001")
    assert removed == [tmp_path / "step-00000002"]
    assert [s for s, _ in interval_checkpoints(tmp_path)] == [1, 3, 4]
    assert prune_checkpoints(tmp_path, 0) == [tmp_path / f"step-0000000{s}" for s in (1, 3, 4)]


def test_prune_reports_only_what_it_deleted(tmp_path, monkeypatch, caplog):
    for step in (1, 2, 3):
        checkpoint(tmp_path, step_name(step), step)
    real_rmtree = shutil.rmtree

    def stubborn(path, *args, **kwargs):
        if Path(path).name == "step-00000001":
            raise PermissionError(13, "Permission denied", str(path))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", stubborn)
    monkeypatch.setattr(logging.getLogger("mpnet_dist"), "propagate", True)  # setup_logging may have cut it
    assert prune_checkpoints(tmp_path, 1) == [tmp_path / "step-00000002"]
    assert (tmp_path / "step-00000001").is_dir()
    assert "could not delete" in caplog.text and "step-00000001" in caplog.text
