"""Checkpoints: step-NNNNNNNN/, best/ and final/ folders under --checkpoint-dir.

Each folder holds the Accelerate/DeepSpeed state (model, optimizer, per-rank RNG, grad scaler), one
data_state_rank{r}.pt per rank, and train_state.json. A folder is written under a temporary name, the train
state is written last, and only then is it renamed into place: a folder without train_state.json (a crash
mid-write) is never picked for resume.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

logger = logging.getLogger("mpnet_dist")

TRAIN_STATE = "train_state.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; the message says what to do instead."""


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / TRAIN_STATE).is_file()


def interval_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete step-N folders, oldest first."""
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step among step-N, best and final (ties prefer step-N)."""
    candidates = [(step, 1, path) for step, path in interval_checkpoints(run_dir)]
    for name in ("final", "best"):
        path = run_dir / name
        if is_complete(path):
            candidates.append((read_train_state(path)["step"], 0, path))
    return max(candidates)[2] if candidates else None


def read_train_state(path: Path) -> dict[str, Any]:
    state_file = Path(path) / TRAIN_STATE
    if not state_file.is_file():
        raise CheckpointError(
            f"{path} is not a complete mpnet-dist checkpoint (no {TRAIN_STATE}); it may have been interrupted "
            "while being written. Pick another folder, or use --resume to take the newest complete one."
        )
    return json.loads(state_file.read_text())


def save_checkpoint(
    accelerator: Accelerator,
    run_dir: Path,
    name: str,
    train_state: dict[str, Any],
    data_state: dict[str, Any],
) -> Path:
    """Collective: every rank must call it. Returns the final folder path."""
    final = run_dir / name
    tmp = run_dir / f".tmp-{name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    started = time.perf_counter()
    accelerator.save_state(str(tmp))
    torch.save(data_state, tmp / f"data_state_rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = dict(train_state, format_version=FORMAT_VERSION, world_size=accelerator.num_processes)
        _write_json(tmp / TRAIN_STATE, state)  # last: marks the folder complete
        _swap_into_place(tmp, final)
        logger.info("saved checkpoint %s (%.1fs)", final, time.perf_counter() - started)
    accelerator.wait_for_everyone()
    return final


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())


def _swap_into_place(tmp: Path, final: Path) -> None:
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def prune_checkpoints(run_dir: Path, keep: int, protect: Path | None = None) -> list[Path]:
    """Delete all but the newest `keep` step-N folders (keep < 0: keep all). Main process only."""
    if keep < 0:
        return []
    ckpts = interval_checkpoints(run_dir)
    doomed = [path for _, path in (ckpts[:-keep] if keep > 0 else ckpts)]
    removed = []
    for path in doomed:
        if protect is not None and path.resolve() == protect.resolve():
            continue  # never delete the checkpoint this run resumed from
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def load_checkpoint(accelerator: Accelerator, path: Path, trust: bool = False) -> tuple[dict, dict | None]:
    """Restore model/optimizer/RNG into the prepared objects; return (train_state, this rank's data state).

    The data state is this rank's file, or rank 0's when the run now has more ranks than saved (the loader
    decides whether that mapping is exact or must be refused).
    """
    path = Path(path)
    train_state = read_train_state(path)
    saved_world = train_state.get("world_size", 1)
    if saved_world != accelerator.num_processes and train_state.get("zero_stage", 0) > 0:
        raise CheckpointError(
            f"{path} was written by DeepSpeed ZeRO-{train_state['zero_stage']} on {saved_world} processes; this run "
            f"has {accelerator.num_processes}. ZeRO optimizer shards cannot be re-partitioned here. Resume on "
            f"{saved_world} processes, or export the weights (`mpnet-dist export {path} OUT`) and start a new run "
            "with --hf-model-path OUT (fresh optimizer state)."
        )
    load_kwargs = {"weights_only": False} if trust else None
    accelerator.load_state(str(path), load_kwargs=load_kwargs)
    rank_file = path / f"data_state_rank{accelerator.process_index}.pt"
    if not rank_file.is_file():
        rank_file = path / "data_state_rank0.pt"
    data_state = torch.load(rank_file, weights_only=not trust) if rank_file.is_file() else None
    return train_state, data_state
