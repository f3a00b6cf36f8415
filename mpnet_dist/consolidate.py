"""Consolidated model weights from any checkpoint kind, offline on CPU, or gathered live from all ranks.

Checkpoint kinds (all written by `accelerator.save_state`, see checkpoint.py):
- single process and DDP: `model.safetensors` (Accelerate drops the tied duplicate `lm_head.weight`;
  DDP names start with `module.`), or `pytorch_model.bin` when saved without safetensors;
- DeepSpeed ZeRO-1/2/3: `pytorch_model/` shards plus a `latest` tag file. The fp32 master weights are
  rebuilt with DeepSpeed's zero_to_fp32 (ZeRO-3 model-state files hold empty placeholders, so they are
  never read directly).
Also the reference trainer's (annotated-mpnet) `.pt` files, `{"args": ..., "model_states": ...}`, whose
parameter names are ours, so a migrating user can export what the old trainer wrote.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mpnet_dist.checkpoint import CheckpointError, is_complete, latest_checkpoint, read_train_state
from mpnet_dist.model import MPNetConfig, MPNetForPretraining
from mpnet_dist.model.hf import strip_wrapper_prefixes

logger = logging.getLogger("mpnet_dist")

DEEPSPEED_TAG_FILE = "latest"


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or a run directory (then `final`, else the newest complete checkpoint)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder or run directory")
    if is_complete(path):
        return path
    if (path / "final").is_dir() and is_complete(path / "final"):
        return path / "final"
    newest = latest_checkpoint(path)
    if newest is not None:
        return newest
    read_train_state(path)  # raises, explaining that the folder is incomplete
    raise AssertionError("unreachable")


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


def load_checkpoint_model(path: Path, trust: bool = False) -> tuple[MPNetForPretraining, dict[str, Any]]:
    """(fp32 CPU model in eval mode carrying the checkpoint's weights, its train state)."""
    train_state = read_train_state(path)
    if "model_config" not in train_state:
        raise CheckpointError(f"{path}/train_state.json has no 'model_config': not an mpnet-dist checkpoint")
    config = MPNetConfig.from_dict(train_state["model_config"])
    kind = checkpoint_kind(path)
    logger.info("reading %s weights from %s", kind, path)
    if kind == "deepspeed":
        state_dict = read_deepspeed_weights(path, trust)
    elif kind == "safetensors":
        from safetensors.torch import load_file

        state_dict = load_file(str(path / "model.safetensors"))
    else:
        state_dict = _torch_load(path / "pytorch_model.bin", trust)
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


# Objects DeepSpeed pickles into its shard files besides tensors and containers.
_DEEPSPEED_SAFE_GLOBALS = (
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


@contextlib.contextmanager
def deepspeed_safe_loads(module: Any, trust: bool) -> Iterator[None]:
    """DeepSpeed modules (zero_to_fp32, the checkpoint engine) load with weights_only=False; unless trusted,
    force weights-only on `module`'s torch with an allow-list of DeepSpeed's own objects."""
    if trust:
        yield
        return
    import importlib

    allowed = []
    for mod, name in _DEEPSPEED_SAFE_GLOBALS:
        with contextlib.suppress(ImportError, AttributeError):
            allowed.append(getattr(importlib.import_module(mod), name))
    proxy = _WeightsOnlyTorch()
    module.torch = proxy  # only zero_to_fp32's own reference to torch is swapped; restored below
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        module.torch = torch


class _WeightsOnlyTorch:
    """torch, except that load() is always weights-only."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return torch.load(*args, **kwargs)


def load_reference_checkpoint(file: Path, trust: bool = False) -> tuple[MPNetForPretraining, dict[str, Any]]:
    """(model, train-state-like dict) from an annotated-mpnet `.pt` checkpoint."""
    data = _torch_load(file, trust)
    if not isinstance(data, dict) or "model_states" not in data or "args" not in data:
        raise CheckpointError(
            f"{file} is neither an mpnet-dist checkpoint folder nor an annotated-mpnet .pt file (with 'args' and "
            "'model_states')"
        )
    args = data["args"] if isinstance(data["args"], dict) else vars(data["args"])
    state_dict = strip_wrapper_prefixes(data["model_states"])
    config = reference_model_config(args, state_dict)
    model = MPNetForPretraining(config)
    load_complete_state_dict(model, state_dict, source=str(file))
    train_state = {
        "step": data.get("steps"),
        "model_config": config.to_dict(),
        "tokenizer_name": args.get("tokenizer_name") or "microsoft/mpnet-base",
        "config": {},
    }
    return model.float().eval(), train_state


def reference_model_config(args: dict[str, Any], state_dict: dict[str, Tensor]) -> MPNetConfig:
    """The reference's flags -> MPNetConfig; sizes the flags leave implicit are read off the weights."""
    from mpnet_dist.model import HFExportError

    activation = args.get("activation_fn", "gelu")
    if activation != "gelu":  # checked here: the reference allows activations our model does not have
        raise HFExportError(f"activation_fn={activation!r}: HF's MPNetLMHead always uses gelu")
    if any(key.startswith("sentence_encoder.segment_embeddings") for key in state_dict):
        raise HFExportError("num_segments > 0: HF MPNet has no token-type (segment) embeddings")
    max_positions = args.get("max_positions") or args.get("max_tokens") or 512
    position_rows = state_dict["sentence_encoder.embed_positions.weight"].shape[0]
    # Auto-scaled as the reference does when the flag is None (anchor: round up to 8 of 128 * L / 512).
    max_distance = args.get("relative_attention_max_distance") or _round_up_8(
        max(128, 128 * max_positions // 512)
    )
    return MPNetConfig(
        vocab_size=state_dict["sentence_encoder.embed_tokens.weight"].shape[0],
        encoder_layers=args.get("encoder_layers", 12),
        encoder_embed_dim=args.get("encoder_embed_dim", 768),
        encoder_ffn_dim=args.get("encoder_ffn_dim", 3072),
        encoder_attention_heads=args.get("encoder_attention_heads", 12),
        dropout=args.get("dropout", 0.1),
        attention_dropout=args.get("attention_dropout", 0.1),
        activation_dropout=args.get("activation_dropout", 0.1),
        max_positions=max_positions,
        relative_attention_num_buckets=state_dict["sentence_encoder.relative_attention_bias.weight"].shape[0],
        relative_attention_max_distance=max_distance,
        normalize_before=bool(args.get("normalize_before", False)),
        padding_idx=position_rows - max_positions - 1,  # the table has max_positions + padding_idx + 1 rows
        layer_norm_eps=1e-5,  # the reference's LayerNorm (Apex or torch) default
    )


def _round_up_8(value: int) -> int:
    return (value + 7) // 8 * 8


def _torch_load(file: Path, trust: bool) -> dict[str, Tensor]:
    try:
        return torch.load(file, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{file}: not loadable weights-only ({err}); re-run with --trust-checkpoint if you trust it"
        ) from err


def gather_state_dict(accelerator: Any, model: nn.Module) -> dict[str, Tensor] | None:
    """Collective (every rank calls it): full CPU state dict of the live model on rank 0, None elsewhere.

    Under DeepSpeed it takes the fp32 master of each parameter (`safe_get_full_fp32_param`, an all-reduce
    per parameter, any ZeRO stage) rather than `accelerator.get_state_dict`, which under ZeRO-3 needs
    zero3_save_16bit_model and returns the 16-bit training copy, not the fp32 masters the optimizer updates.
    """
    from accelerate.utils import DistributedType

    unwrapped = accelerator.unwrap_model(model)
    main = accelerator.is_main_process
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        if not main:
            return None
        return {k: v.detach().to("cpu", copy=True) for k, v in unwrapped.state_dict().items()}
    from deepspeed.utils import safe_get_full_fp32_param

    out: dict[str, Tensor] = {}
    params = list(unwrapped.named_parameters())  # tied parameters appear once
    for index, (name, param) in enumerate(params):
        full = safe_get_full_fp32_param(param)
        if full is None:  # not managed by the ZeRO optimizer (e.g. frozen): gather the module copy
            full = _gather_unmanaged(param)
        if main:
            out[name] = full.detach().to("cpu", torch.float32, copy=True)
        if main and (index + 1) % 50 == 0:
            logger.info("gathered %d/%d parameters", index + 1, len(params))
    for name, buffer in unwrapped.named_buffers():
        if main:
            out[name] = buffer.detach().to("cpu", copy=True)
    return out if main else None


def _gather_unmanaged(param: nn.Parameter) -> Tensor:
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().clone()
    return param.detach().clone()
