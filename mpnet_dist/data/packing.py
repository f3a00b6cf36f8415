"""Token ids -> rows: fixed blocks of max_tokens (packing) or one document per row, in a block cache.

Packing concatenates every document's `<s> ... </s>` into one flat stream and cuts it into
blocks of max_tokens, so nothing is truncated; a long document simply spans blocks. The last,
partial block of the stream is completed at read time by wrapping around to the start of the
stream in training (nothing discarded, fewer than max_tokens tokens seen twice per pass) and is
padded in evaluation. Without packing a row is one document, and documents longer than
max_tokens are split into max_tokens chunks rather than truncated.

Local files are tokenized once into a cache directory holding flat memmaps:
    tokens.bin [T] uint16|int32, starts.bin [T] uint8 (word starts), offsets.bin [rows+1] int64
    (one-document-per-row only), meta.json
keyed by a hash of (files, sizes, mtimes, tokenizer, max_tokens, mode).
"""

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path

import numpy as np

from mpnet_dist.data.cache import build_once
from mpnet_dist.data.sources import read_documents
from mpnet_dist.data.tokenizer import Encoder

CACHE_VERSION = 1
_DOCS_PER_CALL = 512  # documents per tokenizer call: large enough to amortize, small in memory


def chunk_lengths(lengths: np.ndarray, max_tokens: int) -> np.ndarray:
    """Row lengths when each document is one row, split into max_tokens chunks: [docs] -> [rows]."""
    full, rest = np.divmod(lengths, max_tokens)
    counts = full + (rest > 0)
    rows = np.full(int(counts.sum()), max_tokens, dtype=np.int64)
    has_rest = rest > 0
    rows[(np.cumsum(counts) - 1)[has_rest]] = rest[has_rest]
    return rows


class Blocks:
    """Rows of a token store (memmapped cache or in-memory arrays).

    Packing: row i is tokens[i*L : (i+1)*L] of the flat stream. Otherwise: offsets[i] : offsets[i+1].
    """

    def __init__(
        self, tokens: np.ndarray, starts: np.ndarray, max_tokens: int, offsets: np.ndarray | None = None
    ):
        self.tokens, self.starts, self.offsets = tokens, starts, offsets
        self.max_tokens = max_tokens
        self.packing = offsets is None
        self.n_tokens = len(tokens)
        self.n_rows = -(-self.n_tokens // max_tokens) if self.packing else len(offsets) - 1
        self.path: Path | None = None

    @classmethod
    def open(cls, path: Path) -> "Blocks":
        meta = json.loads((path / "meta.json").read_text())
        tokens = np.memmap(path / "tokens.bin", dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))
        starts = np.memmap(path / "starts.bin", dtype=np.uint8, mode="r", shape=(meta["n_tokens"],))
        offsets = None
        if not meta["packing"]:
            offsets = np.memmap(path / "offsets.bin", dtype=np.int64, mode="r", shape=(meta["n_rows"] + 1,))
        blocks = cls(tokens, starts, meta["max_tokens"], offsets)
        blocks.path, blocks.meta = path, meta
        return blocks

    def __reduce__(self):  # a spawned worker reopens the memmaps instead of receiving a copy
        if self.path is not None:
            return (Blocks.open, (self.path,))
        return (Blocks, (self.tokens, self.starts, self.max_tokens, self.offsets))

    def gather(self, rows: np.ndarray, pad_id: int, wrap: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """rows [B] -> tokens [B, Lb] int64, word_starts [B, Lb] bool; short rows padded (pad_id, False).

        Lb = max_tokens when packing, else the longest row. wrap: complete the stream's last
        partial block with tokens from its start instead of padding (training).
        """
        rows = np.asarray(rows, dtype=np.int64)
        if self.packing:
            index = rows[:, None] * self.max_tokens + np.arange(self.max_tokens)  # [B, L]
            valid = index < self.n_tokens
            index = index % self.n_tokens if wrap else np.minimum(index, self.n_tokens - 1)
            tokens, starts = self.tokens[index].astype(np.int64), self.starts[index].astype(bool)
            if not wrap:
                tokens[~valid], starts[~valid] = pad_id, False
            starts[:, 0] = True  # a block may begin mid-word; it is still a unit start for the row
            return tokens, starts
        begin, end = self.offsets[rows], self.offsets[rows + 1]
        width = int((end - begin).max())
        tokens = np.full((len(rows), width), pad_id, dtype=np.int64)
        starts = np.zeros((len(rows), width), dtype=bool)
        for i, (b, e) in enumerate(zip(begin, end, strict=True)):
            tokens[i, : e - b] = self.tokens[b:e]
            starts[i, : e - b] = self.starts[b:e]
        starts[:, 0] = True
        return tokens, starts


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def pack_documents(texts: Iterable[str], encoder: Encoder, max_tokens: int, packing: bool) -> Blocks:
    """In-memory rows of a few documents (stream eval sets, tests)."""
    parts = [encoder.encode(batch) for batch in _batched(texts, _DOCS_PER_CALL)]
    ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    starts = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, bool)
    offsets = None
    if not packing:
        lengths = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(chunk_lengths(lengths, max_tokens))])
    return Blocks(ids, starts, max_tokens, offsets)


