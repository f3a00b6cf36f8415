"""Background prefetch: the next micro-batches are built (and on CUDA pinned and copied to the device) in a
thread while the current optimizer step runs, so the step never waits for data it could have had ready.

The data state it reports is the state after the micro-batches it has handed out, never after the ones it
has fetched ahead: a checkpoint saved after step k resumes exactly at step k + 1's batches.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch

_POLL_S = 0.1  # how often a blocked producer checks whether it was closed


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetcher:
    """Iterator over `source`'s micro-batches, up to `ahead` of them fetched in advance by one thread.

    `source` is an infinite iterator with state_dict() / load_state_dict() (TrainBatches, StreamBatches).
    On CUDA each batch is pinned and copied on a side stream; the consuming stream waits for that copy.
    """

    def __init__(self, source: Any, ahead: int, device: torch.device) -> None:
        if ahead < 1:
            raise ValueError(f"ahead must be >= 1, got {ahead}")
        self.source, self.ahead, self.device = source, ahead, torch.device(device)
        self._state = source.state_dict()  # after the batches handed out so far: none yet
        self._start()

    def _start(self) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=self.ahead)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="mpnet-dist-prefetch", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        try:
            while not self._closed.is_set():
                batch = next(self.source)
                state = self.source.state_dict()  # read in this thread, right after the batch it belongs to
                ready = None
                if copy_stream is not None:
                    with torch.cuda.stream(copy_stream):
                        batch = {
                            k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()
                        }
                        ready = torch.cuda.Event()
                        ready.record(copy_stream)
                self._put((batch, state, ready))
        except BaseException as err:  # handed to the consumer, raised there
            self._put(_Failure(err))

    def _put(self, item: Any) -> None:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        item = self._queue.get()
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        batch, state, ready = item
        if ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            for tensor in batch.values():
                tensor.record_stream(current)  # the copy stream's memory is now used on this stream
        self._state = state
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self._state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Drop what was fetched ahead, restore the source, fetch again from there."""
        self.close()
        self.source.load_state_dict(state)
        self._state = self.source.state_dict()
        self._start()

    def close(self) -> None:
        """Stop the thread; batches fetched ahead are dropped (the reported state never included them)."""
        self._closed.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                pass
            self._thread.join(timeout=_POLL_S)
