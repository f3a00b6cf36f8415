"""The one place that decides how Accelerate runs: DDP or DeepSpeed, on GPUs or on a CPU-only host.

`accelerate launch --config_file X -m mpnet_dist.train` behaves the same on a laptop and on a GPU node,
without an environment variable to remember. Traps this avoids (DESIGN.md, "Distributed execution"):
- a multi-process launch on a host without CUDA needs `cpu=True` for DDP, or every rank silently trains alone;
- DeepSpeed on such a host needs a gloo process group and must NOT get `cpu=True` (which silently disables it);
- Accelerate runs FSDP only on GPUs and would silently fall back to DDP on CPU: refused here instead;
- `--update-freq`, `--clip-grad-norm` and `--batch-size` own accumulation, clipping and the micro-batch: the
  DeepSpeed config is made to agree;
- the launch config's `mixed_precision` (set by `accelerate launch`) is honoured unless --mixed-precision says
  otherwise, instead of being silently replaced by our default.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

_LAUNCH_VARS = ("LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_distributed() -> bool:
    return any(k in os.environ for k in _LAUNCH_VARS) or int(os.environ.get("WORLD_SIZE", "1")) > 1


def uses_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def uses_fsdp() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def default_mixed_precision() -> str:
    return "bf16" if torch.cuda.is_available() else "no"


def resolve_mixed_precision(flag: str | None) -> str:
    """--mixed-precision > the launch config's bf16/fp16 (exported by `accelerate launch`) > bf16 on CUDA, else no.

    The launcher always exports ACCELERATE_MIXED_PRECISION, "no" when the config says nothing, so "no" from the
    launcher cannot be told apart from "unset" and does not override the CUDA default.
    """
    if flag:
        return flag
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    return launcher if launcher in ("bf16", "fp16") else default_mixed_precision()


def build_accelerator(cfg: Any) -> Accelerator:
    """Accelerator for this launch. `cfg` (a TrainConfig) supplies update_freq, clip_grad_norm, batch_size,
    mixed_precision, dist_timeout_s and deepspeed_overrides."""
    timeout = timedelta(seconds=cfg.dist_timeout_s)
    kwargs: dict[str, Any] = {"gradient_accumulation_steps": cfg.update_freq}
    handlers = [InitProcessGroupKwargs(timeout=timeout)]
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed warns that it guessed CPU
        if uses_fsdp():
            raise RuntimeError(
                "this launch config uses FSDP, which Accelerate runs only on GPUs (on this CUDA-less host it would "
                "silently fall back to plain DDP). To try parameter sharding on CPU use "
                "launch_configs/accelerate/deepspeed_zero3.yaml; keep fsdp_8gpu.yaml for GPU nodes."
            )
    if not cuda and launched_distributed():
        handlers = [InitProcessGroupKwargs(backend="gloo", timeout=timeout)]
        if not uses_deepspeed():
            kwargs["cpu"] = True  # DeepSpeed must not get cpu=True: Accelerate would silently drop it
    if uses_deepspeed():
        # Accelerate builds the DeepSpeed plugin from these variables (set by `accelerate launch` from the
        # YAML); ours win so the YAML cannot silently disagree with the training flags.
        os.environ["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] = str(cfg.update_freq)
        os.environ["ACCELERATE_GRADIENT_CLIPPING"] = str(cfg.clip_grad_norm)
    precision = resolve_mixed_precision(cfg.mixed_precision)
    if precision == "fp16" and not cuda:
        # Accelerate would accept it and silently train in fp32 (no autocast, no scaler on CPU).
        raise ValueError("--mixed-precision fp16 needs a CUDA GPU; on CPU use --mixed-precision bf16 (or no)")
    accelerator = Accelerator(mixed_precision=precision, kwargs_handlers=handlers, **kwargs)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _align_deepspeed_config(accelerator, cfg)
    return accelerator


def _align_deepspeed_config(accelerator: Accelerator, cfg: Any) -> None:
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    if cfg.deepspeed_overrides:
        _deep_merge(ds, json.loads(cfg.deepspeed_overrides))  # a JSON object: TrainConfig checked it
    ds["gradient_accumulation_steps"] = cfg.update_freq
    ds["gradient_clipping"] = cfg.clip_grad_norm
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["train_batch_size"] = cfg.batch_size * cfg.update_freq * accelerator.num_processes
    ds.setdefault("steps_per_print", 10**9)
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ValueError(
                f"the DeepSpeed config defines an '{key}': remove it; mpnet-dist builds AdamW and the "
                "learning-rate schedule from its own flags (--lr, --warmup-updates, ...)."
            )


def _deep_merge(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value


def zero_stage(accelerator: Accelerator) -> int:
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def describe(accelerator: Accelerator) -> str:
    kind = (
        accelerator.distributed_type.value
        if hasattr(accelerator.distributed_type, "value")
        else accelerator.distributed_type
    )
    stage = zero_stage(accelerator)
    extra = f" ZeRO-{stage}" if stage else ""
    return (
        f"{kind}{extra}, {accelerator.num_processes} process(es), device {accelerator.device}, "
        f"mixed precision {accelerator.mixed_precision}"
    )
