"""Tokenizers: load and validate any HF fast tokenizer, train a WordPiece one, encode documents."""

import argparse
import hashlib
import os
import sys
from collections.abc import Iterable
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from mpnet_dist.data.cache import CACHE_ENV, DEFAULT_CACHE_DIR, build_once, cache_root
from mpnet_dist.data.errors import DataError
from mpnet_dist.data.sources import list_train_files, read_documents
from mpnet_dist.data.wordpiece import count_words, learn_vocab

BUILTIN = "builtin"
BUILTIN_VOCAB_SIZE = 8192
TRAINER_VERSION = 1  # part of the builtin cache name: bump when training changes
# MPNet's layout: HF MPNet derives position ids by comparing input_ids with 1, so <pad> must be 1.
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
MASK = "<mask>"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def _is_file(item: str | os.PathLike) -> bool:
    if isinstance(item, os.PathLike):
        return True
    try:
        return "\n" not in item and Path(item).is_file()
    except OSError:  # a long text is not a path ("File name too long")
        return False


def _texts(files_or_texts: Iterable[str | os.PathLike], text_field: str) -> Iterable[str]:
    items = list(files_or_texts) if isinstance(files_or_texts, list | tuple) else None
    if items is not None and items and all(_is_file(x) for x in items):
        return chain.from_iterable(read_documents(p, text_field) for p in items)
    return files_or_texts if items is None else items  # type: ignore[return-value]


def train_tokenizer(
    files_or_texts: Iterable[str | os.PathLike],
    output_dir: str | os.PathLike,
    vocab_size: int = 30_527,
    lowercase: bool = True,
    text_field: str = "text",
) -> Path:
    """Train a WordPiece tokenizer (`##` continuation) with MPNet's special-token layout and save it.

    <s>=0, <pad>=1, </s>=2, <unk>=3, <mask> last; single sequences become `<s> ... </s>`. The
    folder loads offline with `AutoTokenizer.from_pretrained(output_dir)` (class MPNetTokenizer).
    Deterministic: the same text gives the same ids on every machine (see wordpiece.py); it counts
    words in Python at about 1 MB/s, so train on a sample of a very large corpus.
    `files_or_texts`: a list of file paths (txt / JSON lines / gzip, as for --train-dir) or texts.
    """
    from tokenizers import normalizers, pre_tokenizers
    from transformers import MPNetTokenizer

    normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    counts = count_words(_texts(files_or_texts, text_field), normalizer, pre_tokenizers.BertPreTokenizer())
    pieces = learn_vocab(counts, vocab_size - 1, SPECIALS)
    if len(pieces) <= len(SPECIALS):
        raise DataError("train_tokenizer: no text to train on (every document was empty)")
    vocab = {piece: i for i, piece in enumerate(pieces)}
    vocab[MASK] = len(vocab)
    tokenizer = MPNetTokenizer(vocab=vocab, unk_token="<unk>", do_lower_case=lowercase)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    return out


def builtin_tokenizer_dir(data_cache_dir: str | None = None) -> Path:
    """The tokenizer trained on the built-in corpus, trained once (seconds) and cached."""
    from mpnet_dist.data.corpus import corpus_id, materialize_builtin_corpus

    corpus = materialize_builtin_corpus(data_cache_dir)
    target = (
        cache_root(data_cache_dir)
        / "tokenizers"
        / f"builtin-{corpus_id()}-v{BUILTIN_VOCAB_SIZE}-wp{TRAINER_VERSION}"
    )
    files = sorted(corpus.train_dir.iterdir())
    return build_once(target, lambda tmp: train_tokenizer(files, tmp, vocab_size=BUILTIN_VOCAB_SIZE))


