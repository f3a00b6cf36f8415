"""Checkpoints: step-NNNNNNNN/, best/ and final/ folders under --checkpoint-dir.

Each folder holds the Accelerate/DeepSpeed state (model, optimizer, per-rank RNG, grad scaler), one
data_state_rank{r}.pt per rank, and train_state.json. A folder is written under a temporary name, the train
state is written last, and only then is it renamed into place: a folder without train_state.json (a crash
mid-write) is never picked for resume.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from mpnet_dist import reshard

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
    with _write_errors(tmp, final):
        accelerator.save_state(str(tmp))
        torch.save(data_state, tmp / f"data_state_rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = dict(train_state, format_version=FORMAT_VERSION, world_size=accelerator.num_processes)
        with _write_errors(tmp, final):
            _write_json(tmp / TRAIN_STATE, state)  # last: marks the folder complete
            _swap_into_place(tmp, final)
        logger.info("saved checkpoint %s (%.1fs)", final, time.perf_counter() - started)
    accelerator.wait_for_everyone()
    return final


@contextlib.contextmanager
def _write_errors(tmp: Path, final: Path) -> Iterator[None]:
    """A failed write (full disk, quota, I/O error) names the folder and the cause, and frees the partial folder.

    torch.save reports a full disk as "RuntimeError: [enforce fail at inline_container.cc] unexpected pos" and
    safetensors as SafetensorError, so every exception is caught and the free space is stated next to it. The
    partial folder never held train_state.json, so nothing complete is lost.
    """
    try:
        yield
    except Exception as err:
        try:
            free = f"{shutil.disk_usage(final.parent).free / 2**20:.1f} MiB free on its disk"
        except OSError:
            free = "free space unknown"
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not write checkpoint {final} ({type(err).__name__}: {err}; {free}). The partial folder {tmp} "
            f"was removed; the checkpoints already in {final.parent} are intact. Free space (or point "
            "--checkpoint-dir at a larger disk, lower --keep-checkpoints) and restart with --resume."
        ) from err


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())


def _swap_into_place(tmp: Path, final: Path) -> None:
    old = final.with_name(f".old-{final.name}")
    if not final.exists() and is_complete(old):
        # A crash between the two renames below left the previous folder (e.g. best/) only as .old-best:
        # put it back before replacing it, instead of deleting the only copy.
        old.rename(final)
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
        reshard.prune_converted(path)
        removed.append(path)
    return removed


def load_checkpoint(accelerator: Accelerator, path: Path, trust: bool = False) -> tuple[dict, dict | None]:
    """Restore model/optimizer/RNG into the prepared objects; return (train_state, this rank's data state).

    A checkpoint written by another number of processes, or by DDP for a ZeRO run or the other way round, goes
    through its universal form (reshard.py). The data state is described in _read_data_state.
    """
    path = Path(path)
    train_state = read_train_state(path)
    saved_world = train_state.get("world_size", 1)
    _check_random_states(path, accelerator.process_index, saved_world)
    if reshard.needs_conversion(train_state, accelerator):
        # Another process count or kind than a ZeRO checkpoint's, or a DDP checkpoint under ZeRO.
        reshard.load_converted(accelerator, path, train_state, trust)
    else:
        load_kwargs = {"weights_only": False} if trust else None
        deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        with _refuse_pickles(path), _deepspeed_weights_only(deepspeed and not trust):
            accelerator.load_state(str(path), load_kwargs=load_kwargs)
    # load_state restores Accelerate's micro-batch counter, whose value modulo --update-freq decides where an
    # accumulation ends. Checkpoints are taken at step boundaries: restart it there, or a run resumed with
    # another --update-freq (to keep the global batch on another process count) would sync mid-step.
    accelerator.step = 0
    return train_state, _read_data_state(path, accelerator.process_index, trust)


def _read_data_state(path: Path, rank: int, trust: bool) -> dict | None:
    """This rank's data state, or rank 0's when the run now has more ranks (a file-based state is global). A
    streaming state is split by rank (each saves its logical streams): merge every rank's file."""
    from mpnet_dist.data.stream_loader import merge_states

    def read(file: Path) -> dict:
        with _refuse_pickles(file):
            return torch.load(file, weights_only=not trust)

    rank_file = path / f"data_state_rank{rank}.pt"
    if not rank_file.is_file():
        rank_file = path / "data_state_rank0.pt"
    if not rank_file.is_file():
        return None
    state = read(rank_file)
    if state.get("kind") != "stream":
        return state
    files = sorted(
        path.glob("data_state_rank*.pt"), key=lambda f: int(f.stem.removeprefix("data_state_rank"))
    )
    return merge_states([read(file) for file in files])


@contextlib.contextmanager
def _refuse_pickles(where: Path) -> Iterator[None]:
    """A weights-only load that meets an arbitrary object: name the flag that allows it (torch's text does not)."""
    try:
        yield
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{where}: a checkpoint file holds objects that a weights-only load refuses to unpickle ({err}). "
            "Unpickling can run arbitrary code: only if you trust this checkpoint (you or your team wrote it), "
            "re-run with --trust-checkpoint."
        ) from err


@contextlib.contextmanager
def _deepspeed_weights_only(enabled: bool) -> Iterator[None]:
    """DeepSpeed's checkpoint engine always loads with weights_only=False (Accelerate's load_kwargs never reach
    it): make it weights-only, with the allow-list of DeepSpeed's own objects, unless --trust-checkpoint."""
    if not enabled:
        yield
        return
    from deepspeed.runtime.checkpoint_engine import torch_checkpoint_engine

    from mpnet_dist.consolidate import deepspeed_safe_loads  # the same allow-list as the offline export

    with deepspeed_safe_loads(torch_checkpoint_engine, trust=False):
        yield


def _check_random_states(path: Path, rank: int, saved_world: int) -> None:
    """Accelerate loads random_states_<rank>.pkl inside a bare `except Exception` and only logs "Could not load
    random states" at INFO: a missing, corrupt or non-weights-only file would silently break exact resume (and
    hide a planted pickle). Load it here first, as Accelerate will (weights-only, its allow-list), and fail loudly.
    """
    from accelerate.utils import load

    file = path / f"random_states_{rank}.pkl"
    if not file.is_file():
        if rank < saved_world:
            raise CheckpointError(
                f"{path} lacks {file.name}, which the {saved_world}-process run that wrote it saves for rank "
                f"{rank}: the folder is damaged. Resume from another checkpoint (--resume-checkpoint)."
            )
        logger.warning("%s has no RNG state for rank %d (saved by %d processes)", path, rank, saved_world)
        return
    try:
        load(file)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{file}: holds objects besides RNG states, which a weights-only load refuses to unpickle ({err}). "
            "Accelerate never unpickles this file, not even with --trust-checkpoint: it is not one that "
            "mpnet-dist wrote. Resume from another checkpoint."
        ) from err
    except Exception as err:
        raise CheckpointError(
            f"{file}: unreadable ({type(err).__name__}: {err}); resume from another checkpoint."
        ) from err
