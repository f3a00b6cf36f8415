"""Data pipeline: text sources -> tokens -> packed blocks -> MPNet batches, sharded per rank, resumable.

load_tokenizer(name_or_path)          any HF fast tokenizer, or "builtin" (offline, cached)
train_tokenizer(files_or_texts, dir)  WordPiece with MPNet's special layout; CLI: tokenizer_main
check_vocab(tokenizer, size)          refuse a tokenizer that does not match a checkpoint
build_data(cfg, tokenizer, rank, world_size) -> Data(train, valid, test, ...)
"""

from mpnet_dist.data.errors import DataError
from mpnet_dist.data.pipeline import Data, build_data
from mpnet_dist.data.tokenizer import check_vocab, load_tokenizer, tokenizer_main, train_tokenizer

__all__ = [
    "Data",
    "DataError",
    "build_data",
    "check_vocab",
    "load_tokenizer",
    "tokenizer_main",
    "train_tokenizer",
]
