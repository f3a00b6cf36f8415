"""Built-in offline corpus: the docstrings of the installed Python standard library.

Present on every machine, about 1.7 MB of English in 7,000+ documents, so the quickstart needs
no download. Files are parsed with `ast` (never imported: some stdlib modules act on import) in
sorted path order, so the corpus is deterministic for a given Python installation.
"""

import ast
import hashlib
import os
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mpnet_dist.data.cache import build_once, cache_root

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}
_MIN_CHARS = 40  # shorter docstrings are mostly "Return x." one-liners
_EVAL_EVERY = 40  # document i goes to valid if i % 40 == 0, to test if i % 40 == 1: 2.5% each
_VERSION = 2  # part of the cache name: bump when the corpus rules change
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


@dataclass(frozen=True)
class CorpusFiles:
    train_dir: Path
    valid_file: Path
    test_file: Path


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _source_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def iter_docstrings(root: Path | None = None) -> Iterator[str]:
    """Module, class and function docstrings, whitespace collapsed to one line each, each text once."""
    seen: set[str] = set()  # repeated docstrings would otherwise land in both train and eval
    for path in _source_files(root or stdlib_root()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences in old modules
                tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue  # a few stdlib files are templates or Python 2 (lib2to3 data)
        for node in ast.walk(tree):
            if isinstance(node, _DOC_NODES) and (doc := ast.get_docstring(node)):
                text = " ".join(doc.split())
                if len(text) >= _MIN_CHARS and text not in seen:
                    seen.add(text)
                    yield text


def corpus_id() -> str:
    """Names the corpus of this Python installation (its version and stdlib location)."""
    ident = f"{_VERSION}|{sys.version}|{stdlib_root()}".encode()
    return f"py{sys.version_info.major}{sys.version_info.minor}-{hashlib.sha256(ident).hexdigest()[:12]}"


def _write_corpus(tmp: Path) -> None:
    (tmp / "train").mkdir()
    names = {0: "valid.txt", 1: "test.txt"}
    outs = {
        "train": open(tmp / "train" / "train.txt", "w", encoding="utf-8"),
        **{name: open(tmp / name, "w", encoding="utf-8") for name in names.values()},
    }
    try:
        for i, text in enumerate(iter_docstrings()):
            outs[names.get(i % _EVAL_EVERY, "train")].write(text + "\n")
    finally:
        for f in outs.values():
            f.close()


def materialize_builtin_corpus(data_cache_dir: str | None = None) -> CorpusFiles:
    """Write the corpus once under the cache dir as plain text (one document per line)."""
    root = build_once(cache_root(data_cache_dir) / "corpus" / f"builtin-{corpus_id()}", _write_corpus)
    return CorpusFiles(root / "train", root / "valid.txt", root / "test.txt")
