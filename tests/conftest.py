"""Data-test fixtures: a tokenizer trained on documents that carry their own id (tests/helpers.py), the
built-in corpus and tokenizer; both built once per session."""

import pytest

from tests.helpers import doc_text


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
