"""Packing into blocks, one-document rows, and the block cache (built once, keyed by inputs)."""

import multiprocessing as mp
import os
import time

import numpy as np

from mpnet_dist.data.cache import build_once
from mpnet_dist.data.packing import BlockLayout, Blocks, build_block_cache, pack_documents
from mpnet_dist.data.tokenizer import Encoder, fingerprint
from tests.helpers import doc_text, write_docs


def _cache(tokenizer, files, root, max_tokens=32, packing=True):
    enc = Encoder(tokenizer)
    layout = BlockLayout(fingerprint(tokenizer), len(tokenizer), max_tokens, packing, "text")
    return build_block_cache(files, enc, layout, root)


def test_packed_blocks_keep_every_token_and_wrap_only_in_training(tokenizer, tmp_path):
    files = [
        write_docs(tmp_path / "a.txt", list(range(30))),
        write_docs(tmp_path / "b.jsonl", list(range(30, 50)), "jsonl"),
    ]
    blocks = _cache(tokenizer, files, tmp_path / "c")
    ids, starts, _ = Encoder(tokenizer).encode([doc_text(i) for i in range(50)])
    assert blocks.n_tokens == len(ids) and blocks.n_rows == -(-len(ids) // 32)
    rows = np.arange(blocks.n_rows)
    tokens, word_starts = blocks.gather(rows, tokenizer.pad_token_id, wrap=False)
    tail = len(ids) - 32 * (blocks.n_rows - 1)
    assert tail < 32  # the test has a partial last block
    assert np.array_equal(tokens.reshape(-1)[: len(ids)], ids)  # nothing dropped, order kept
    assert (tokens[-1, tail:] == tokenizer.pad_token_id).all()
    expected_starts = starts.copy()
    expected_starts[::32] = True  # a block's first token always starts a unit
    assert np.array_equal(word_starts.reshape(-1)[: len(ids)], expected_starts)
    wrapped, _ = blocks.gather(rows[-1:], tokenizer.pad_token_id, wrap=True)
    assert np.array_equal(wrapped[0], np.concatenate([ids[-tail:], ids[: 32 - tail]]))
    # Every document appears whole, each as <s> ... </s>.
    assert (ids == tokenizer.bos_token_id).sum() == 50 == (ids == tokenizer.eos_token_id).sum()


def test_one_document_per_row_splits_long_documents(tokenizer, tmp_path):
    long_doc = doc_text(7, n_words=100)
    blocks = pack_documents([doc_text(1), long_doc, doc_text(2)], Encoder(tokenizer), 32, packing=False)
    ids, _, lengths = Encoder(tokenizer).encode([doc_text(1), long_doc, doc_text(2)])
    assert lengths[1] > 64
    tokens, _ = blocks.gather(np.arange(blocks.n_rows), tokenizer.pad_token_id)
    assert blocks.n_rows == 1 + -(-lengths[1] // 32) + 1
    kept = tokens[tokens != tokenizer.pad_token_id]
    assert np.array_equal(kept, ids)  # split, not truncated
    assert tokens.shape[1] == 32


def test_cache_is_reused_and_keyed_by_its_inputs(tokenizer, tmp_path):
    path = write_docs(tmp_path / "a.txt", list(range(20)))
    first = _cache(tokenizer, [path], tmp_path / "c")
    again = _cache(tokenizer, [path], tmp_path / "c")
    assert again.path == first.path
    assert _cache(tokenizer, [path], tmp_path / "c", max_tokens=16).path != first.path
    assert _cache(tokenizer, [path], tmp_path / "c", packing=False).path != first.path
    write_docs(path, list(range(21)))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert _cache(tokenizer, [path], tmp_path / "c").path != first.path
    reopened = Blocks.open(first.path)
    assert np.array_equal(reopened.tokens, first.tokens)


def _build_slowly(target: str, log: str) -> None:
    def build(tmp):
        with open(log, "a") as f:
            f.write("built\n")
        time.sleep(0.5)
        (tmp / "done").write_text("x")

    build_once(__import__("pathlib").Path(target), build)


def test_concurrent_builders_build_once(tmp_path):
    ctx = mp.get_context("fork")
    procs = [
        ctx.Process(target=_build_slowly, args=(str(tmp_path / "out"), str(tmp_path / "log")))
        for _ in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    assert (tmp_path / "log").read_text() == "built\n"
    assert (tmp_path / "out" / "done").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]
