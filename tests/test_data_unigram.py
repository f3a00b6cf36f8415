"""The unigram baseline: counts, smoothing, and the loss checked against a count made independently."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

import mpnet_dist.data.unigram as unigram
from mpnet_dist.data import build_data
from mpnet_dist.data.sources import read_documents
from tests.helpers import doc_text, make_cfg


class OneProcess:
    """What unigram_loss needs of an Accelerator, for one process (its reduce is the identity)."""

    device = "cpu"

    @staticmethod
    def reduce(tensor, reduction):
        return tensor


def test_counts_in_chunks_equal_bincount(monkeypatch):
    tokens = np.random.default_rng(0).integers(0, 50, size=10_001).astype(np.uint16)
    monkeypatch.setattr(unigram, "_CHUNK", 997)  # many chunks, the last one partial
    assert np.array_equal(unigram.count_tokens(tokens, 60), np.bincount(tokens, minlength=60))


def test_smoothed_frequencies_exclude_specials():
    counts = np.array([5, 0, 3, 1, 0], dtype=np.int64)
    log_q = unigram.unigram_log_probs(counts, excluded_ids=(0, 4))
    assert np.isneginf(log_q[[0, 4]]).all()
    assert np.exp(log_q[1:4]) == pytest.approx(np.array([1, 4, 2]) / 7)  # add-one over the 3 predictable ids
    assert np.exp(log_q).sum() == pytest.approx(1.0)


def test_baseline_of_local_files_matches_an_independent_count(tmp_path, tokenizer):
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    (train_dir / "a.txt").write_text("\n".join(doc_text(i) for i in range(200)) + "\n")
    (tmp_path / "valid.txt").write_text("\n".join(doc_text(i) for i in range(1000, 1030)) + "\n")
    cfg = make_cfg(train_dir=str(train_dir), valid_file=str(tmp_path / "valid.txt"),
                   test_file=str(tmp_path / "valid.txt"), data_cache_dir=str(tmp_path / "cache"))  # fmt: skip
    data = build_data(cfg, tokenizer, rank=0, world_size=1)
    # Independent: Python's Counter over the tokenizer's own encoding of each training line.
    counts = Counter()
    for text in read_documents(train_dir / "a.txt"):
        counts.update(tokenizer(text)["input_ids"])
    specials = set(tokenizer.all_special_ids)
    support = [i for i in range(len(tokenizer)) if i not in specials]
    total = sum(counts[i] + 1 for i in support)
    targets = [int(t) for batch in data.valid for t in batch["targets"].flatten() if t != -100]
    expected = -sum(math.log((counts[t] + 1) / total) for t in targets) / len(targets)
    assert unigram.unigram_loss(OneProcess(), data) == pytest.approx(expected, rel=1e-9)


def test_streams_count_the_first_training_documents(tmp_path, tokenizer):
    root = tmp_path / "ds"  # a local JSON-lines dataset, streamed through HF datasets like a hub one
    root.mkdir()
    (root / "part0.jsonl").write_text("".join(json.dumps({"text": doc_text(i)}) + "\n" for i in range(40)))
    cfg = make_cfg(dataset_name=str(root), eval_samples=5, min_text_length=1, buffer_size=8)
    data = build_data(cfg, tokenizer, rank=0, world_size=1)
    counts, shared, what = data.token_counts()
    assert not shared and "first" in what  # summed over ranks by unigram_loss
    assert counts.sum() > 0
    loss = unigram.unigram_loss(OneProcess(), data)
    assert 0 < loss < math.log(len(tokenizer))  # better than uniform: the documents repeat few words
