"""HF datasets streaming (offline, local JSON-lines / parquet through the same code path): eval split
taken first, reader sharding over ranks and workers, exact resume, refused world-size changes."""

import json
from itertools import islice

import pytest
import torch

from mpnet_dist.data import DataError, build_data
from tests.helpers import doc_ids, doc_text, make_cfg, recover_rows

N_FILES, PER_FILE, EVAL = 3, 20, 5
SHORT = "begin nine nine nine end"  # 24 characters: dropped by --min-text-length 27


def _write(root, fmt):
    root.mkdir()
    for f in range(N_FILES):
        ids = range(f * PER_FILE, (f + 1) * PER_FILE)
        records = [{"text": doc_text(i), "id": i} for i in ids] + [{"text": SHORT, "id": -1}]
        if fmt == "jsonl":
            (root / f"part{f}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(records), root / f"part{f}.parquet")
    return root


@pytest.fixture(scope="module")
def jsonl_dir(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("stream") / "ds", "jsonl")


def _cfg(root, **kw):
    return make_cfg(dataset_name=str(root), eval_samples=EVAL, min_text_length=27, buffer_size=8, **kw)


def _reader_streams(tokenizer, data, per_rank, max_batches=60):
    """Each local reader's token stream decoded to document ids, until every reader finished a pass."""
    tokens = [[] for _ in range(per_rank)]
    for i in range(max_batches):
        batch = next(data.train)
        tokens[i % per_rank].extend(recover_rows(batch).reshape(-1).tolist())
        if all(r["pass"] >= 1 for r in data.train.state_dict()["readers"]):
            break
    else:
        raise AssertionError("readers did not finish a pass")
    return [doc_ids(tokenizer.decode(t, skip_special_tokens=True)) for t in tokens]


def _first_pass(ids):
    seen = []
    for i in ids:
        if i in seen:
            break
        seen.append(i)
    return seen


@pytest.mark.parametrize("world_size, workers", [(1, 0), (2, 0), (3, 0), (4, 0), (2, 2)])
def test_readers_cover_the_stream_once_and_never_see_eval(tokenizer, jsonl_dir, world_size, workers):
    per_rank = max(1, workers)
    passes = []
    for rank in range(world_size):
        data = build_data(_cfg(jsonl_dir, num_workers=workers), tokenizer, rank, world_size)
        passes += [_first_pass(ids) for ids in _reader_streams(tokenizer, data, per_rank)]
    every = [i for p in passes for i in p]
    assert sorted(every) == list(range(2 * EVAL, N_FILES * PER_FILE))  # disjoint, covering, no eval docs
    assert -1 not in every
    assert len(passes) == world_size * per_rank and all(passes)


def test_eval_documents_are_the_first_of_the_unshuffled_stream(tokenizer, jsonl_dir):
    data = build_data(_cfg(jsonl_dir, packing=False, max_tokens=64), tokenizer, 0, 1)
    valid = [
        i
        for b in data.valid
        for r in recover_rows(b)
        for i in doc_ids(tokenizer.decode(r, skip_special_tokens=True))
    ]
    test = [
        i
        for b in data.test
        for r in recover_rows(b)
        for i in doc_ids(tokenizer.decode(r, skip_special_tokens=True))
    ]
    assert valid == [0, 1, 2, 3, 4] and test == [5, 6, 7, 8, 9]
    assert all(
        torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(data.valid, data.valid, strict=True)
    )


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact_twice_in_a_row(tokenizer, jsonl_dir, workers):
    cfg = _cfg(jsonl_dir, num_workers=workers)
    full = list(islice(build_data(cfg, tokenizer, 1, 2).train, 24))  # crosses chunks and passes
    run = build_data(cfg, tokenizer, 1, 2)
    assert all(_equal(a, b) for a, b in zip(islice(run.train, 7), full, strict=False))
    state = run.train.state_dict()
    for start, stop in ((7, 15), (15, 24)):  # resume, then resume the resumed run
        run = build_data(cfg, tokenizer, 1, 2)
        run.train.load_state_dict(torch.load(_saved(state), weights_only=True))
        got = list(islice(run.train, stop - start))
        assert all(_equal(a, b) for a, b in zip(got, full[start:stop], strict=True)), (start, stop)
        state = run.train.state_dict()


def _saved(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_changed_world_size_or_readers_is_refused(tokenizer, jsonl_dir):
    state = build_data(_cfg(jsonl_dir), tokenizer, 0, 2).train.state_dict()
    with pytest.raises(DataError, match=r"saved by 2 processes x 1 readers .* this run has 3 x 1"):
        build_data(_cfg(jsonl_dir), tokenizer, 0, 3).train.load_state_dict(state)
    with pytest.raises(DataError, match="this run has 2 x 2"):
        build_data(_cfg(jsonl_dir, num_workers=2), tokenizer, 0, 2).train.load_state_dict(state)


def test_parquet_goes_through_the_same_path(tokenizer, tmp_path):
    root = _write(tmp_path / "pq", "parquet")
    cfg = _cfg(root, packing=False, max_tokens=64)
    ranks = [build_data(cfg, tokenizer, r, 2) for r in range(2)]
    passes = [_first_pass(ids) for d in ranks for ids in _reader_streams(tokenizer, d, 1)]
    assert sorted(i for p in passes for i in p) == list(range(2 * EVAL, N_FILES * PER_FILE))


def test_stream_without_training_documents_is_an_error(tokenizer, tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "a.jsonl").write_text("".join(json.dumps({"text": doc_text(i)}) + "\n" for i in range(8)))
    data = build_data(make_cfg(dataset_name=str(root), eval_samples=4), tokenizer, 0, 1)
    with pytest.raises(DataError, match="found no training documents in a whole pass"):
        next(data.train)
