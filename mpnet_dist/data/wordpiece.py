"""A deterministic WordPiece vocabulary learner (BPE-style merges with `##` continuation).

`tokenizers`' WordPiece trainer breaks ties between equally frequent pairs by hash-map order, so
two runs on the same text give different vocabularies. The built-in tokenizer is trained on each
machine from its own cache; every node must get the same ids, so ties are broken here by the
pair's text and the result depends only on the word counts.
"""

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable
from itertools import islice

_TEXTS_PER_CALL = 256
Pair = tuple[str, str]


def count_words(texts: Iterable[str], normalizer, pre_tokenizer) -> Counter:
    """Word frequencies after the tokenizer's own normalizer and pre-tokenizer."""
    counts: Counter = Counter()
    it = iter(texts)
    # Documents joined by newlines pre-tokenize to the same words, with fewer calls into Rust.
    while batch := list(islice(it, _TEXTS_PER_CALL)):
        text = normalizer.normalize_str("\n".join(batch))
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(text))
    return counts


class _Merges:
    """Words as symbol lists with pair counts and an index from pair to the words holding it."""

    def __init__(self, counts: Counter, prefix: str):
        words = sorted(counts)
        self.freq = [counts[w] for w in words]
        self.symbols = [[w[0]] + [prefix + c for c in w[1:]] for w in words]
        self.prefix = prefix
        self.count: dict[Pair, int] = defaultdict(int)
        self.where: dict[Pair, set[int]] = defaultdict(set)
        for i, syms in enumerate(self.symbols):
            self._add(i, syms)

    def _add(self, i: int, syms: list[str]) -> set[Pair]:
        pairs = set(zip(syms, syms[1:], strict=False))
        for pair in zip(syms, syms[1:], strict=False):
            self.count[pair] += self.freq[i]
        for pair in pairs:
            self.where[pair].add(i)
        return pairs

    def merge(self, pair: Pair) -> tuple[str, set[Pair]]:
        """Replace every occurrence of `pair`; return the new symbol and the pairs whose count changed."""
        a, b = pair
        new = a + b.removeprefix(self.prefix)
        changed: set[Pair] = set()
        for i in sorted(self.where.pop(pair, ())):
            syms = self.symbols[i]
            for old in zip(syms, syms[1:], strict=False):
                self.count[old] -= self.freq[i]
                self.where[old].discard(i)
                changed.add(old)
            out, k = [], 0
            while k < len(syms):
                if k + 1 < len(syms) and syms[k] == a and syms[k + 1] == b:
                    out.append(new)
                    k += 2
                else:
                    out.append(syms[k])
                    k += 1
            self.symbols[i] = out
            changed |= self._add(i, out)
        changed.discard(pair)
        self.count.pop(pair, None)
        return new, changed


def learn_vocab(
    counts: Counter, vocab_size: int, specials: list[str], prefix: str = "##", min_frequency: int = 2
) -> list[str]:
    """specials, then the sorted alphabet, then merged pieces in merge order, up to vocab_size."""
    merges = _Merges(counts, prefix)
    vocab = list(specials) + sorted({s for syms in merges.symbols for s in syms} - set(specials))
    known = set(vocab)
    heap = [(-c, p) for p, c in merges.count.items()]
    heapq.heapify(heap)  # most frequent first; equal counts: smallest pair text first
    while len(vocab) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if -neg != merges.count.get(pair, 0):
            continue  # stale entry; the current count was pushed when it changed
        if -neg < min_frequency:
            break
        new, changed = merges.merge(pair)
        if new not in known:
            vocab.append(new)
            known.add(new)
        for p in changed:
            if merges.count.get(p, 0) > 0:
                heapq.heappush(heap, (-merges.count[p], p))
    return vocab
