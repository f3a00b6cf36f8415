"""Streaming micro-batches for one rank, assembled from S logical streams so that the data does not depend on
the number of processes or workers.

Global row g (0, 1, 2, ... over the whole run) is the next row of logical stream g % S. Global micro-batch m
holds rows [m*B*W, (m+1)*B*W); rank r of W takes the rows g = m*B*W + r + j*W, j < B, so it serves only the
streams s = r (mod W), which is why W must divide S. An optimizer step therefore sees the same rows on any W
that keeps the global batch B x W x --update-freq (only their grouping into micro-batches differs), and the
data state is the global row count plus every stream's position: each rank saves its streams' positions,
and a resume reads every rank's file (`merge_states`), whatever the process count that wrote them.

Workers: local stream k goes to worker k mod n; a worker yields packets of `per_stream` rows of each of its
streams (masked already when rows are packed blocks, whose masking does not depend on the batch). DataLoader
returns packets round-robin, so each round brings the same number of rows per stream and the per-stream
buffers stay small; a stream's recorded position is the one after its last row *consumed*, whatever the
workers have prefetched.
"""

import math
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mpnet_dist.checkpoint.state import DataState, StreamDataState, data_state_from_dict, data_state_to_dict
from mpnet_dist.data.errors import DataError
from mpnet_dist.data.loader import RankShare, make_batch, whole_batch
from mpnet_dist.data.stream import StreamReader, start_state


def default_streams(world_size: int, num_workers: int) -> int:
    """lcm(12, W x max(1, workers)): the first run's readers all busy, and resumable on 1, 2, 3, 4, 6, 12 ..."""
    return math.lcm(12, world_size * max(1, num_workers))


def check_divides(n_streams: int, world_size: int) -> None:
    if n_streams % world_size:
        sizes = ", ".join(str(d) for d in range(1, n_streams + 1) if n_streams % d == 0)
        raise DataError(
            f"the streamed data is split into {n_streams} logical streams (--data-streams, fixed when the run "
            f"started) and {world_size} processes cannot share them evenly. Run on a process count that divides "
            f"{n_streams}: {sizes}."
        )


class _Packets(IterableDataset):
    """In worker w of n (or in-process), packets of rows of this rank's streams local[w::n], forever."""

    def __init__(
        self, readers: dict[int, StreamReader], states: dict[int, dict], local: list[int], cfg: dict
    ):
        self.readers, self.states, self.local, self.cfg = readers, states, local, cfg

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        mine = self.local[info.id :: info.num_workers] if info else self.local
        rows = {s: self.readers[s].rows(self.states[s]) for s in mine}
        while True:
            picked = [(s, *next(rows[s])) for _ in range(self.cfg["per_stream"]) for s in mine]
            yield _packet(picked, self.cfg["spec"], self.cfg["packing"])


def _packet(picked: list[tuple], spec: Any, packing: bool) -> dict[str, Any]:
    """Rows (stream, tokens, starts, seed, state) -> a packet; packed rows (all of length L) masked here."""
    packet = {"streams": [p[0] for p in picked], "states": [p[4] for p in picked]}
    if packing:
        tokens, starts = np.stack([p[1] for p in picked]), np.stack([p[2] for p in picked])  # [n, L]
        starts[:, 0] = True
        packet["batch"] = make_batch(tokens, starts, np.array([p[3] for p in picked], dtype=np.uint64), spec)
    else:
        packet["rows"] = [(p[1], p[2], p[3]) for p in picked]
    return packet


