"""Local files: rank/worker sharding, determinism, exact resume (also in a fresh process and on a
different number of ranks at the same global batch), and eval sets."""

import os
import subprocess
import sys
import textwrap
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from mpnet_dist.data import build_data
from tests.helpers import doc_ids, make_cfg, recover_rows, write_docs

N_DOCS = 60


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    write_docs(root / "train" / "a.txt", list(range(0, 40)))
    write_docs(root / "train" / "b.jsonl", list(range(40, N_DOCS)), "jsonl")
    write_docs(root / "valid.txt", list(range(100, 120)))
    return root


def _cfg(files, **kw):
    base = dict(
        train_dir=str(files / "train"),
        valid_file=str(files / "valid.txt"),
        data_cache_dir=str(files / "cache"),
    )
    return make_cfg(**{**base, **kw})


def _ranks(tokenizer, cfg, world_size):
    return [build_data(cfg, tokenizer, r, world_size) for r in range(world_size)]


def _global_rows(ranks, n_micro):
    """Rows of the first n_micro global micro-batches, in global position order."""
    per_rank = [[recover_rows(next(d.train)) for _ in range(n_micro)] for d in ranks]
    return [row for m in range(n_micro) for r in range(len(ranks)) for row in per_rank[r][m]]


def _block_lookup(data, pad_id):
    blocks = data.train.dataset.blocks
    tokens, _ = blocks.gather(np.arange(blocks.n_rows), pad_id, wrap=True)
    lookup = {row.tobytes(): i for i, row in enumerate(tokens)}
    assert len(lookup) == blocks.n_rows  # rows are distinguishable
    return lookup, blocks.n_rows


@pytest.mark.parametrize("world_size, workers", [(1, 0), (2, 0), (3, 0), (4, 0), (2, 2)])
def test_packed_pass_is_split_disjointly_over_ranks(tokenizer, files, world_size, workers):
    ranks = _ranks(tokenizer, _cfg(files, num_workers=workers), world_size)
    lookup, n = _block_lookup(ranks[0], tokenizer.pad_token_id)
    step = 4 * world_size
    rows = _global_rows(ranks, -(-n // step) + 1)
    seen = [lookup[row.tobytes()] for row in rows]
    assert sorted(seen[:n]) == list(range(n))  # one pass: every block once, across all ranks
    assert seen[n : n + step] != seen[:step]  # the next pass has a new order


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_document_rows_cover_the_files_once_per_pass(tokenizer, files, world_size):
    cfg = _cfg(files, packing=False, max_tokens=64)
    ranks = _ranks(tokenizer, cfg, world_size)
    assert ranks[0].train.dataset.blocks.n_rows == N_DOCS  # every document fits one row
    rows = _global_rows(ranks, -(-N_DOCS // (4 * world_size)))[:N_DOCS]
    ids = [i for row in rows for i in doc_ids(tokenizer.decode(row, skip_special_tokens=True))]
    assert Counter(ids) == Counter(range(N_DOCS))


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_the_same_batches(tokenizer, files, workers):
    cfg = _cfg(files, num_workers=workers)
    full = list(islice(build_data(cfg, tokenizer, 1, 2).train, 20))  # 20 x 8 > 47 blocks: crosses a pass
    first = build_data(cfg, tokenizer, 1, 2)
    head = list(islice(first.train, 13))
    assert all(_equal(a, b) for a, b in zip(head, full, strict=False))  # a deterministic function of the seed
    state = first.train.state_dict()
    assert state["blocks_consumed"] == 13 * 8  # batches yielded, not prefetched by workers
    resumed = build_data(cfg, tokenizer, 1, 2)
    resumed.train.load_state_dict(state)
    assert all(_equal(a, b) for a, b in zip(islice(resumed.train, 7), full[13:], strict=True))
    # A state round-trips through torch.save/load(weights_only=True).
    assert all(type(v) in (int, str) for v in state.values())


def test_resume_on_a_different_number_of_ranks_keeps_the_global_sequence(tokenizer, files):
    # Same global batch 8 = batch_size x world_size x update_freq in all three layouts.
    ref = _global_rows(_ranks(tokenizer, _cfg(files, batch_size=8), 1), 12)
    two = _ranks(tokenizer, _cfg(files, batch_size=4), 2)
    first = _global_rows(two, 5)
    four = _ranks(tokenizer, _cfg(files, batch_size=1, update_freq=2), 4)
    for d in four:
        d.train.load_state_dict(two[0].train.state_dict())
    rest = _global_rows(four, 14)
    assert np.array_equal(np.stack(first + rest), np.stack(ref))


def test_resume_in_a_fresh_process(tokenizer, files, tmp_path):
    cfg = _cfg(files)
    data = build_data(cfg, tokenizer, 0, 2)
    list(islice(data.train, 4))
    torch.save(data.train.state_dict(), tmp_path / "state.pt")
    expected = list(islice(data.train, 3))
    script = textwrap.dedent(f"""
        import torch, types
        from itertools import islice
        from mpnet_dist.data import build_data, load_tokenizer
        cfg = types.SimpleNamespace(**{vars(cfg)!r})
        data = build_data(cfg, load_tokenizer({tokenizer.name_or_path!r}), 0, 2)
        data.train.load_state_dict(torch.load({str(tmp_path / "state.pt")!r}, weights_only=True))
        torch.save(list(islice(data.train, 3)), {str(tmp_path / "out.pt")!r})
    """)
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=repo, env=env, timeout=120)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert all(_equal(a, b) for a, b in zip(got, expected, strict=True))


def test_eval_batches_are_fixed_and_split_over_ranks(tokenizer, files):
    ranks = _ranks(tokenizer, _cfg(files, packing=False, max_tokens=64), 3)
    for d in ranks:
        next(d.train)  # training progress must not change eval masks
        a, b = list(d.valid), list(d.valid)
        assert len(a) == len(d.valid) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    ids = [
        i
        for d in ranks
        for batch in d.valid
        for row in recover_rows(batch)
        for i in doc_ids(tokenizer.decode(row, skip_special_tokens=True))
    ]
    assert Counter(ids) == Counter(range(100, 120))
    assert ranks[0].test is None
