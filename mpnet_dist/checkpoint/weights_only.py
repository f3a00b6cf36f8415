"""Weights-only loading: no checkpoint file is unpickled unless --trust-checkpoint says so.

torch.load(weights_only=True) refuses arbitrary objects with a message that does not name our flag, and
DeepSpeed's own loaders (its checkpoint engine, zero_to_fp32) always unpickle everything. Both are handled
here, for resuming (reader.py) and for exporting (export/weights.py) alike.
"""

from __future__ import annotations

import contextlib
import importlib
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mpnet_dist.checkpoint.errors import CheckpointError

# Objects DeepSpeed pickles into its shard files besides tensors and containers.
_DEEPSPEED_SAFE_GLOBALS = (
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


@contextlib.contextmanager
def refuse_pickles(where: Path) -> Iterator[None]:
    """A weights-only load that meets an arbitrary object: name the flag that allows it (torch's text does not)."""
    try:
        yield
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{where}: a checkpoint file holds objects that a weights-only load refuses to unpickle ({err}). "
            "Unpickling can run arbitrary code: only if you trust this checkpoint (you or your team wrote it), "
            "re-run with --trust-checkpoint."
        ) from err


def torch_load(file: Path, trust: bool) -> Any:
    """torch.load on CPU, weights-only unless trusted."""
    try:
        return torch.load(file, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{file}: not loadable weights-only ({err}); re-run with --trust-checkpoint if you trust it"
        ) from err


@contextlib.contextmanager
def deepspeed_safe_loads(module: Any, trust: bool) -> Iterator[None]:
    """DeepSpeed modules (zero_to_fp32, the checkpoint engine) load with weights_only=False; unless trusted,
    force weights-only on `module`'s torch with an allow-list of DeepSpeed's own objects."""
    if trust:
        yield
        return
    allowed = []
    for mod, name in _DEEPSPEED_SAFE_GLOBALS:
        with contextlib.suppress(ImportError, AttributeError):
            allowed.append(getattr(importlib.import_module(mod), name))
    module.torch = _WeightsOnlyTorch()  # only that module's own reference to torch is swapped; restored below
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        module.torch = torch


@contextlib.contextmanager
def deepspeed_engine_weights_only(enabled: bool) -> Iterator[None]:
    """DeepSpeed's checkpoint engine always loads with weights_only=False (Accelerate's load_kwargs never reach
    it): make it weights-only, with the allow-list of DeepSpeed's own objects, unless --trust-checkpoint."""
    if not enabled:
        yield
        return
    from deepspeed.runtime.checkpoint_engine import torch_checkpoint_engine

    with deepspeed_safe_loads(torch_checkpoint_engine, trust=False):
        yield


class _WeightsOnlyTorch:
    """torch, except that load() is always weights-only."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return torch.load(*args, **kwargs)
