"""Streaming training data (HF `datasets`, streaming=True) with an exact, resumable position.

Readers: each rank has R = max(1, num_workers) readers, N = W x R in all; reader k = rank*R + local.
With at least N shards (files) reader k owns shards k, k+N, ...; with fewer, every reader reads
every shard and keeps the examples with (shard + index) % N == k (N-fold reading, logged).
Each pass a reader visits its shards in a seeded order and shuffles its documents in chunks of
--buffer-size with a seeded permutation. Everything is a function of (seed, pass, chunk, reader),
so a reader's position is a handful of integers: the chunk (pass, number, where it starts), the
document within it and the token offset within that document. Resume re-reads from the chunk's
start in its shard (skipping raw examples, no tokenization) and continues exactly. Validation and
test documents are the first ones of the unshuffled stream, excluded by position from training.
The split over readers depends on N, so a changed world size or reader count is refused.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mpnet_dist.checkpoint.state import DataState, StreamDataState, data_state_from_dict, data_state_to_dict
from mpnet_dist.data.errors import DataError
from mpnet_dist.data.loader import make_batch, whole_batch
from mpnet_dist.data.order import mix_key, permute, row_seeds
from mpnet_dist.data.sources import Position, iter_shard
from mpnet_dist.data.tokenizer import Encoder

_SHARD_TAG, _CHUNK_TAG, _ROW_TAG = 21, 22, 1 << 32
_DOCS_PER_CALL = 64


@dataclass(frozen=True)
class StreamPlan:
    """What every reader needs; identical on every rank."""

    n_shards: int
    n_readers: int
    eval_end: Position
    text_field: str
    min_chars: int
    buffer_size: int
    seed: int
    max_tokens: int
    packing: bool
    batch_size: int

    @property
    def by_shard(self) -> bool:
        return self.n_shards >= self.n_readers


def start_state() -> dict[str, int]:
    return {"pass": 0, "chunk": 0, "cursor": 0, "index": 0, "doc": 0, "offset": 0, "blocks": 0}


class StreamReader:
    """One reader's documents -> rows -> micro-batches, each yielded with the position after it."""

    def __init__(self, ds: Any, plan: StreamPlan, reader: int, encoder: Encoder, spec: Any):
        self.ds, self.plan, self.reader, self.encoder, self.spec = ds, plan, reader, encoder, spec

    def shards(self, pass_: int) -> list[int]:
        plan = self.plan
        mine = (
            list(range(self.reader, plan.n_shards, plan.n_readers))
            if plan.by_shard
            else list(range(plan.n_shards))
        )
        order = permute(np.arange(len(mine)), len(mine), mix_key(plan.seed, _SHARD_TAG, pass_, self.reader))
        return [mine[i] for i in order]

    def _docs(self, pass_: int, cursor: int, index: int) -> Iterator[tuple[int, int, str]]:
        """(cursor, index, text) of this reader's training documents from shard-list position `cursor`."""
        plan, end = self.plan, self.plan.eval_end
        shards = self.shards(pass_)
        for c in range(cursor, len(shards)):
            s = shards[c]
            for j, text in iter_shard(
                self.ds, s, index if c == cursor else 0, plan.text_field, plan.min_chars
            ):
                if text is None or (s, j) < (end.shard, end.index):
                    continue
                if plan.by_shard or (s + j) % plan.n_readers == self.reader:
                    yield c, j, text

    def _chunks(self, state: dict[str, int]) -> Iterator[tuple[dict[str, int], list[str]]]:
        """(chunk position, shuffled documents), forever, from the chunk `state` points into."""
        pass_, chunk, cursor, index = state["pass"], state["chunk"], state["cursor"], state["index"]
        while True:
            fresh, found = cursor == 0 and index == 0, False
            docs = self._docs(pass_, cursor, index)
            while batch := list(islice(docs, self.plan.buffer_size)):
                key = mix_key(self.plan.seed, _CHUNK_TAG, pass_, self.reader, chunk)
                order = permute(np.arange(len(batch)), len(batch), key)
                yield (
                    {"pass": pass_, "chunk": chunk, "cursor": cursor, "index": index},
                    [batch[i][2] for i in order],
                )
                cursor, index, chunk, found = batch[-1][0], batch[-1][1] + 1, chunk + 1, True
            if fresh and not found:
                raise DataError(
                    f"stream reader {self.reader} of {self.plan.n_readers} (ranks x max(1, --num-workers)) found no "
                    f"training documents in a whole pass: the stream has too few documents of at least "
                    f"{self.plan.min_chars} characters after the {self.plan.eval_end} taken for evaluation"
                )
            pass_, chunk, cursor, index = pass_ + 1, 0, 0, 0

    def _rows(self, state: dict[str, int]) -> Iterator[tuple[np.ndarray, np.ndarray, dict[str, int]]]:
        """(tokens [l], word starts [l], position of the first token not yet emitted) per row."""
        L, packing = self.plan.max_tokens, self.plan.packing
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        filled = 0
        first_doc, offset = state["doc"], state["offset"]
        for where, texts in self._chunks(state):
            for i0 in range(first_doc, len(texts), _DOCS_PER_CALL):
                ids, starts, lengths = self.encoder.encode(texts[i0 : i0 + _DOCS_PER_CALL])
                bounds = np.cumsum(lengths)
                for d, (b, e) in enumerate(zip(bounds - lengths, bounds, strict=True)):
                    t = b + offset
                    offset = 0
                    while t < e:
                        take = min(L - filled, e - t)
                        parts.append((ids[t : t + take], starts[t : t + take]))
                        filled, t = filled + take, t + take
                        if filled == L or not packing:
                            doc, off = (i0 + d, int(t - b)) if t < e else (i0 + d + 1, 0)
                            row_ids = np.concatenate([p[0] for p in parts])
                            row_starts = np.concatenate([p[1] for p in parts])
                            yield row_ids, row_starts, {**where, "doc": doc, "offset": off}
                            parts, filled = [], 0
            first_doc = 0

    def batches(self, state: dict[str, int]) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, int]]]:
        """(micro-batch, reader state after it), forever."""
        B, pad = self.plan.batch_size, self.spec.pad_id
        blocks = state["blocks"]
        rows = self._rows(state)
        while True:
            group = list(islice(rows, B))
            width = max(len(r[0]) for r in group)
            tokens = np.full((B, width), pad, dtype=np.int64)
            starts = np.zeros((B, width), dtype=bool)
            for i, (ids, st, _) in enumerate(group):
                tokens[i, : len(ids)], starts[i, : len(ids)] = ids, st
            starts[:, 0] = True
            seeds = row_seeds(self.plan.seed, _ROW_TAG + self.reader, np.arange(blocks, blocks + B))
            blocks += B
            yield make_batch(tokens, starts, seeds, self.spec), {**group[-1][2], "blocks": blocks}