class StreamBatches:
    """Infinite iterator of this rank's streaming micro-batches; state = global rows consumed + stream positions."""

    def __init__(
        self,
        make_reader: Callable[[int, int], StreamReader],
        n_streams: int,
        spec: Any,
        share: RankShare,
        num_workers: int,
        source: tuple[str, int],
    ):
        """source: (what the stream is, as saved in the data state; the seed of its order and masks)."""
        self.make_reader, self.spec, self.num_workers = make_reader, spec, num_workers
        self.rank, self.world_size, self.batch_size = share.rank, share.world_size, share.batch_size
        self.source, self.seed = source
        self._plan(n_streams)

    def _plan(self, n_streams: int) -> None:
        check_divides(n_streams, self.world_size)
        self.n_streams = n_streams
        self.local = list(range(self.rank, n_streams, self.world_size))  # this rank's streams
        self.readers = {s: self.make_reader(s, n_streams) for s in self.local}
        self.states = {s: start_state() for s in self.local}
        self.rows_consumed = 0  # global rows of all ranks' micro-batches yielded so far
        self._it: Iterator | None = None

    @property
    def packing(self) -> bool:
        return next(iter(self.readers.values())).plan.packing

    def __iter__(self) -> "StreamBatches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._start()
        picks = [self._take(self._stream_of(j)) for j in range(self.batch_size)]
        for packet, i in picks:
            self.states[packet["streams"][i]] = packet["states"][i]
        self.rows_consumed += self.batch_size * self.world_size
        return self._assemble(picks)

    def _stream_of(self, j: int) -> int:
        return (self.rows_consumed + self.rank + j * self.world_size) % self.n_streams

    def _start(self) -> None:
        workers = min(self.num_workers, len(self.local))
        cfg = {
            "per_stream": max(1, -(-self.batch_size // len(self.local))),
            "spec": self.spec,
            "packing": self.packing,
        }
        packets = _Packets(self.readers, {s: dict(v) for s, v in self.states.items()}, self.local, cfg)
        if workers == 0:
            self._it = iter(packets)
        else:
            loader = DataLoader(packets, batch_size=None, num_workers=workers, collate_fn=whole_batch)
            self._it = iter(loader)
        self._buffers: dict[int, deque] = {s: deque() for s in self.local}

    def _take(self, stream: int) -> tuple[dict[str, Any], int]:
        """(packet, row index) of `stream`'s next row; pulls packets until one holds it."""
        buffer = self._buffers[stream]
        while not buffer:
            packet = next(self._it)
            for i, s in enumerate(packet["streams"]):
                self._buffers[s].append((packet, i))
        return buffer.popleft()

    def _assemble(self, picks: list[tuple[dict[str, Any], int]]) -> dict[str, torch.Tensor]:
        if self.packing:  # rows were masked in their packets; a row's masking does not depend on its batch
            keys = [k for k in ("input_ids", "positions", "targets") if k in picks[0][0]["batch"]]
            batch = {k: torch.stack([p["batch"][k][i] for p, i in picks]) for k in keys}
            if any("padding_mask" in p["batch"] for p, _ in picks):
                batch["padding_mask"] = batch["input_ids"] == self.spec.pad_id
            return batch
        rows = [p["rows"][i] for p, i in picks]
        width = max(len(r[0]) for r in rows)
        tokens = np.full((len(rows), width), self.spec.pad_id, dtype=np.int64)  # [B, longest row]
        starts = np.zeros((len(rows), width), dtype=bool)
        for i, (ids, st, _) in enumerate(rows):
            tokens[i, : len(ids)], starts[i, : len(ids)] = ids, st
        starts[:, 0] = True
        return make_batch(tokens, starts, np.array([r[2] for r in rows], dtype=np.uint64), self.spec)

    def state_dict(self) -> dict[str, Any]:
        state = StreamDataState(
            source=self.source,
            seed=self.seed,
            n_streams=self.n_streams,
            rows_consumed=self.rows_consumed,
            rank=self.rank,
            world_size=self.world_size,
            streams={s: dict(position) for s, position in self.states.items()},
        )
        return data_state_to_dict(state)

    def load_state_dict(self, state: dict[str, Any] | DataState) -> None:
        """`state`: every rank's streams (checkpoint.state.read_data_state merges the files), or this rank's."""
        saved = data_state_from_dict(state)
        if not isinstance(saved, StreamDataState):
            raise DataError(
                "the checkpoint's data state is for local files but this run streams --dataset-name; "
                "resume with the same data source as the saved run"
            )
        if saved.source != self.source or saved.seed != self.seed:
            raise DataError(
                f"the streaming data state is for {saved.source!r} with seed {saved.seed}; this run streams "
                f"{self.source!r} with seed {self.seed}. Resume with the saved --dataset-name and --seed."
            )
        if saved.n_streams != self.n_streams:
            self._plan(saved.n_streams)  # the run's stream count was fixed when it started
        streams = {int(s): position for s, position in saved.streams.items()}
        missing = [s for s in self.local if s not in streams]
        if missing:
            raise DataError(f"the streaming data state lacks the positions of logical streams {missing[:8]}")
        self.states = {s: dict(streams[s]) for s in self.local}
        self.rows_consumed = int(saved.rows_consumed)
        self._it = None
