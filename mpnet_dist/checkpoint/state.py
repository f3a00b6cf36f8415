"""The files of a checkpoint that mpnet-dist itself defines: one dataclass per file, versioned.

    train_state.json        TrainState: progress counters and what the run was (written last: marks the
                            folder complete)
    data_state_rank{r}.pt   BlocksDataState (local files) or StreamDataState (streaming): rank r's data
                            position, torch.save of plain ints and strings, loaded weights-only

Every writer and reader goes through this module; nothing else spells a key of these files (a stream reader's
position inside StreamDataState.readers is defined by data/stream.py, `start_state`). Each file carries
`format_version` (data state files written before it existed are version 1). A version this code does not
know is refused with a message naming the file. The rest of a checkpoint (model, optimizer, RNG) is written by
Accelerate/DeepSpeed in their own formats.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch

from mpnet_dist.checkpoint.errors import CheckpointError
from mpnet_dist.checkpoint.weights_only import refuse_pickles

TRAIN_STATE_FILE = "train_state.json"


def data_state_file(rank: int) -> str:
    return f"data_state_rank{rank}.pt"


def _check_version(data: dict[str, Any], known: int, source: str) -> None:
    version = data.get("format_version", 1)
    if not isinstance(version, int) or not 1 <= version <= known:
        raise CheckpointError(
            f"{source}: format_version {version!r}, but this mpnet-dist reads versions 1 to {known}: the "
            "checkpoint was written by a newer mpnet-dist (upgrade it to resume or export this checkpoint)"
        )


def _from_dict(cls: type, data: Any, source: str, skip: tuple[str, ...] = ()) -> Any:
    """cls(**data) for a record read from disk, naming the file and the keys when they do not fit."""
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{source}: expected a mapping, found {type(data).__name__}; the file is damaged"
        )
    _check_version(data, cls.FORMAT_VERSION, source)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names - {"format_version", *skip})
    if unknown:
        raise CheckpointError(f"{source}: unknown keys {unknown}; it was not written by this mpnet-dist")
    try:
        return cls(**{k: v for k, v in data.items() if k in names})
    except TypeError as err:  # a required key is missing
        raise CheckpointError(
            f"{source}: {err}; the file is damaged or not an mpnet-dist checkpoint"
        ) from None


@dataclass(kw_only=True)
class TrainState:
    """train_state.json. Field order is the order on disk (format_version is written before world_size)."""

    FORMAT_VERSION: ClassVar[int] = 1

    step: int
    tokens: int = 0  # non-padding input tokens seen, all ranks
    pred_tokens: int = 0  # predicted tokens seen, all ranks
    best_valid_loss: float = math.inf  # stored as null until a validation ran (JSON has no inf)
    elapsed_s: float = 0.0
    model_config: dict[str, Any]  # MPNetConfig.to_dict(): the architecture a resume and the export rebuild
    tokenizer_name: str
    tokenizer_size: int | None = None  # None: not recorded (annotated-mpnet .pt files)
    zero_stage: int = 0  # 0: DDP or a single process
    distributed_type: str = ""
    mpnet_dist_version: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # TrainConfig.to_dict() of the run that saved
    world_size: int = 1

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["best_valid_loss"] = self.best_valid_loss if math.isfinite(self.best_valid_loss) else None
        world_size = data.pop("world_size")  # version 1's key order: ..., format_version, world_size
        return {**data, "format_version": self.FORMAT_VERSION, "world_size": world_size}

    @classmethod
    def from_json(cls, data: Any, source: str) -> TrainState:
        state = _from_dict(cls, data, source)
        if state.best_valid_loss is None:
            state.best_valid_loss = math.inf
        return state


def write_train_state(folder: Path, state: TrainState) -> None:
    """Write and fsync train_state.json (the last file of a checkpoint: it marks the folder complete)."""
    with open(Path(folder) / TRAIN_STATE_FILE, "w") as fh:
        json.dump(state.to_json(), fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())


def read_train_state(folder: Path) -> TrainState:
    file = Path(folder) / TRAIN_STATE_FILE
    if not file.is_file():
        raise CheckpointError(
            f"{folder} is not a complete mpnet-dist checkpoint (no {TRAIN_STATE_FILE}); it may have been "
            "interrupted while being written. Pick another folder, or use --resume to take the newest complete one."
        )
    try:
        data = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"{file}: not valid JSON ({err}); resume or export another checkpoint"
        ) from None
    return TrainState.from_json(data, str(file))


@dataclass(kw_only=True)
class BlocksDataState:
    """Local files (a block cache): the global position in the block sequence, the same on every rank."""

    FORMAT_VERSION: ClassVar[int] = 1
    KIND: ClassVar[str] = "blocks"

    blocks_consumed: int  # global positions consumed by the batches yielded so far
    n_blocks: int
    data_id: str  # the block cache's name: it changes with the files, tokenizer and --max-tokens
    seed: int
    world_size: int
    batch_size: int


@dataclass(kw_only=True)
class StreamDataState:
    """Streaming: the position of each of this rank's readers (see data/stream.py for what they mean)."""

    FORMAT_VERSION: ClassVar[int] = 1
    KIND: ClassVar[str] = "stream"

    source: str  # dataset name, config, split and filters: a resume must read the same stream
    seed: int
    rank: int
    world_size: int
    readers_per_rank: int
    next: int  # local reader of the next batch
    readers: list[dict[str, int]]


DataState = BlocksDataState | StreamDataState
_DATA_STATES = {cls.KIND: cls for cls in (BlocksDataState, StreamDataState)}


def data_state_to_dict(state: DataState) -> dict[str, Any]:
    """The plain mapping that is saved (torch.save, weights-only loadable): version, kind, then the fields."""
    return {"format_version": state.FORMAT_VERSION, "kind": state.KIND, **asdict(state)}


def data_state_from_dict(data: Any, source: str = "the data state") -> DataState:
    """Parse what data_state_to_dict wrote (any known version); an instance is returned as it is."""
    if isinstance(data, (BlocksDataState, StreamDataState)):
        return data
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in _DATA_STATES:
        raise CheckpointError(f"{source}: unknown data state kind {kind!r}; the file is damaged")
    return _from_dict(_DATA_STATES[kind], data, source, skip=("kind",))


def write_data_state(folder: Path, rank: int, state: DataState | dict[str, Any]) -> None:
    """Save rank `rank`'s data state: a DataState, or the mapping a loader's state_dict() returns."""
    torch.save(data_state_to_dict(data_state_from_dict(state)), Path(folder) / data_state_file(rank))


def read_data_state(folder: Path, rank: int, trust: bool = False) -> DataState | None:
    """Rank `rank`'s data state, or rank 0's when the saving run had fewer ranks; None when neither exists."""
    file = Path(folder) / data_state_file(rank)
    if not file.is_file():
        file = Path(folder) / data_state_file(0)
    if not file.is_file():
        return None
    with refuse_pickles(file):
        data = torch.load(file, weights_only=not trust)
    return data_state_from_dict(data, str(file))