@dataclass(frozen=True)
class BlockLayout:
    """How documents become the rows of a block cache: what the cache key is made of, with the vocabulary size
    that picks the token dtype."""

    tokenizer_fp: str
    vocab_size: int
    max_tokens: int
    packing: bool
    text_field: str


def cache_key(files: list[Path], layout: BlockLayout) -> str:
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    ident = json.dumps(
        [CACHE_VERSION, stats, layout.tokenizer_fp, layout.max_tokens, layout.packing, layout.text_field]
    )
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def _write_cache(tmp: Path, files: list[Path], encoder: Encoder, layout: BlockLayout) -> None:
    max_tokens, packing = layout.max_tokens, layout.packing
    dtype = _token_dtype(layout.vocab_size)
    n_tokens = n_docs = 0
    offsets_f = None if packing else open(tmp / "offsets.bin", "wb")
    with open(tmp / "tokens.bin", "wb") as tokens_f, open(tmp / "starts.bin", "wb") as starts_f:
        if offsets_f is not None:
            offsets_f.write(np.zeros(1, np.int64).tobytes())
        docs = chain.from_iterable(read_documents(f, layout.text_field) for f in files)
        for batch in _batched(docs, _DOCS_PER_CALL):
            ids, starts, lengths = encoder.encode(batch)
            tokens_f.write(ids.astype(dtype).tobytes())
            starts_f.write(starts.astype(np.uint8).tobytes())
            if offsets_f is not None:
                offsets_f.write((n_tokens + np.cumsum(chunk_lengths(lengths, max_tokens))).tobytes())
            n_tokens += len(ids)
            n_docs += len(batch)
    if offsets_f is not None:
        offsets_f.close()
    n_rows = -(-n_tokens // max_tokens) if packing else (tmp / "offsets.bin").stat().st_size // 8 - 1
    meta = {
        "version": CACHE_VERSION,
        "files": [str(f) for f in files],
        "dtype": dtype.name,
        "n_tokens": n_tokens,
        "n_docs": n_docs,
        "n_rows": n_rows,
        "max_tokens": max_tokens,
        "packing": packing,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


def build_block_cache(files: list[Path], encoder: Encoder, layout: BlockLayout, cache_dir: Path) -> Blocks:
    """Tokenize + pack `files` once (first caller builds, concurrent callers wait) and open the cache."""
    path = build_once(
        cache_dir / "blocks" / cache_key(files, layout), lambda tmp: _write_cache(tmp, files, encoder, layout)
    )
    return Blocks.open(path)
