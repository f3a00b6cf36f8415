"""Resuming: restore a checkpoint into the prepared model and optimizer, after checking it fits this run
(written on another number of processes or by another kind, it goes through reshard.py).

Everything is loaded weights-only unless --trust-checkpoint (see weights_only.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import DistributedType

from mpnet_dist.checkpoint.errors import CheckpointError
from mpnet_dist.checkpoint.integrity import other_checkpoint, verify_checkpoint
from mpnet_dist.checkpoint.reshard import load_converted, needs_conversion
from mpnet_dist.checkpoint.state import DataState, TrainState, read_data_state, read_train_state
from mpnet_dist.checkpoint.weights_only import (
    deepspeed_engine_weights_only,
    refuse_pickles,
    unloadable_reason,
)
from mpnet_dist.command import one_line

logger = logging.getLogger("mpnet_dist")


def check_checkpoint(path: Path) -> TrainState:
    """Its train state, after checking that every file is there and as written (integrity.py); loads nothing."""
    try:
        train_state = read_train_state(path)
    except CheckpointError as err:
        raise CheckpointError(f"{err} {other_checkpoint(Path(path))}") from None
    verify_checkpoint(path, train_state)
    return train_state


def load_checkpoint(
    accelerator: Accelerator, path: Path, trust: bool = False, checked: bool = False
) -> tuple[TrainState, DataState | None]:
    """Restore model/optimizer/RNG into the prepared objects; return (train_state, the data state to resume).

    The files are checked first (check_checkpoint) unless the caller already did (`checked`). A checkpoint
    written by another number of processes, or by DDP for a ZeRO run or the other way round, goes through its
    universal form (reshard.py). The data state is described in state.read_data_state.
    """
    path = Path(path)
    train_state = read_train_state(path) if checked else check_checkpoint(path)
    _check_random_states(path, accelerator.process_index, train_state.world_size)
    if needs_conversion(train_state, accelerator):
        load_converted(accelerator, path, train_state, trust)
    else:
        load_kwargs = {"weights_only": False} if trust else None
        deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        with refuse_pickles(path), deepspeed_engine_weights_only(deepspeed and not trust):
            accelerator.load_state(str(path), load_kwargs=load_kwargs)
    # load_state restores Accelerate's micro-batch counter, whose value modulo --update-freq decides where an
    # accumulation ends. Checkpoints are taken at step boundaries: restart it there, or a run resumed with
    # another --update-freq (to keep the global batch on another process count) would sync mid-step.
    accelerator.step = 0
    return train_state, read_data_state(path, accelerator.process_index, trust)


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
    except Exception as err:
        reason = unloadable_reason(file) or f"{file}: unreadable ({type(err).__name__}: {err})"
        if "--trust-checkpoint" in reason and "cannot help" not in reason:  # a real pickle of other objects
            reason = (
                f"{file}: holds objects besides RNG states, which a weights-only load refuses to unpickle. "
                "Accelerate never unpickles this file, not even with --trust-checkpoint: it is not one that "
                "mpnet-dist wrote"
            )
        raise CheckpointError(f"{one_line(reason)}. Resume from another checkpoint.") from err