def load_tokenizer(name_or_path: str, data_cache_dir: str | None = None) -> Any:
    """Any HF fast tokenizer with mask and pad tokens; "builtin" is the cached built-in one."""
    from transformers import AutoTokenizer

    path = str(builtin_tokenizer_dir(data_cache_dir)) if name_or_path == BUILTIN else name_or_path
    if Path(path).is_dir() and not any((Path(path) / name).is_file() for name in _TOKENIZER_FILES):
        raise DataError(
            f"--tokenizer-name {path}: the folder holds no tokenizer ({', '.join(_TOKENIZER_FILES)}); give the "
            "folder a tokenizer was saved to (save_pretrained, or `mpnet-dist tokenizer --output-dir`)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)  # never run a folder's code
    except Exception as e:  # OSError, HTTP errors, ValueError: all mean "cannot load that"
        raise DataError(
            f"--tokenizer-name {name_or_path!r} could not be loaded ({str(e).strip() or type(e).__name__}). "
            "Without network access use "
            "--tokenizer-name builtin (trained on the built-in corpus) or a local folder saved with "
            "save_pretrained (`mpnet-dist tokenizer` makes one)."
        ) from e
    validate_tokenizer(tokenizer, name_or_path)
    return tokenizer


def validate_tokenizer(tokenizer: Any, name: str = "the tokenizer") -> None:
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise DataError(
            f"tokenizer {name!r} is not a fast (Rust `tokenizers`) tokenizer; its word ids are needed for "
            "whole-word masking. Use a folder with tokenizer.json, or convert it: "
            "AutoTokenizer.from_pretrained(name, use_fast=True).save_pretrained(dir)"
        )
    for role in ("mask", "pad"):
        if getattr(tokenizer, f"{role}_token_id", None) is None:
            raise DataError(
                f"tokenizer {name!r} has no {role} token; MPNet needs one. Add it and save a copy: "
                f"tok.add_special_tokens({{'{role}_token': '<{role}>'}}); tok.save_pretrained(dir), then "
                "--tokenizer-name dir (the model's vocabulary grows by one), or train one with `mpnet-dist tokenizer`."
            )


def check_vocab(tokenizer: Any, expected_vocab_size: int) -> None:
    """Refuse a tokenizer whose size differs from the one a checkpoint was trained with."""
    if len(tokenizer) != expected_vocab_size:
        name = getattr(tokenizer, "name_or_path", "the tokenizer")
        raise DataError(
            f"tokenizer {name!r} has {len(tokenizer)} tokens but the checkpoint was trained with a "
            f"{expected_vocab_size}-token tokenizer; pass the --tokenizer-name the checkpoint was trained with"
        )


def special_ids(tokenizer: Any) -> tuple[int, ...]:
    return tuple(sorted(set(tokenizer.all_special_ids)))


def fingerprint(tokenizer: Any) -> str:
    """Identifies the tokenizer's behaviour (for cache keys and data state)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


class Encoder:
    """Documents -> flat token ids and word-start flags, each document as `<s> ... </s>`.

    Uses the Rust backend directly: no truncation (long documents are split by packing, never
    cut), no length warnings. If the tokenizer adds no special tokens of its own, the separator
    (eos/sep) is appended so documents stay apart in packed blocks.
    """

    def __init__(self, tokenizer: Any):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.backend.no_truncation()
        self.backend.no_padding()
        probe = self.backend.encode("a", add_special_tokens=True)
        sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        self.separator = None if any(probe.special_tokens_mask) else sep

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> ids [T] int64, word_starts [T] bool, lengths [len(texts)] int64 (sum T)."""
        encodings = self.backend.encode_batch(texts, add_special_tokens=True)
        id_lists = [e.ids for e in encodings]
        word_lists = [e.word_ids for e in encodings]
        if self.separator is not None:
            for ids, words in zip(id_lists, word_lists, strict=True):
                ids.append(self.separator)
                words.append(None)
        lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
        total = int(lengths.sum())
        ids = np.fromiter(chain.from_iterable(id_lists), dtype=np.int64, count=total)
        # None (special token) -> nan; a word starts where the word id changes or is special.
        words = np.array(list(chain.from_iterable(word_lists)), dtype=np.float64)
        starts = np.ones(total, dtype=bool)
        starts[1:] = np.isnan(words[1:]) | (words[1:] != words[:-1])
        doc_starts = np.cumsum(lengths) - lengths
        starts[doc_starts[lengths > 0]] = True
        return ids, starts, lengths


def tokenizer_main(argv: list[str] | None = None) -> int:
    """`mpnet-dist tokenizer`: train a WordPiece tokenizer with MPNet's special layout."""
    from mpnet_dist.command import Parser, run_command

    parser = Parser(
        prog="mpnet-dist tokenizer",
        description="Train a WordPiece tokenizer (MPNet special layout) on local text files.",
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--train-dir", metavar="DIR", help="every file in this folder (txt, JSON lines, .gz)")
    src.add_argument("--files", nargs="+", metavar="FILE", help="these files")
    src.add_argument("--builtin", action="store_true", help="the built-in corpus (stdlib docstrings)")
    parser.add_argument("--output-dir", metavar="DIR", required=True, help="where the tokenizer is saved")
    parser.add_argument(
        "--vocab-size", type=int, metavar="N", default=30_527, help="tokens, specials and <mask> included"
    )
    parser.add_argument("--text-field", default="text", help="field of JSON-lines files that holds the text")
    parser.add_argument(
        "--no-lowercase", action="store_true", help="keep case (default: lowercase, as MPNet)"
    )
    parser.add_argument(
        "--data-cache-dir",
        metavar="DIR",
        help=f"where --builtin materializes its corpus (default ${CACHE_ENV}, else {DEFAULT_CACHE_DIR})",
    )
    parser.add_argument("--debug", action="store_true", help="full tracebacks for user errors")

    def train(argv: list[str]) -> int:
        args = parser.parse_args(argv)
        if args.vocab_size < len(SPECIALS) + 2:
            raise DataError(
                f"--vocab-size {args.vocab_size}: leaves no room beyond the {len(SPECIALS) + 1} special tokens"
            )
        files = _cli_files(args)
        out = train_tokenizer(files, args.output_dir, args.vocab_size, not args.no_lowercase, args.text_field)
        size = len(load_tokenizer(str(out)))
        if size < args.vocab_size:
            megabytes = sum(f.stat().st_size for f in files) / 2**20
            print(
                f"mpnet-dist tokenizer: warning: the corpus ({len(files)} file(s), {megabytes:.1f} MB) gives only "
                f"{size:,} tokens, fewer than --vocab-size {args.vocab_size:,}: every word piece seen twice or "
                "more is already in; train on more text to reach that size, or keep this smaller vocabulary",
                file=sys.stderr,
            )
        print(f"tokenizer ({size:,} tokens) saved to {out}")
        return 0

    return run_command("mpnet-dist tokenizer", train, sys.argv[1:] if argv is None else argv)


def _cli_files(args: argparse.Namespace) -> list[Path]:
    if args.builtin:
        from mpnet_dist.data.corpus import materialize_builtin_corpus

        return list_train_files(materialize_builtin_corpus(args.data_cache_dir).train_dir)
    files = list_train_files(args.train_dir) if args.train_dir else [Path(f) for f in args.files]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(f"--files: no such file: {', '.join(missing)}")
    return files
