"""The tokenizer that goes into an export: the one the run trained with, checked against the model."""

from __future__ import annotations

import logging
from typing import Any

from mpnet_dist.checkpoint import TrainState
from mpnet_dist.export.errors import ExportError
from mpnet_dist.model import MPNetConfig

logger = logging.getLogger("mpnet_dist")


def load_run_tokenizer(train_state: TrainState, name: str | None = None) -> Any:
    """The tokenizer a checkpoint was trained with (train_state's name unless `name` overrides it)."""
    from mpnet_dist.data import check_vocab, load_tokenizer

    tokenizer = load_tokenizer(name or train_state.tokenizer_name, train_state.config.get("data_cache_dir"))
    if train_state.tokenizer_size is not None:
        check_vocab(tokenizer, train_state.tokenizer_size)
    return tokenizer


def special_token_ids(tokenizer: Any | None, config: MPNetConfig) -> tuple[int, int]:
    """(bos, eos) for config.json; the tokenizer must agree with the model on padding and size."""
    if tokenizer is None:
        logger.warning("no tokenizer: config.json gets MPNet's layout, bos_token_id=0 and eos_token_id=2")
        return 0, 2
    if tokenizer.pad_token_id != config.padding_idx:
        raise ExportError(
            f"the tokenizer's padding id is {tokenizer.pad_token_id} but the model was trained with padding_idx="
            f"{config.padding_idx}: pass the tokenizer the checkpoint was trained with (--tokenizer-name)"
        )
    if len(tokenizer) > config.vocab_size:
        raise ExportError(
            f"the tokenizer has {len(tokenizer)} tokens but the model only {config.vocab_size} embedding rows: "
            "pass the tokenizer the checkpoint was trained with (--tokenizer-name)"
        )
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    return (0 if bos is None else bos), (2 if eos is None else eos)
