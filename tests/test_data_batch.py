"""MPNet batch builder: layout, Cython == NumPy, determinism, statistics, padded rows, whole words."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from mpnet_dist.data import permutation
from mpnet_dist.data.batch import IGNORE_INDEX, MaskingSpec, count_predictions, make_mpnet_batch

BOS, PAD, EOS, UNK = 0, 1, 2, 3
VOCAB = 30527
MASK = VOCAB - 1
SPEC = MaskingSpec(mask_id=MASK, pad_id=PAD, special_ids=(BOS, PAD, EOS, UNK, MASK), vocab_size=VOCAB)
SPECIALS = np.array(SPEC.special_ids)

needs_extension = pytest.mark.skipif(not permutation.HAS_EXTENSION, reason="Cython extension not built")
BOTH_PATHS = [pytest.param(True, marks=needs_extension, id="cython"), pytest.param(False, id="numpy")]


def packed_rows(
    rng: np.random.Generator, batch: int, length: int, eos_rate: float = 0.02
) -> tuple[np.ndarray, np.ndarray]:
    """Packed blocks `<s> doc </s> doc </s> ...` and word starts (~1.4 tokens per word, specials start)."""
    tokens = rng.integers(UNK + 1, MASK, size=(batch, length))
    tokens[rng.random((batch, length)) < eos_rate] = EOS
    tokens[:, 0] = BOS
    starts = (rng.random((batch, length)) < 0.7) | np.isin(tokens, SPECIALS)
    return tokens, starts


def padded_rows(rng: np.random.Generator, lengths: list[int], length: int) -> tuple[np.ndarray, np.ndarray]:
    """One document per row, `<s> doc </s>` right-padded with PAD to `length`."""
    tokens, starts = packed_rows(rng, len(lengths), length)
    tokens[tokens == EOS] = UNK + 7
    for row, n in enumerate(lengths):
        tokens[row, n - 1] = EOS
        tokens[row, n:] = PAD
    starts |= tokens == PAD
    return tokens, starts


def check_layout(tokens: np.ndarray, out: dict[str, torch.Tensor]) -> None:
    batch, length = tokens.shape
    p = count_predictions(length, SPEC.pred_prob)
    ids, pos, targets = out["input_ids"].numpy(), out["positions"].numpy(), out["targets"].numpy()
    assert ids.shape == pos.shape == (batch, length + 2 * p) and targets.shape == (batch, p)
    assert all(v.dtype == torch.int64 for k, v in out.items() if k != "padding_mask")
    np.testing.assert_array_equal(
        np.sort(pos[:, :length], axis=1), np.broadcast_to(np.arange(length), (batch, length))
    )
    np.testing.assert_array_equal(ids[:, :length], np.take_along_axis(tokens, pos[:, :length], axis=1))
    first, second = ids[:, length : length + p], ids[:, length + p :]
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(pos[:, length : length + p], pos[:, length - p : length])
    np.testing.assert_array_equal(pos[:, length + p :], pos[:, length - p : length])
    tail_tokens = np.take_along_axis(tokens, pos[:, length - p : length], axis=1)
    predicted = targets != IGNORE_INDEX
    np.testing.assert_array_equal(targets[predicted], tail_tokens[predicted])
    assert not np.isin(targets[predicted], SPECIALS).any()
    # Non-predicted tail slots come after the predictions and copy their (pad/special) token.
    assert (np.diff(predicted.astype(int), axis=1) <= 0).all()
    assert np.isin(tail_tokens[~predicted], SPECIALS).all()
    np.testing.assert_array_equal(first[~predicted], tail_tokens[~predicted])
    if (tokens == PAD).any():
        np.testing.assert_array_equal(out["padding_mask"].numpy(), ids == PAD)
    else:
        assert "padding_mask" not in out


@pytest.mark.parametrize("use_cython", BOTH_PATHS)
@pytest.mark.parametrize("whole_word", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_layout(use_cython: bool, whole_word: bool, padded: bool) -> None:
    rng = np.random.default_rng(0)
    tokens, starts = padded_rows(rng, [64, 5, 30, 63], 64) if padded else packed_rows(rng, 4, 64)
    out = make_mpnet_batch(tokens, starts if whole_word else None, np.arange(4), SPEC, use_cython=use_cython)
    check_layout(tokens, out)


@needs_extension
@pytest.mark.parametrize("whole_word", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_cython_matches_numpy(whole_word: bool, padded: bool) -> None:
    rng = np.random.default_rng(1)
    lengths = rng.integers(2, 257, size=32).tolist()
    tokens, starts = padded_rows(rng, lengths, 256) if padded else packed_rows(rng, 32, 256)
    seeds = rng.integers(0, 2**63, size=32)
    word_starts = starts if whole_word else None
    fast = make_mpnet_batch(tokens, word_starts, seeds, SPEC, use_cython=True)
    slow = make_mpnet_batch(tokens, word_starts, seeds, SPEC, use_cython=False)
    assert fast.keys() == slow.keys()
    for key in fast:
        assert torch.equal(fast[key], slow[key]), key


def test_fallback_warns_once_and_explicit_cython_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(permutation, "HAS_EXTENSION", False)
    monkeypatch.setattr(permutation, "_warned_fallback", False)
    tokens, starts = packed_rows(np.random.default_rng(2), 2, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_mpnet_batch(tokens, starts, np.arange(2), SPEC)
        make_mpnet_batch(tokens, starts, np.arange(2), SPEC)
    assert [w.category for w in caught] == [RuntimeWarning]
    with pytest.raises(ImportError, match="build_ext"):
        make_mpnet_batch(tokens, starts, np.arange(2), SPEC, use_cython=True)


@pytest.mark.parametrize("use_cython", BOTH_PATHS)
@pytest.mark.parametrize("padded", [False, True])
def test_deterministic_and_row_independent(use_cython: bool, padded: bool) -> None:
    rng = np.random.default_rng(3)
    tokens, starts = padded_rows(rng, [128, 17, 90, 128, 50, 3], 128) if padded else packed_rows(rng, 6, 128)
    seeds = np.array([5, 2**64 - 1, 0, 12345, 7, 8], dtype=np.uint64)
    out = make_mpnet_batch(tokens, starts, seeds, SPEC, use_cython=use_cython)
    again = make_mpnet_batch(tokens, starts, seeds, SPEC, use_cython=use_cython)
    assert all(torch.equal(out[k], again[k]) for k in out)
    for row in range(len(seeds)):
        alone = make_mpnet_batch(
            tokens[row : row + 1], starts[row : row + 1], seeds[row : row + 1], SPEC, use_cython
        )
        for key in ("input_ids", "positions", "targets"):
            assert torch.equal(alone[key][0], out[key][row]), (row, key)
    flipped = make_mpnet_batch(tokens[::-1], starts[::-1], seeds[::-1], SPEC, use_cython=use_cython)
    assert all(torch.equal(flipped[k], out[k].flip(0)) for k in out)
    # Another seed, another permutation; int32 tokens and int64 seeds give the same batch.
    other = make_mpnet_batch(tokens, starts, seeds + np.uint64(1), SPEC, use_cython=use_cython)
    assert not torch.equal(other["positions"], out["positions"])
    cast = make_mpnet_batch(
        tokens.astype(np.int32), starts, seeds.astype(np.int64), SPEC, use_cython=use_cython
    )
    assert all(torch.equal(cast[k], out[k]) for k in out)


def test_statistics_packed() -> None:
    rng = np.random.default_rng(4)
    tokens, starts = packed_rows(rng, 512, 512, eos_rate=0.005)  # ~200-token documents
    out = make_mpnet_batch(tokens, starts, np.arange(512), SPEC)
    check_layout(tokens, out)
    targets = out["targets"].numpy()
    p = targets.shape[1]
    copies = out["input_ids"].numpy()[:, -p:]
    predicted = targets != IGNORE_INDEX
    candidates = int((~np.isin(tokens, SPECIALS)).sum())
    assert candidates > 200_000
    assert abs(predicted.sum() / candidates - 0.15) < 0.005
    mask = copies[predicted] == MASK
    keep = copies[predicted] == targets[predicted]
    rand = ~mask & ~keep
    assert abs(mask.mean() - 0.8) < 0.01 and abs(keep.mean() - 0.1) < 0.01 and abs(rand.mean() - 0.1) < 0.01
    replaced = copies[predicted][rand]
    assert not np.isin(replaced, SPECIALS).any() and replaced.min() >= 0 and replaced.max() < VOCAB


def test_replacements_uniform_over_non_special_ids() -> None:
    spec = MaskingSpec(
        mask_id=49,
        pad_id=PAD,
        special_ids=(BOS, PAD, EOS, UNK, 49),
        vocab_size=50,
        rand_prob=1.0,
        keep_prob=0.0,
    )
    rng = np.random.default_rng(5)
    tokens = rng.integers(4, 6, size=(64, 400))  # only ids 4 and 5 in the text
    copies = make_mpnet_batch(tokens, None, np.arange(64), spec)["input_ids"].numpy()[:, -60:]
    counts = np.bincount(copies.ravel(), minlength=64)
    assert counts[[BOS, PAD, EOS, UNK, 49]].sum() == 0 and counts[50:].sum() == 0
    expected = copies.size / 45
    assert counts[4:49].min() > 0.6 * expected and counts[4:49].max() < 1.4 * expected


@pytest.mark.parametrize("use_cython", BOTH_PATHS)
def test_one_document_per_row_predicts_own_fraction(use_cython: bool) -> None:
    rng = np.random.default_rng(6)
    lengths = [512, 500, 300, 120, 40, 12, 4]
    tokens, starts = padded_rows(rng, lengths, 512)
    out = make_mpnet_batch(tokens, starts, np.arange(len(lengths)), SPEC, use_cython=use_cython)
    check_layout(tokens, out)
    p = count_predictions(512, 0.15)
    n_predicted = (out["targets"].numpy() != IGNORE_INDEX).sum(axis=1)
    own = np.array(lengths) - 2  # minus <s> and </s>
    assert n_predicted[0] == p  # a full row fills the tail
    np.testing.assert_array_equal(n_predicted[1:], np.maximum(1, np.rint(0.15 * own[1:])))
    assert np.all(np.abs(n_predicted[1:5] / own[1:5] - 0.15) < 0.02)
    # Tail slots without a prediction hold padding in the content stream and in both copies.
    mask = out["padding_mask"].numpy()
    for row, k in enumerate(n_predicted):
        assert mask[row, 512 - p + k : 512].all() and not mask[row, 512 - p : 512 - p + k].any()
        assert mask[row, 512 + k : 512 + p].all() and mask[row, 512 + p + k :].all()


@pytest.mark.parametrize("use_cython", BOTH_PATHS)
def test_degenerate_rows(use_cython: bool) -> None:
    """Fewer predictable tokens than p: extra tail slots get specials/pads and target -100."""
    tokens = np.full((3, 40), EOS)
    tokens[0, 5:8] = [10, 11, 12]  # packed, 3 predictable < p = 6
    tokens[1, :] = [BOS] + [20] * 4 + [EOS] + [PAD] * 34  # padded, enough pads
    tokens[2, 0] = BOS  # nothing to predict
    out = make_mpnet_batch(tokens, None, np.arange(3), SPEC, use_cython=use_cython)
    check_layout(tokens, out)
    assert (out["targets"] != IGNORE_INDEX).sum(1).tolist() == [3, 1, 0]
    alone = make_mpnet_batch(tokens[:1], None, np.arange(1), SPEC, use_cython=use_cython)
    assert "padding_mask" not in alone and (alone["targets"] != IGNORE_INDEX).sum() == 3


@pytest.mark.parametrize("use_cython", BOTH_PATHS)
def test_whole_words_stay_contiguous(use_cython: bool) -> None:
    rng = np.random.default_rng(7)
    tokens, starts = packed_rows(rng, 64, 256)
    starts = (rng.random(tokens.shape) < 0.4) | np.isin(tokens, SPECIALS)  # long words
    pos = make_mpnet_batch(tokens, starts, np.arange(64), SPEC, use_cython=use_cython)["positions"].numpy()
    p = count_predictions(256, 0.15)
    eff_starts = starts | np.isin(tokens, SPECIALS)
    eff_starts[:, 1:] |= np.isin(tokens[:, :-1], SPECIALS)
    word_id = np.cumsum(eff_starts, axis=1)  # [B, L]
    tail_shuffled = 0
    for row in range(64):
        order = pos[row, :256]
        body, tail = order[: 256 - p], order[256 - p :]
        continuation = ~eff_starts[row, body]
        # Each non-start token directly follows its predecessor in the non-predicted part.
        assert (body[1:][continuation[1:]] == body[:-1][continuation[1:]] + 1).all()
        assert not continuation[0]
        # Words are chosen whole: at most one word (the one cut by the boundary) is split.
        split = set(word_id[row, body]) & set(word_id[row, tail])
        assert len(split) <= 1
        tail_continuation = ~eff_starts[row, tail[1:]]
        tail_shuffled += int((tail[1:][tail_continuation] != tail[:-1][tail_continuation] + 1).any())
    assert tail_shuffled > 48  # the predicted tail is reshuffled at token level


def test_whole_word_flag_off_ignores_word_starts() -> None:
    tokens, starts = packed_rows(np.random.default_rng(8), 4, 64)
    spec = MaskingSpec(
        mask_id=MASK, pad_id=PAD, special_ids=SPEC.special_ids, vocab_size=VOCAB, whole_word=False
    )
    a = make_mpnet_batch(tokens, starts, np.arange(4), spec)
    b = make_mpnet_batch(tokens, None, np.arange(4), spec)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "kwargs",
    [{"pred_prob": 0.0}, {"pred_prob": 1.5}, {"rand_prob": 0.6, "keep_prob": 0.6}, {"keep_prob": -0.1}],
)
def test_spec_validation(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        MaskingSpec(mask_id=MASK, pad_id=PAD, special_ids=SPEC.special_ids, vocab_size=VOCAB, **kwargs)


def test_input_validation() -> None:
    tokens = np.zeros((2, 8), dtype=np.int64)
    with pytest.raises(ValueError, match="seeds"):
        make_mpnet_batch(tokens, None, np.arange(3), SPEC)
    with pytest.raises(ValueError, match="word_starts"):
        make_mpnet_batch(tokens, np.ones((2, 7), dtype=bool), np.arange(2), SPEC)
