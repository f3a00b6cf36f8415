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
    """Loading `where` (a file, or a checkpoint folder whose files a library loads): a file that fails is named.

    A weights-only load that meets arbitrary objects gets the advice torch's text lacks (--trust-checkpoint), but
    only when the file really is a pickle holding objects outside the allow-list; bytes that are not a valid file
    at all (truncated, overwritten) are reported as damaged, since trusting them cannot help. A failure that no
    file explains is not the checkpoint's fault and propagates as it is.
    """
    try:
        yield
    except CheckpointError:
        raise
    except Exception as err:
        culprit = find_unloadable(Path(where))
        if culprit is None:
            raise
        raise CheckpointError(culprit) from err


def find_unloadable(where: Path) -> str | None:
    """Why `where` (or the first file in the folder `where`) cannot be loaded weights-only; None if none fails."""
    files = [where] if where.is_file() else sorted(p for p in where.rglob("*") if p.suffix in _LOADABLE)
    for file in files:
        problem = unloadable_reason(file)
        if problem is not None:
            return problem
    return None


_LOADABLE = (".bin", ".pt", ".pkl", ".safetensors")


def unloadable_reason(file: Path) -> str | None:
    """One line naming `file` and what is wrong with it, or None when it loads weights-only."""
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt"):
                return None
        unsafe = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(file)) - _allowed_globals())
    except Exception as err:  # not a zip written by torch.save, a truncated archive, a broken header
        reason = " ".join(str(err).split()).split(". ")[0]  # torch's text goes on for lines
        return (
            f"{file}: damaged, not a readable checkpoint file ({type(err).__name__}: {reason}); the file was "
            "truncated or overwritten, and --trust-checkpoint cannot help"
        )
    if not unsafe:
        return None
    return (
        f"{file}: holds pickled objects outside the weights-only allow-list ({', '.join(unsafe[:5])}). Unpickling "
        "can run arbitrary code: only if you trust this checkpoint (you or your team wrote it), re-run with "
        "--trust-checkpoint."
    )


def _allowed_globals() -> set[str]:
    """Names a weights-only load accepts here besides torch's own: Accelerate's (numpy RNG states, which its
    loader allows) and DeepSpeed's objects; spelt as torch spells them (module.qualname)."""
    objects = list(_deepspeed_globals())
    with contextlib.suppress(ImportError):
        from accelerate.utils.other import TORCH_SAFE_GLOBALS

        objects += TORCH_SAFE_GLOBALS
    return {f"{obj.__module__}.{obj.__qualname__}" for obj in objects}


def _deepspeed_globals() -> list[Any]:
    allowed = []
    for mod, name in _DEEPSPEED_SAFE_GLOBALS:
        with contextlib.suppress(ImportError, AttributeError):
            allowed.append(getattr(importlib.import_module(mod), name))
    return allowed


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
    allowed = _deepspeed_globals()
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
