"""Prefetcher: the same batches as the plain iterator, a data state that counts only what was handed out,
errors raised in the consumer, and overlap with a (simulated) device step."""

from __future__ import annotations

import time

import pytest
import torch

from mpnet_dist.data import build_data
from mpnet_dist.data.prefetch import Prefetcher
from tests.helpers import make_cfg, write_docs


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefetch")
    write_docs(root / "train" / "a.txt", list(range(80)))
    return make_cfg(train_dir=str(root / "train"), data_cache_dir=str(root / "cache"))


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_batches_and_state_of_what_was_handed_out(tokenizer, cfg):
    plain = build_data(cfg, tokenizer, 0, 1).train
    source = build_data(cfg, tokenizer, 0, 1).train
    ahead = Prefetcher(source, ahead=4, device=torch.device("cpu"))
    try:
        for _ in range(5):
            assert _equal(next(ahead), next(plain))
        deadline = time.monotonic() + 30
        while source.state_dict() == plain.state_dict() and time.monotonic() < deadline:
            time.sleep(0.01)  # let the thread run ahead
        assert source.state_dict()["blocks_consumed"] > plain.state_dict()["blocks_consumed"]
        assert ahead.state_dict() == plain.state_dict()  # what a checkpoint saves: 5 batches, no more

        resumed = Prefetcher(build_data(cfg, tokenizer, 0, 1).train, ahead=2, device=torch.device("cpu"))
        resumed.load_state_dict(ahead.state_dict())
        assert all(_equal(next(resumed), next(plain)) for _ in range(3))
        resumed.close()
    finally:
        ahead.close()


class _Failing:
    def __init__(self) -> None:
        self.count = 0

    def __next__(self) -> dict:
        self.count += 1
        if self.count == 3:
            raise RuntimeError("broken shard")
        return {"x": torch.full((2,), self.count)}

    def state_dict(self) -> dict:
        return {"count": self.count}


def test_source_errors_reach_the_consumer_in_order():
    ahead = Prefetcher(_Failing(), ahead=2, device=torch.device("cpu"))
    assert [int(next(ahead)["x"][0]) for _ in range(2)] == [1, 2]
    assert ahead.state_dict() == {"count": 2}
    with pytest.raises(RuntimeError, match="broken shard"):
        next(ahead)


class _Slow:
    """Batches that take `seconds` each to build (sleep releases the GIL, as the Cython builder does)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.count = seconds, 0

    def __next__(self) -> dict:
        time.sleep(self.seconds)
        self.count += 1
        return {"x": torch.zeros(1)}

    def state_dict(self) -> dict:
        return {"count": self.count}


def test_building_overlaps_the_step():
    """A 40 ms step that needs a 30 ms batch: prefetched, the wait for data almost vanishes."""
    waits = {}
    for name, source in (
        ("plain", _Slow(0.03)),
        ("prefetched", Prefetcher(_Slow(0.03), 1, torch.device("cpu"))),
    ):
        waited = 0.0
        for _ in range(10):
            start = time.perf_counter()
            next(source)
            waited += time.perf_counter() - start
            time.sleep(0.04)  # the device step
        waits[name] = waited
        if isinstance(source, Prefetcher):
            source.close()
    assert waits["plain"] > 0.25
    assert waits["prefetched"] < 0.5 * waits["plain"], waits
