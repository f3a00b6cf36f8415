"""HF datasets streaming (offline, local JSON-lines / parquet through the same code path): eval split
taken first, logical streams over ranks and workers, exact resume on the same and on other process counts."""

import json
from collections import Counter
from itertools import islice

import pytest
import torch

from mpnet_dist.checkpoint.state import data_state_from_dict, merge_stream_states, read_data_state
from mpnet_dist.data import DataError, build_data
from mpnet_dist.data.stream_loader import default_streams
from tests import corpus
from tests.helpers import (
    CONFIGS,
    NO_DROPOUT,
    doc_ids,
    doc_text,
    finish_all,
    make_cfg,
    max_loss_diff,
    max_weight_diff,
    recover_rows,
    start,
    tiny_args,
    train,
    train_losses,
    train_state,
    weights,
)

tiny_corpus = corpus.tiny_corpus  # session fixture
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


def _stream_docs(tokenizer, data, max_batches=200):
    """This rank's streams' token sequences decoded to document ids, until each stream finished a pass.

    Row j of a micro-batch is the next row of logical stream (rows consumed + rank + j x W) mod S.
    """
    train = data.train
    tokens = {s: [] for s in train.local}
    for _ in range(max_batches):
        streams = [train._stream_of(j) for j in range(train.batch_size)]
        for s, row in zip(streams, recover_rows(next(train)), strict=True):
            tokens[s].extend(row.tolist())
        if all(st["pass"] >= 1 for st in train.state_dict()["streams"].values()):
            break
    else:
        raise AssertionError("streams did not finish a pass")
    return [doc_ids(tokenizer.decode(t, skip_special_tokens=True)) for t in tokens.values()]


def _first_pass(ids):
    seen = []
    for i in ids:
        if i in seen:
            break
        seen.append(i)
    return seen


@pytest.mark.parametrize(
    "world_size, workers, streams", [(1, 0, None), (2, 0, None), (3, 2, 6), (4, 0, 4), (2, 2, 8)]
)
def test_streams_cover_the_stream_once_and_never_see_eval(tokenizer, jsonl_dir, world_size, workers, streams):
    passes = []
    for rank in range(world_size):
        data = build_data(
            _cfg(jsonl_dir, num_workers=workers, data_streams=streams), tokenizer, rank, world_size
        )
        passes += [_first_pass(ids) for ids in _stream_docs(tokenizer, data)]
    every = [i for p in passes for i in p]
    assert sorted(every) == list(range(2 * EVAL, N_FILES * PER_FILE))  # disjoint, covering, no eval docs
    assert -1 not in every
    assert len(passes) == (streams or default_streams(world_size, workers)) and all(passes)


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
    for begin, stop in ((7, 15), (15, 24)):  # resume, then resume the resumed run
        run = build_data(cfg, tokenizer, 1, 2)
        run.train.load_state_dict(torch.load(_saved(state), weights_only=True))
        got = list(islice(run.train, stop - begin))
        assert all(_equal(a, b) for a, b in zip(got, full[begin:stop], strict=True)), (begin, stop)
        state = run.train.state_dict()


