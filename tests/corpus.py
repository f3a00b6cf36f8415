"""Small offline text and tokenizer for training tests (built once per test session)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

_MODULES = (
    "collections",
    "json",
    "pathlib",
    "argparse",
    "logging",
    "textwrap",
    "fractions",
    "heapq",
    "bisect",
    "functools",
    "itertools",
    "contextlib",
    "dataclasses",
    "enum",
    "statistics",
    "string",
    "shutil",
)


def docstrings() -> list[str]:
    """Docstrings of a fixed list of stdlib modules: real English, identical on every machine with this Python."""
    import importlib

    docs = []
    for name in _MODULES:
        module = importlib.import_module(name)
        for _, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if (inspect.isclass(obj) or inspect.isfunction(obj)) else None
            if doc and len(doc) > 40:
                docs.append(" ".join(doc.split()))
    return list(dict.fromkeys(docs))  # de-duplicated, order kept


def write_corpus(root: Path) -> dict[str, Path]:
    docs = docstrings()
    train_dir = root / "train"
    train_dir.mkdir(parents=True)
    half = len(docs) // 2
    (train_dir / "part1.txt").write_text("\n".join(docs[40:half]) + "\n")
    with open(train_dir / "part2.jsonl", "w") as fh:
        for doc in docs[half:]:
            fh.write(json.dumps({"text": doc}) + "\n")
    (root / "valid.txt").write_text("\n".join(docs[:20]) + "\n")
    (root / "test.txt").write_text("\n".join(docs[20:40]) + "\n")
    return {"train_dir": train_dir, "valid": root / "valid.txt", "test": root / "test.txt"}


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    from mpnet_dist.data import train_tokenizer

    root = tmp_path_factory.mktemp("corpus")
    paths = write_corpus(root)
    texts = (paths["train_dir"] / "part1.txt").read_text().splitlines()
    paths["tokenizer"] = Path(train_tokenizer(texts, root / "tokenizer", vocab_size=600))
    paths["cache"] = root / "cache"
    return paths
