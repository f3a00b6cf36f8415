"""One logical stream of a streamed HF dataset (`datasets`, streaming=True): documents -> rows, with an exact position.

The training stream is split into S logical streams (--data-streams), fixed for the whole run whatever the
number of processes: with at least S shards (files) stream k owns shards k, k+S, ...; with fewer, every stream
reads every shard and keeps the examples with (shard + index) % S == k (S-fold reading, logged). Each pass a
stream visits its shards in a seeded order and shuffles its documents in chunks of --buffer-size with a seeded
permutation. Everything is a function of (seed, pass, chunk, stream), so a stream's position is a handful of
integers: the chunk (pass, number, where it starts), the document within it, the token offset within that
document and the rows emitted so far (which also seed each row's masking). Resume re-reads from the chunk's start
in its shard (skipping raw examples, no tokenization) and continues exactly. Validation and test documents are
the first ones of the unshuffled stream, excluded by position from training. How the streams' rows make up the
global batch, on any number of processes, is `stream_loader.py`'s business.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np

from mpnet_dist.data.errors import DataError
from mpnet_dist.data.order import mix_key, permute, row_seeds
from mpnet_dist.data.sources import Position, iter_shard
from mpnet_dist.data.tokenizer import Encoder

_SHARD_TAG, _CHUNK_TAG, _ROW_TAG = 21, 22, 1 << 32
_DOCS_PER_CALL = 64


@dataclass(frozen=True)
class StreamPlan:
    """What every stream needs; identical on every rank."""

    n_shards: int
    n_streams: int
    eval_end: Position
    text_field: str
    min_chars: int
    buffer_size: int
    seed: int
    max_tokens: int
    packing: bool

    @property
    def by_shard(self) -> bool:
        return self.n_shards >= self.n_streams


def start_state() -> dict[str, int]:
    return {"pass": 0, "chunk": 0, "cursor": 0, "index": 0, "doc": 0, "offset": 0, "blocks": 0}


class StreamReader:
    """One logical stream's documents -> rows, each yielded with its masking seed and the position after it."""

    def __init__(self, ds: Any, plan: StreamPlan, stream: int, encoder: Encoder):
        self.ds, self.plan, self.stream, self.encoder = ds, plan, stream, encoder

    def shards(self, pass_: int) -> list[int]:
        plan = self.plan
        mine = (
            list(range(self.stream, plan.n_shards, plan.n_streams))
            if plan.by_shard
            else list(range(plan.n_shards))
        )
        order = permute(np.arange(len(mine)), len(mine), mix_key(plan.seed, _SHARD_TAG, pass_, self.stream))
        return [mine[i] for i in order]

    def first_documents(self, n: int) -> list[str]:
        """The first n training documents this reader trains on (pass 0, before shuffling within chunks)."""
        return [text for _, _, text in islice(self._docs(0, 0, 0), n)]

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
                if plan.by_shard or (s + j) % plan.n_streams == self.stream:
                    yield c, j, text

    def _chunks(self, state: dict[str, int]) -> Iterator[tuple[dict[str, int], list[str]]]:
        """(chunk position, shuffled documents), forever, from the chunk `state` points into."""
        pass_, chunk, cursor, index = state["pass"], state["chunk"], state["cursor"], state["index"]
        while True:
            fresh, found = cursor == 0 and index == 0, False
            docs = self._docs(pass_, cursor, index)
            while batch := list(islice(docs, self.plan.buffer_size)):
                key = mix_key(self.plan.seed, _CHUNK_TAG, pass_, self.stream, chunk)
                order = permute(np.arange(len(batch)), len(batch), key)
                yield (
                    {"pass": pass_, "chunk": chunk, "cursor": cursor, "index": index},
                    [batch[i][2] for i in order],
                )
                cursor, index, chunk, found = batch[-1][0], batch[-1][1] + 1, chunk + 1, True
            if fresh and not found:
                raise DataError(
                    f"logical stream {self.stream} of {self.plan.n_streams} (--data-streams) found no "
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

    def rows(self, state: dict[str, int]) -> Iterator[tuple[np.ndarray, np.ndarray, int, dict[str, int]]]:
        """(tokens [l], word starts [l], masking seed, position after the row), forever."""
        blocks = state["blocks"]
        for ids, starts, where in self._rows(state):
            seed = int(row_seeds(self.plan.seed, _ROW_TAG + self.stream, np.array([blocks]))[0])
            blocks += 1
            yield ids, starts, seed, {**where, "blocks": blocks}