def _saved(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_a_world_size_that_does_not_divide_the_streams_is_refused(tokenizer, jsonl_dir):
    state = build_data(_cfg(jsonl_dir, data_streams=4), tokenizer, 0, 2).train.state_dict()
    run = build_data(_cfg(jsonl_dir), tokenizer, 0, 3)  # default: 12 streams, 3 divides them
    with pytest.raises(
        DataError, match=r"split into 4 logical streams .* 3 processes .* divides 4: 1, 2, 4\."
    ):
        run.train.load_state_dict(state)
    with pytest.raises(DataError, match="divides 4: 1, 2, 4"):
        build_data(_cfg(jsonl_dir, data_streams=4), tokenizer, 0, 3)


def test_parquet_goes_through_the_same_path(tokenizer, tmp_path):
    root = _write(tmp_path / "pq", "parquet")
    cfg = _cfg(root, packing=False, max_tokens=64)
    ranks = [build_data(cfg, tokenizer, r, 2) for r in range(2)]
    passes = [_first_pass(ids) for d in ranks for ids in _stream_docs(tokenizer, d)]
    assert sorted(i for p in passes for i in p) == list(range(2 * EVAL, N_FILES * PER_FILE))


def test_stream_without_training_documents_is_an_error(tokenizer, tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "a.jsonl").write_text("".join(json.dumps({"text": doc_text(i)}) + "\n" for i in range(8)))
    data = build_data(make_cfg(dataset_name=str(root), eval_samples=4), tokenizer, 0, 1)
    with pytest.raises(DataError, match="found no training documents in a whole pass"):
        next(data.train)


def _global_steps(runs, update_freq, n_steps):
    """Per optimizer step, the multiset of rows (as token tuples) of all ranks' micro-batches."""
    steps = []
    for _ in range(n_steps):
        rows = Counter()
        for run in runs:
            for _ in range(update_freq):
                rows.update(tuple(r) for r in recover_rows(next(run.train)).tolist())
        steps.append(rows)
    return steps


@pytest.mark.parametrize(
    "streams, new_world, batch, update_freq, workers",
    [(8, 1, 3, 4, 0), (8, 1, 6, 2, 2), (8, 4, 3, 1, 0), (18, 3, 2, 2, 2)],
    ids=["2to1-freq4", "2to1-workers", "2to4", "2to3-workers"],
)
def test_resume_on_another_world_size_continues_the_global_rows(
    tokenizer, jsonl_dir, streams, new_world, batch, update_freq, workers
):
    """2 processes x batch 3 x update-freq 2 (12 rows a step), stopped after step 4 and resumed on another process
    count with the same 12 rows a step: every later step holds exactly the rows of the uninterrupted run. The stream
    count does not divide 12, so a resume that took rows from the wrong streams would show."""
    cfg = _cfg(jsonl_dir, batch_size=3, data_streams=streams)
    full = _global_steps([build_data(cfg, tokenizer, r, 2) for r in range(2)], 2, 10)
    first = [build_data(cfg, tokenizer, r, 2) for r in range(2)]
    assert _global_steps(first, 2, 4) == full[:4]
    files = [torch.load(_saved(d.train.state_dict()), weights_only=True) for d in first]
    saved = merge_stream_states([data_state_from_dict(f) for f in files], "test")
    cfg = _cfg(
        jsonl_dir, batch_size=batch, num_workers=workers
    )  # default streams: the checkpoint's count wins
    resumed = [build_data(cfg, tokenizer, r, new_world) for r in range(new_world)]
    for data in resumed:
        data.train.load_state_dict(saved)
    assert _global_steps(resumed, update_freq, 6) == full[4:]
    assert sum(full[4].values()) == 12


def _train_args(corpus, run_dir, *extra):
    """The tiny model trained on the corpus's documents streamed from JSON lines (default: 12 logical streams),
    24 rows a step: --batch-size 3 and --global-batch-size 24 set --update-freq for each process count."""
    args = tiny_args(corpus, run_dir, *NO_DROPOUT, "--batch-size", "3", "--global-batch-size", "24",
                     "--checkpoint-interval", "3", "--dataset-name", str(corpus["stream"]), "--eval-samples", "8",
                     "--min-text-length", "20", "--buffer-size", "16", *extra)  # fmt: skip
    files = {"--train-dir", "--valid-file", "--test-file"}  # tiny_args' local files: not with --dataset-name
    return [a for i, a in enumerate(args) if a not in files and (i == 0 or args[i - 1] not in files)]


@pytest.mark.slow
def test_streaming_training_resumes_on_one_and_four_processes(tiny_corpus, tmp_path):
    """2 processes to step 6 (checkpoint at 3); from step 3 again on 1 process (here) and on 4 (launched)."""
    folder = tmp_path / "stream"
    folder.mkdir()
    docs = corpus.docstrings()
    for i in range(4):
        (folder / f"part{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[i::4]))
    data = {**tiny_corpus, "stream": folder}
    full, four, one = tmp_path / "full", tmp_path / "four", tmp_path / "one"
    finish_all([(start(CONFIGS / "cpu_2proc.yaml", _train_args(data, full), "--main_process_port", "0",
                       log=tmp_path / "full.log"), tmp_path / "full.log")])  # fmt: skip
    resume = ("--resume-checkpoint", str(full / "step-00000003"))
    launched = start(CONFIGS / "cpu_2proc.yaml", _train_args(data, four, *resume), "--num_processes", "4",
                     "--main_process_port", "0", log=tmp_path / "four.log")  # fmt: skip
    assert train(_train_args(data, one, *resume)) == 0
    finish_all([(launched, tmp_path / "four.log")])
    for resumed, world in ((one, 1), (four, 4)):
        state = train_state(resumed)
        assert (state["world_size"], state["config"]["update_freq"]) == (world, 8 // world)
        assert max_loss_diff(train_losses(full), train_losses(resumed), (4, 5, 6)) < 1e-5
        assert max_weight_diff(weights(full), weights(resumed)) < 1e-5
        assert state["tokens"] == train_state(full)["tokens"]
        # The data position: every logical stream at the same place, the same global row count.
        ends = [read_data_state(run / "final", 0) for run in (full, resumed)]
        assert ends[0].streams == ends[1].streams and ends[0].rows_consumed == ends[1].rows_consumed == 6 * 24
        assert len(ends[0].streams) == 12
