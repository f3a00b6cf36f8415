"""Data-test fixtures: a tokenizer trained once per session, documents that carry their own id, a config.

Documents read "begin <digits as words> end <filler words>", so a test can decode any row and
recover which documents it came from.
"""

import json
import random
import re
import types
from pathlib import Path

import numpy as np
import pytest

DIGITS = "zero one two three four five six seven eight nine".split()
FILLER = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud".split()
_ID = re.compile(r"begin ((?:(?:zero|one|two|three|four|five|six|seven|eight|nine) )+)end")


def doc_text(doc_id: int, n_words: int | None = None) -> str:
    rng = random.Random(doc_id)
    n = rng.randint(3, 40) if n_words is None else n_words
    digits = " ".join(DIGITS[int(c)] for c in str(doc_id))
    return f"begin {digits} end " + " ".join(rng.choice(FILLER) for _ in range(n))


def doc_ids(text: str) -> list[int]:
    return [int("".join(str(DIGITS.index(w)) for w in m.split())) for m in _ID.findall(text)]


def write_docs(path: Path, ids: list[int], fmt: str = "txt") -> Path:
    lines = [json.dumps({"text": doc_text(i), "id": i}) if fmt == "jsonl" else doc_text(i) for i in ids]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def recover_rows(batch: dict) -> np.ndarray:
    """Original rows [B, L] of an MPNet batch: its first L slots are the row permuted by `positions`."""
    width = batch["input_ids"].shape[1] - 2 * batch["targets"].shape[1]
    ids, pos = batch["input_ids"][:, :width].numpy(), batch["positions"][:, :width].numpy()
    rows = np.empty_like(ids)
    np.put_along_axis(rows, pos, ids, axis=1)
    return rows


def make_cfg(**overrides) -> types.SimpleNamespace:
    cfg = dict(
        train_dir=None, valid_file=None, test_file=None, dataset_name=None, dataset_config=None,
        dataset_split="train", text_field="text", buffer_size=16, data_streams=None, eval_samples=0, min_text_length=1,
        max_tokens=32, batch_size=4, update_freq=1, num_workers=0, seed=7, packing=True, pred_prob=0.15,
        rand_prob=0.1, keep_prob=0.1, whole_word_mask=True, data_cache_dir=None,
    )  # fmt: skip
    cfg.update(overrides)
    return types.SimpleNamespace(**cfg)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A ~100-token WordPiece tokenizer in MPNet's layout (train_tokenizer), trained once."""
    from mpnet_dist.data import load_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("tokenizer")
    texts = [doc_text(i) for i in range(300)]
    return load_tokenizer(str(train_tokenizer(texts, root / "tok", vocab_size=1000)))


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory) -> str:
    """A cache dir holding the built-in corpus and tokenizer (built once: ~5 s of stdlib parsing + training)."""
    from mpnet_dist.data import load_tokenizer

    root = str(tmp_path_factory.mktemp("builtin_cache"))
    load_tokenizer("builtin", root)
    return root
