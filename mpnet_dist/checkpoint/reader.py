"""Resuming: restore a checkpoint into the prepared model and optimizer, after checking it fits this run.

Everything is loaded weights-only unless --trust-checkpoint (see weights_only.py).
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import DistributedType

from mpnet_dist.checkpoint.errors import CheckpointError
from mpnet_dist.checkpoint.state import DataState, TrainState, read_data_state, read_train_state
from mpnet_dist.checkpoint.weights_only import deepspeed_engine_weights_only, refuse_pickles

logger = logging.getLogger("mpnet_dist")


def load_checkpoint(
    accelerator: Accelerator, path: Path, trust: bool = False
) -> tuple[TrainState, DataState | None]:
    """Restore model/optimizer/RNG into the prepared objects; return (train_state, this rank's data state).

    The data state is this rank's file, or rank 0's when the run now has more ranks than saved (the loader
    decides whether that mapping is exact or must be refused).
    """
    path = Path(path)
    train_state = read_train_state(path)
    saved_world = train_state.world_size
    if saved_world != accelerator.num_processes and train_state.zero_stage > 0:
        raise CheckpointError(
            f"{path} was written by DeepSpeed ZeRO-{train_state.zero_stage} on {saved_world} processes; this run "
            f"has {accelerator.num_processes}. ZeRO optimizer shards cannot be re-partitioned here. Resume on "
            f"{saved_world} processes, or export the weights (`mpnet-dist export {path} OUT`) and start a new run "
            "with --hf-model-path OUT (fresh optimizer state)."
        )
    _check_same_format(path, train_state.zero_stage, accelerator)
    _check_random_states(path, accelerator.process_index, saved_world)
    load_kwargs = {"weights_only": False} if trust else None
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    with refuse_pickles(path), deepspeed_engine_weights_only(deepspeed and not trust):
        accelerator.load_state(str(path), load_kwargs=load_kwargs)
    return train_state, read_data_state(path, accelerator.process_index, trust)


def _check_same_format(path: Path, saved_stage: int, accelerator: Accelerator) -> None:
    """DDP/single-process and each ZeRO stage write different layouts; loading one as another fails deep inside
    Accelerate or DeepSpeed (a bare AssertionError, a missing file): say what was expected instead."""
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    stage = int(accelerator.state.deepspeed_plugin.zero_stage) if deepspeed else 0
    if saved_stage != stage:

        def kind(s: int) -> str:
            return f"DeepSpeed ZeRO-{s}" if s else "DDP / a single process"

        raise CheckpointError(
            f"{path} was written by {kind(saved_stage)}; this run uses {kind(stage)}, whose checkpoints have another "
            f"layout. Resume with the launch config that wrote it, or export the weights (`mpnet-dist export {path} "
            "OUT`) and start a new run with --hf-model-path OUT (fresh optimizer state)."
        )


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
