"""Per-rank batches from a block cache: the infinite training iterator with a global data state, and eval sets.

The order of pass e is a keyed bijection of the block indices. Blocks are consumed as one infinite
global sequence: global position g is block permute(g % n, key(seed, g // n)) of pass g // n, so a
pass boundary may fall inside a micro-batch and no block is dropped or repeated within a pass.
Global micro-batch m covers positions [m*B*W, (m+1)*B*W); rank r takes [m*B*W + r*B, m*B*W + (r+1)*B).
The only state is the number of positions consumed, the same on every rank, so resuming with a
different number of ranks at the same global batch (B*W*update_freq) continues the same sequence.
"""

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mpnet_dist.checkpoint.state import BlocksDataState, DataState, data_state_from_dict, data_state_to_dict
from mpnet_dist.data.errors import DataError
from mpnet_dist.data.order import mix_key, permute, row_seeds
from mpnet_dist.data.packing import Blocks

logger = logging.getLogger(__name__)

TRAIN_TAG, VALID_TAG, TEST_TAG = 1, 2, 3  # separate seed streams for the rows of each split
_PASS_TAG = 11


def make_batch(
    tokens: np.ndarray, starts: np.ndarray, seeds: np.ndarray, spec: Any
) -> dict[str, torch.Tensor]:
    from mpnet_dist.data.batch import make_mpnet_batch

    return make_mpnet_batch(tokens, starts if spec.whole_word else None, seeds, spec)


def pass_order(positions: np.ndarray, n_blocks: int, seed: int) -> np.ndarray:
    """Global positions [B] -> block indices [B] (each pass its own seeded permutation)."""
    passes, index = np.divmod(positions, n_blocks)
    rows = np.empty_like(positions)
    for p in np.unique(passes):
        here = passes == p
        rows[here] = permute(index[here], n_blocks, mix_key(seed, _PASS_TAG, int(p)))
    return rows


@dataclass(frozen=True)
class RankShare:
    """This process's part of every global micro-batch: `batch_size` rows for rank `rank` of `world_size`."""

    rank: int
    world_size: int
    batch_size: int


class RankBatches(Dataset):
    """Map-style: the global position of a micro-batch's first block -> this rank's micro-batch."""

    def __init__(self, blocks: Blocks, spec: Any, seed: int, share: RankShare):
        self.blocks, self.spec, self.seed = blocks, spec, seed
        self.rank, self.world_size, self.batch_size = share.rank, share.world_size, share.batch_size

    def rows(self, start: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (global positions [B], block indices [B]) of this rank's slice of the micro-batch at `start`."""
        positions = start + self.rank * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        return positions, pass_order(positions, self.blocks.n_rows, self.seed)

    def __getitem__(self, start: int) -> dict[str, torch.Tensor]:
        positions, rows = self.rows(start)
        tokens, starts = self.blocks.gather(rows, self.spec.pad_id, wrap=True)  # [B, L]
        return make_batch(tokens, starts, row_seeds(self.seed, TRAIN_TAG, positions), self.spec)


class _Starts(Sampler):
    """start, start + stride, ... forever."""

    def __init__(self, start: int, stride: int):
        self.start, self.stride = start, stride

    def __iter__(self) -> Iterator[int]:
        return count(self.start, self.stride)


def whole_batch(item: Any) -> Any:
    """DataLoader collate_fn for items that are already whole micro-batches: pass them through."""
    return item


class TrainBatches:
    """Infinite iterator of this rank's training micro-batches, with an exact, rank-count-free state."""

    def __init__(self, dataset: RankBatches, num_workers: int, data_id: str):
        self.dataset, self.num_workers, self.data_id = dataset, num_workers, data_id
        self.stride = dataset.batch_size * dataset.world_size  # positions per global micro-batch
        self.consumed = 0  # global positions consumed by the batches yielded so far
        self._it: Iterator | None = None

    def __iter__(self) -> "TrainBatches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._it = self._start()
        batch = next(self._it)
        self.consumed += self.stride  # counted when yielded: prefetched batches are not consumed
        return batch

    def _start(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.num_workers == 0:
            return (self.dataset[g] for g in count(self.consumed, self.stride))
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            sampler=_Starts(self.consumed, self.stride),
            num_workers=self.num_workers,
            collate_fn=whole_batch,
        )
        return iter(loader)

    def state_dict(self) -> dict[str, Any]:
        d = self.dataset
        state = BlocksDataState(
            blocks_consumed=self.consumed,
            n_blocks=d.blocks.n_rows,
            data_id=self.data_id,
            seed=d.seed,
            world_size=d.world_size,
            batch_size=d.batch_size,
        )
        return data_state_to_dict(state)

    def load_state_dict(self, state: dict[str, Any] | DataState) -> None:
        saved = data_state_from_dict(state)
        if not isinstance(saved, BlocksDataState):
            raise DataError(
                f"the checkpoint's data state is of kind {saved.KIND!r} (streaming) but this run reads "
                "local files; resume with the same data source (--dataset-name / --train-dir) as the saved run"
            )
        if saved.data_id != self.data_id or saved.seed != self.dataset.seed:
            logger.warning(
                "training data or --seed changed since the checkpoint (data %s -> %s, seed %s -> %s): "
                "continuing at global block position %d, but not the sequence the saved run would have seen",
                saved.data_id, self.data_id, saved.seed, self.dataset.seed, saved.blocks_consumed,
            )  # fmt: skip
        if saved.blocks_consumed % self.stride:
            logger.warning(
                "resumed at global block %d, not a multiple of this run's global micro-batch %d (was %d): "
                "exact only when the global batch B x W x update_freq is unchanged",
                saved.blocks_consumed, self.stride, saved.world_size * saved.batch_size,
            )  # fmt: skip
        self.consumed = int(saved.blocks_consumed)
        self._it = None  # workers of the old iterator shut down when it is collected


class EvalBatches:
    """This rank's share of an eval set: rows rank, rank+W, ..., in fixed batches.

    Masks are seeded from (seed, split, row index), so every iteration gives identical batches and
    they do not depend on how many evaluations ran before. Ranks differ by at most one row.
    """

    def __init__(self, blocks: Blocks, spec: Any, seed: int, tag: int, share: RankShare):
        self.blocks, self.spec, self.seed, self.tag = blocks, spec, seed, tag
        self.rows = np.arange(share.rank, blocks.n_rows, share.world_size, dtype=np.int64)
        self.batch_size = share.batch_size

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(0, len(self.rows), self.batch_size):
            rows = self.rows[i : i + self.batch_size]
            tokens, starts = self.blocks.gather(rows, self.spec.pad_id, wrap=False)
            yield make_batch(tokens, starts, row_seeds(self.seed, self.tag, rows), self.spec)
