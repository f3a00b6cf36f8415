"""Consolidated model weights from any checkpoint kind, offline on CPU.

Checkpoint kinds (all written by `accelerator.save_state`, see checkpoint/writer.py):
- single process and DDP: `model.safetensors` (Accelerate drops the tied duplicate `lm_head.weight`;
  DDP names start with `module.`), or `pytorch_model.bin` when saved without safetensors;
- DeepSpeed ZeRO-1/2/3: `pytorch_model/` shards plus a `latest` tag file. The fp32 master weights are
  rebuilt with DeepSpeed's zero_to_fp32 (ZeRO-3 model-state files hold empty placeholders, so they are
  never read directly).
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import torch
from torch import Tensor, nn

from mpnet_dist.checkpoint import CheckpointError, TrainState, read_train_state
from mpnet_dist.checkpoint.weights_only import deepspeed_safe_loads, torch_load
from mpnet_dist.model import MPNetConfig, MPNetForPretraining
from mpnet_dist.model.hf import strip_wrapper_prefixes

logger = logging.getLogger("mpnet_dist")

DEEPSPEED_TAG_FILE = "latest"


def checkpoint_kind(path: Path) -> str:
    """'deepspeed', 'safetensors' or 'bin', from the files `accelerator.save_state` left in `path`."""
    if (path / DEEPSPEED_TAG_FILE).is_file() or (path / "pytorch_model").is_dir():
        return "deepspeed"
    if (path / "model.safetensors").is_file():
        return "safetensors"
    if (path / "pytorch_model.bin").is_file():
        return "bin"
    raise CheckpointError(
        f"{path} has train_state.json but no model weights (model.safetensors, pytorch_model.bin or a DeepSpeed "
        "pytorch_model/ folder): it was not written by accelerator.save_state, or its files were removed"
    )


def load_checkpoint_model(path: Path, trust: bool = False) -> tuple[MPNetForPretraining, TrainState]:
    """(fp32 CPU model in eval mode carrying the checkpoint's weights, its train state)."""
    train_state = read_train_state(path)
    config = MPNetConfig.from_dict(train_state.model_config)
    kind = checkpoint_kind(path)
    logger.info("reading %s weights from %s", kind, path)
    if kind == "deepspeed":
        state_dict = read_deepspeed_weights(path, trust)
    elif kind == "safetensors":
        from safetensors.torch import load_file

        state_dict = load_file(str(path / "model.safetensors"))
    else:
        state_dict = torch_load(path / "pytorch_model.bin", trust)
    model = MPNetForPretraining(config)
    load_complete_state_dict(model, state_dict, source=str(path))
    return model.float().eval(), train_state


def load_complete_state_dict(model: nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    """Strict load after stripping wrapper prefixes and restoring tied aliases a saver de-duplicated."""
    state_dict = strip_wrapper_prefixes(state_dict)
    for names in tied_groups(model):
        present = [name for name in names if name in state_dict]
        if present:
            for name in names:
                state_dict.setdefault(name, state_dict[present[0]])
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{source}: weights do not match the architecture in train_state.json "
            f"(missing {result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}); the checkpoint is "
            "damaged or was written by a different model"
        )


def tied_groups(model: nn.Module) -> list[list[str]]:
    """State-dict names that share one tensor (here: the word embeddings and the LM-head projection)."""
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(tensor), []).append(name)
    return [names for names in by_tensor.values() if len(names) > 1]


def read_deepspeed_weights(path: Path, trust: bool) -> dict[str, Tensor]:
    """fp32 masters of a DeepSpeed checkpoint, consolidated on CPU by zero_to_fp32 (any ZeRO stage)."""
    tag = (path / DEEPSPEED_TAG_FILE).read_text().strip() if (path / DEEPSPEED_TAG_FILE).is_file() else ""
    if not tag or not (path / tag).is_dir():
        raise CheckpointError(
            f"{path}: DeepSpeed checkpoint without a readable '{DEEPSPEED_TAG_FILE}' file naming its shard folder "
            "(expected 'pytorch_model'); the save was interrupted: export another checkpoint"
        )
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed probes for GPUs and warns
    try:
        from deepspeed.utils import zero_to_fp32
    except ImportError as err:
        raise CheckpointError(
            f"{path} is a DeepSpeed checkpoint: reading it needs `pip install deepspeed` ({err})"
        ) from err
    with deepspeed_safe_loads(zero_to_fp32, trust):
        try:
            return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag)
        except pickle.UnpicklingError as err:
            raise CheckpointError(
                f"{path}: a DeepSpeed file holds objects that a weights-only load refuses ({err}). If you trust "
                "this checkpoint (you or your team wrote it), re-run with --trust-checkpoint."
            ) from err
