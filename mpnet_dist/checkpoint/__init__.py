"""Checkpoints: step-NNNNNNNN/, best/ and final/ folders under --checkpoint-dir.

state.py         the files mpnet-dist defines (train_state.json, data_state_rank{r}.pt), one dataclass each
folders.py       names, finding the newest complete checkpoint, pruning
writer.py        save_checkpoint (collective): temporary folder, train state last, rename into place
reader.py        load_checkpoint: checks that the checkpoint fits this run, then restores it
weights_only.py  no unpickling without --trust-checkpoint (torch and DeepSpeed loaders alike)
"""

from mpnet_dist.checkpoint.errors import CheckpointError
from mpnet_dist.checkpoint.folders import (
    interval_checkpoints,
    is_complete,
    latest_checkpoint,
    prune_checkpoints,
    resolve_checkpoint,
    step_name,
)
from mpnet_dist.checkpoint.reader import load_checkpoint
from mpnet_dist.checkpoint.state import (
    TRAIN_STATE_FILE,
    BlocksDataState,
    DataState,
    StreamDataState,
    TrainState,
    read_train_state,
)
from mpnet_dist.checkpoint.writer import save_checkpoint

__all__ = [
    "TRAIN_STATE_FILE",
    "BlocksDataState",
    "CheckpointError",
    "DataState",
    "StreamDataState",
    "TrainState",
    "interval_checkpoints",
    "is_complete",
    "latest_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "read_train_state",
    "resolve_checkpoint",
    "save_checkpoint",
    "step_name",
]
