"""The unigram baseline: the loss of predicting every masked token from the training data's token frequencies.

Every masked-LM run first learns token frequencies and sits for a while at this loss (the "unigram
plateau"); only a validation loss clearly below it shows that the model uses context. It is the
cross-entropy of the validation targets (the predicted tokens of the validation batches) under the
add-one-smoothed frequencies of the training tokens, special tokens excluded (they are never predicted).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from mpnet_dist.data.batch import IGNORE_INDEX

logger = logging.getLogger(__name__)

SMOOTHING = 1.0  # add-one: a token the counted training text never holds still costs a finite loss
STREAM_DOCS = 1000  # streaming: documents counted per rank (its first training documents), not the stream
_CHUNK = 1 << 24  # tokens per bincount: bounds the int64 copy of a memmapped cache


def count_tokens(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """tokens [T] (any int dtype, memmaps too) -> counts [vocab_size] int64."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(tokens), _CHUNK):
        chunk = np.asarray(tokens[start : start + _CHUNK], dtype=np.int64)
        counts += np.bincount(chunk, minlength=vocab_size)[:vocab_size]
    return counts


def unigram_log_probs(counts: np.ndarray, excluded_ids: Iterable[int]) -> np.ndarray:
    """counts [V] -> log q [V]: add-one-smoothed frequencies over the predictable ids (excluded ids: -inf)."""
    smoothed = counts.astype(np.float64) + SMOOTHING
    smoothed[list(excluded_ids)] = 0.0
    with np.errstate(divide="ignore"):
        return np.log(smoothed / smoothed.sum())


def target_nll(log_probs: np.ndarray, batches: Iterable[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """(summed -log q of every predicted token, their number) over MPNet batches (targets [B, p])."""
    total, count = 0.0, 0
    for batch in batches:
        targets = batch["targets"].numpy().ravel()
        targets = targets[targets != IGNORE_INDEX]
        total -= float(log_probs[targets].sum())
        count += targets.size
    return total, count


def unigram_loss(accelerator: Any, data: Any) -> float | None:
    """Collective (every rank calls it): the baseline in nats, or None without validation data.

    `data` is the pipeline's Data: its token_counts() gives this rank's counts and whether every rank
    already holds the same global counts (local files) or only its own share (streams: summed here).
    """
    if data.token_counts is None:
        return None
    counts, shared, what = data.token_counts()
    if not shared:
        local = torch.from_numpy(counts).to(accelerator.device)
        counts = accelerator.reduce(local, reduction="sum").cpu().numpy()
    nll, n = target_nll(unigram_log_probs(counts, data.spec.excluded_ids), data.valid or [])
    sums = torch.tensor([nll, float(n)], dtype=torch.float64, device=accelerator.device)
    nll, n = accelerator.reduce(sums, reduction="sum").tolist()
    if n == 0:
        return None
    logger.info("unigram baseline: %.4f nats (validation targets under the frequencies of %s)", nll / n, what)
    return nll / n
