"""Writing a checkpoint: every rank's state into a temporary folder, train_state.json last, then a rename.

A folder holds the Accelerate/DeepSpeed state (model, optimizer, per-rank RNG, grad scaler), one data state
file per rank and train_state.json. Only after the train state is written is the folder renamed into place,
so a crash mid-write never leaves something that looks complete.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from mpnet_dist.checkpoint.errors import CheckpointError
from mpnet_dist.checkpoint.folders import is_complete
from mpnet_dist.checkpoint.state import DataState, TrainState, write_data_state, write_train_state

logger = logging.getLogger("mpnet_dist")


def save_checkpoint(
    accelerator: Accelerator,
    run_dir: Path,
    name: str,
    train_state: TrainState,
    data_state: DataState | dict[str, Any],
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
        write_data_state(tmp, accelerator.process_index, data_state)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = replace(train_state, world_size=accelerator.num_processes)
        with _write_errors(tmp, final):
            write_train_state(tmp, state)  # last: marks the folder complete
            swap_into_place(tmp, final)
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


def swap_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished `tmp` to `final`, replacing an older `final` (best/ and final/ are rewritten)."""
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
