"""Text documents from local files (txt / JSON lines, optionally gzip) and HF `datasets` streams."""

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpnet_dist.data.errors import DataError

_JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}


def list_train_files(train_dir: str | Path) -> list[Path]:
    """Every regular, non-hidden file directly in `train_dir`, sorted (the reference's rule)."""
    root = Path(train_dir)
    if not root.exists():
        raise DataError(f"--train-dir {root}: no such directory")
    if not root.is_dir():
        raise DataError(
            f"--train-dir {root}: not a directory (give the folder that holds the training files)"
        )
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"--train-dir {root}: the directory holds no files")
    empty = [p.name for p in files if p.stat().st_size == 0]
    if empty:  # named all at once; whitespace-only files are found when read (read_documents)
        raise DataError(
            f"--train-dir {root}: {len(empty)} empty file(s): {', '.join(empty[:10])}; {_EMPTY_FIX}"
        )
    return files


# Refused rather than skipped: an empty shard is usually a failed download or export, worth knowing about.
_EMPTY_FIX = "remove them (or give them text): mpnet-dist refuses empty input files instead of skipping them"


def check_file(path: str | Path, flag: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{flag} {p}: no such file")
    return p


def is_json_lines(path: Path) -> bool:
    suffixes = path.suffixes[:-1] if path.suffix == ".gz" else path.suffixes
    return bool(suffixes) and suffixes[-1] in _JSON_SUFFIXES


def _json_text(line: str, path: Path, lineno: int, text_field: str) -> str | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path} line {lineno}: not valid JSON ({e.msg}); JSON-lines files hold one object per line"
        ) from e
    if not isinstance(record, dict):
        raise DataError(f"{path} line {lineno}: expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        raise DataError(
            f"{path} line {lineno}: no field {text_field!r}; the fields there are {sorted(record)}. "
            "Pass --text-field with the one that holds the text."
        )
    text = record[text_field]
    if text is not None and not isinstance(text, str):
        raise DataError(f"{path} line {lineno}: field {text_field!r} holds {type(text).__name__}, not text")
    return text


def read_documents(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Documents of one file: one per line (plain text) or the `text_field` of each JSON line.

    Blank documents are skipped; a file with none, bytes that are not UTF-8, or a JSON line
    without the field raise DataError naming the file and line.
    """
    path = Path(path)
    json_lines = is_json_lines(path)
    opener = gzip.open if path.suffix == ".gz" else open
    count = 0
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{path} line {lineno}: bytes that are not UTF-8 at column {e.start + 1} "
                        f"({raw[e.start : e.start + 4]!r}); convert the file to UTF-8"
                    ) from e
                text = _json_text(line, path, lineno, text_field) if json_lines and line.strip() else line
                if text and (text := text.strip()):
                    count += 1
                    yield text
    except (OSError, EOFError) as e:  # unreadable file, corrupt or truncated gzip
        raise DataError(f"{path}: cannot read ({e})") from e
    if count == 0:
        raise DataError(
            f"{path}: no text (the file is empty or whitespace-only); {_EMPTY_FIX.replace('them', 'it')}"
        )


# ---- HF datasets streaming ----------------------------------------------------------------------


def open_stream(name: str, config: str | None, split: str | None, text_field: str) -> Any:
    """`load_dataset(name, config, split, streaming=True)` with errors that say what to do."""
    from datasets import load_dataset

    split = split or "train"
    try:
        ds = load_dataset(name, config or None, split=split, streaming=True)
    except Exception as e:  # hub/network/format errors come as many types; all end here
        raise DataError(
            f"--dataset-name {name!r} (config {config!r}, split {split!r}) could not be opened: {e}\n"
            "Without network access use the built-in corpus (--dataset-name builtin), local files "
            "(--train-dir/--valid-file/--test-file), or a local dataset folder (--dataset-name /path/to/dir)."
        ) from e
    columns = ds.column_names
    if columns is not None and text_field not in columns:
        raise DataError(
            f"--dataset-name {name!r}: no field {text_field!r}; the fields there are {sorted(columns)}. "
            "Pass --text-field with the one that holds the text."
        )
    if columns is not None and len(columns) > 1:
        ds = ds.select_columns([text_field])  # parquet then reads one column only
    return ds


@dataclass(frozen=True)
class Position:
    """A raw example of the stream: shard `shard`, example `index` within it (before any filter)."""

    shard: int
    index: int


def iter_shard(
    ds: Any, shard: int, start: int, text_field: str, min_chars: int
) -> Iterator[tuple[int, str | None]]:
    """(index, text) for the examples of one shard from `start` on; text None when filtered out.

    Reads the shard itself in its stored order (`IterableDataset.shard` + `.iter`), not through
    HF's worker sharding, shuffle or state: the position is ours, so resume is exact.
    """
    part = ds.shard(num_shards=ds.num_shards, index=shard) if ds.num_shards > 1 else ds
    index = 0
    for batch in part.iter(batch_size=256):
        if text_field not in batch:
            raise DataError(
                f"stream shard {shard}: no field {text_field!r}; the fields there are {sorted(batch)}. "
                "Pass --text-field with the one that holds the text."
            )
        texts = batch[text_field]
        if index + len(texts) <= start:
            index += len(texts)
            continue
        for text in texts:
            if index >= start:
                ok = isinstance(text, str) and len(text) >= min_chars and bool(text.strip())
                yield index, (text.strip() if ok else None)
            index += 1


def take_eval(
    ds: Any, eval_samples: int, text_field: str, min_chars: int
) -> tuple[list[str], list[str], Position]:
    """Validation and test documents: the first 2 x eval_samples kept documents of the unshuffled stream.

    Returns them and the position after the last one; training starts there, so they are never
    trained on.
    """
    if eval_samples <= 0:
        return [], [], Position(0, 0)
    docs: list[str] = []
    for shard in range(ds.num_shards):
        for index, text in iter_shard(ds, shard, 0, text_field, min_chars):
            if text is not None:
                docs.append(text)
                if len(docs) == 2 * eval_samples:
                    return docs[:eval_samples], docs[eval_samples:], Position(shard, index + 1)
    raise DataError(
        f"the stream has {len(docs)} documents of at least {min_chars} characters; --eval-samples "
        f"{eval_samples} needs {2 * eval_samples} for validation and test (lower --eval-samples or --min-text-length)"
    )