class _ReaderSet(IterableDataset):
    """In DataLoader worker w, runs this rank's reader (w + first) % R from its saved state."""

    def __init__(self, readers: list[StreamReader], states: list[dict[str, int]], first: int):
        self.readers, self.states, self.first = readers, states, first

    def __iter__(self) -> Iterator[tuple[int, dict[str, torch.Tensor], dict[str, int]]]:
        info = get_worker_info()
        local = ((info.id if info else 0) + self.first) % len(self.readers)
        for batch, state in self.readers[local].batches(self.states[local]):
            yield local, batch, state


class StreamBatches:
    """Infinite iterator of this rank's streaming micro-batches; state = its readers' positions.

    DataLoader workers yield batches round-robin in order, so the state recorded for each reader
    is the one after the last batch *yielded* from it, whatever the workers have prefetched.
    """

    def __init__(
        self, readers: list[StreamReader], num_workers: int, rank: int, world_size: int, source: str
    ):
        self.readers, self.num_workers = readers, num_workers
        self.rank, self.world_size, self.source = rank, world_size, source
        self.states = [start_state() for _ in readers]
        self.next = 0  # local reader of the next batch
        self._it: Iterator | None = None

    def __iter__(self) -> "StreamBatches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            workers = _ReaderSet(self.readers, [dict(s) for s in self.states], self.next)
            if self.num_workers == 0:
                self._it = iter(workers)
            else:
                loader = DataLoader(
                    workers, batch_size=None, num_workers=self.num_workers, collate_fn=whole_batch
                )
                self._it = iter(loader)
        local, batch, state = next(self._it)
        self.states[local] = state
        self.next = (local + 1) % len(self.readers)
        return batch

    def state_dict(self) -> dict[str, Any]:
        state = StreamDataState(
            source=self.source,
            seed=self.readers[0].plan.seed,
            rank=self.rank,
            world_size=self.world_size,
            readers_per_rank=len(self.readers),
            next=self.next,
            readers=[dict(s) for s in self.states],
        )
        return data_state_to_dict(state)

    def load_state_dict(self, state: dict[str, Any] | DataState) -> None:
        saved = data_state_from_dict(state)
        if not isinstance(saved, StreamDataState):
            raise DataError(
                "the checkpoint's data state is for local files but this run streams --dataset-name; "
                "resume with the same data source as the saved run"
            )
        layout = (saved.world_size, saved.readers_per_rank)
        if layout != (self.world_size, len(self.readers)) or saved.rank != self.rank:
            raise DataError(
                f"the streaming data state was saved by {layout[0]} processes x {layout[1]} readers each "
                f"(reader = max(1, --num-workers)); this run has {self.world_size} x {len(self.readers)}. "
                "How a stream is split over readers depends on their number, so this cannot resume exactly. "
                f"Resume on {layout[0]} processes with --num-workers {layout[1] if layout[1] > 1 else '0 or 1'}, "
                "or use local files (--train-dir), whose data state does not depend on the number of processes."
            )
        if saved.source != self.source or saved.seed != self.readers[0].plan.seed:
            raise DataError(
                f"the streaming data state is for {saved.source!r} with seed {saved.seed}; this run streams "
                f"{self.source!r} with seed {self.readers[0].plan.seed}. Resume with the saved --dataset-name and --seed."
            )
        self.states = [dict(s) for s in saved.readers]
        self.next = int(saved.next)
        self._it = None
