"""The one place that decides how Accelerate runs: DDP or DeepSpeed, on GPUs or on a CPU-only host.

Traps this avoids (see DESIGN.md, "Distributed execution"):
- a multi-process launch on a host without CUDA needs `cpu=True` for DDP, or every rank silently trains alone;
- DeepSpeed on such a host needs a gloo process group and must NOT get `cpu=True` (which silently disables it);
- `--update-freq` and `--clip-grad-norm` own accumulation and clipping: the DeepSpeed config is made to agree.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

_LAUNCH_VARS = ("LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_distributed() -> bool:
    return any(k in os.environ for k in _LAUNCH_VARS) or int(os.environ.get("WORLD_SIZE", "1")) > 1


def uses_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def default_mixed_precision() -> str:
    return "bf16" if torch.cuda.is_available() else "no"


def build_accelerator(cfg, timeout_s: int | None = None) -> Accelerator:
    """Accelerator for this launch. `cfg` supplies update_freq, clip_grad_norm and mixed_precision."""
    timeout = timedelta(seconds=timeout_s or int(os.environ.get("MPNET_DIST_TIMEOUT_S", "1800")))
    kwargs: dict = {"gradient_accumulation_steps": cfg.update_freq}
    handlers = [InitProcessGroupKwargs(timeout=timeout)]
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed warns that it guessed CPU
    if not torch.cuda.is_available() and launched_distributed():
        handlers = [InitProcessGroupKwargs(backend="gloo", timeout=timeout)]
        if not uses_deepspeed():
            kwargs["cpu"] = True  # DeepSpeed must not get cpu=True: Accelerate would silently drop it
    precision = cfg.mixed_precision or default_mixed_precision()
    if uses_deepspeed():
        # Accelerate builds the DeepSpeed plugin from these variables (set by `accelerate launch` from the
        # YAML); ours win so the YAML cannot silently disagree with the training flags.
        os.environ["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] = str(cfg.update_freq)
        os.environ["ACCELERATE_GRADIENT_CLIPPING"] = str(cfg.clip_grad_norm)
    accelerator = Accelerator(mixed_precision=precision, kwargs_handlers=handlers, **kwargs)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _align_deepspeed_config(accelerator, cfg)
    return accelerator


def _align_deepspeed_config(accelerator: Accelerator, cfg) -> None:
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
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
