"""A trained model ready to score text: from an mpnet-dist checkpoint (any kind), a run directory, an
annotated-mpnet `.pt` file, or a Hugging Face MPNet folder.

Checkpoints are read with export/weights.py (the loader export uses) and run through our model; Hugging Face
folders run through transformers' own MPNetForMaskedLM, so comparing a checkpoint with its export compares
two independent implementations. Both expose masked-LM logits in Hugging Face's convention; checkpoints also
keep the pretraining model for the two-stream objective.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mpnet_dist.checkpoint import CheckpointError, resolve_checkpoint
from mpnet_dist.export.reference import load_reference_checkpoint
from mpnet_dist.export.tokenizer import load_run_tokenizer
from mpnet_dist.export.weights import load_checkpoint_model

DEFAULT_MAX_TOKENS = 512


class ModelPathError(ValueError):
    """PATH is neither a checkpoint nor a Hugging Face MPNet folder; the message says what it expects."""


@dataclass
class LoadedModel:
    source: str  # what was loaded, for messages
    kind: str  # "checkpoint" or "hf"
    tokenizer: Any
    mlm_logits: Callable[[Tensor, Tensor], Tensor]  # ids [B, L], attention mask [B, L] -> logits [B, L, V]
    max_positions: int
    pretraining_model: Any | None = None  # MPNetForPretraining (checkpoints only): the two-stream objective
    train_config: dict[str, Any] | None = None  # the run's flags (checkpoints written by mpnet-dist)


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and not (path / "train_state.json").is_file()


def load_model(path: Path, *, trust: bool = False, tokenizer_name: str | None = None) -> LoadedModel:
    """Raises ModelPathError / CheckpointError / DataError with a message naming PATH and the fix."""
    path = Path(path)
    if not path.exists():
        raise ModelPathError(f"{path}: no such checkpoint, run directory or Hugging Face folder")
    if is_hf_folder(path):
        return _load_hf(path, tokenizer_name)
    return _load_checkpoint(path, trust, tokenizer_name)


def _load_checkpoint(path: Path, trust: bool, tokenizer_name: str | None) -> LoadedModel:
    if path.is_file():
        model, train_state = load_reference_checkpoint(path, trust=trust)
    else:
        try:
            path = resolve_checkpoint(path)
        except CheckpointError as err:
            raise ModelPathError(
                f"{path} is neither an mpnet-dist checkpoint or run directory nor a Hugging Face folder "
                f"(no config.json): {err}"
            ) from None
        model, train_state = load_checkpoint_model(path, trust=trust)
    tokenizer = load_run_tokenizer(train_state, tokenizer_name)
    model = model.float().eval()

    def logits(ids: Tensor, mask: Tensor) -> Tensor:
        return model.mlm_logits(ids, mask)

    config = train_state.config or None
    return LoadedModel(str(path), "checkpoint", tokenizer, logits, model.config.max_positions, model, config)


def _load_hf(path: Path, tokenizer_name: str | None) -> LoadedModel:
    import transformers

    from mpnet_dist.data import load_tokenizer

    model_type = transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=False).model_type
    if model_type != "mpnet":
        raise ModelPathError(f"{path} holds a {model_type!r} model, not MPNet (MPNetForMaskedLM)")
    hf = transformers.MPNetForMaskedLM.from_pretrained(
        str(path), dtype=torch.float32, local_files_only=True
    ).eval()
    tokenizer = load_tokenizer(tokenizer_name or str(path))

    def logits(ids: Tensor, mask: Tensor) -> Tensor:
        return hf(input_ids=ids, attention_mask=mask).logits

    # HF's table holds max_position_embeddings rows, the first padding_idx + 1 never used by a token.
    max_positions = hf.config.max_position_embeddings - hf.config.pad_token_id - 1
    return LoadedModel(str(path), "hf", tokenizer, logits, max_positions)


def block_length(loaded: LoadedModel, requested: int | None) -> int:
    """Tokens per scored block: --max-tokens, else min(512, what the model takes).

    The same rule for checkpoints and HF folders, so a checkpoint and its export score the same blocks.
    """
    if requested is None:
        return min(DEFAULT_MAX_TOKENS, loaded.max_positions)
    if not 2 <= requested <= loaded.max_positions:
        raise ModelPathError(
            f"--max-tokens {requested}: must be in [2, {loaded.max_positions}] for this model"
        )
    return requested
