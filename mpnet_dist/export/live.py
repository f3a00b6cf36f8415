"""The export at the end of training: every rank gathers the live weights, rank 0 writes and verifies."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mpnet_dist.export.errors import ExportError
from mpnet_dist.export.folder import ExportReport, check_exportable, export_model
from mpnet_dist.export.weights import load_complete_state_dict
from mpnet_dist.model import MPNetConfig, MPNetForPretraining

logger = logging.getLogger("mpnet_dist")


def export_from_training(accelerator: Any, model: Any, tokenizer: Any, out_dir: Path) -> ExportReport | None:
    """Collective, every rank calls it: gather the live weights, rank 0 writes and verifies, the others wait.

    Returns the report on rank 0 and None elsewhere; raises on every rank when the export fails.
    """
    from accelerate.utils import broadcast_object_list

    config = accelerator.unwrap_model(model).config
    check_exportable(config)  # same config on every rank: all raise together, nobody waits forever
    state_dict = gather_state_dict(accelerator, model)
    outcome: list[Any] = [None]
    report = None
    if accelerator.is_main_process:
        try:
            with _without_hf_deepspeed():
                cpu_model = MPNetForPretraining(MPNetConfig.from_dict(config.to_dict()))
                load_complete_state_dict(cpu_model, state_dict, source="the training model")
                report = export_model(cpu_model.eval(), out_dir, tokenizer, source="end of training")
        except Exception as err:  # re-raised below, after the other ranks have heard about it
            outcome[0] = f"{type(err).__name__}: {err}"
            failure = err
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome, from_process=0)
    accelerator.wait_for_everyone()
    if outcome[0] is not None:
        if accelerator.is_main_process:
            raise failure
        raise ExportError(f"export on rank 0 failed: {outcome[0]}")
    return report


@contextlib.contextmanager
def _without_hf_deepspeed() -> Iterator[None]:
    """Hide Accelerate's ZeRO-3 registration from transformers while rank 0 works alone.

    Otherwise building and reloading the HF model on rank 0 goes through DeepSpeed's zero.Init and
    parameter gathering, which are collectives the other ranks never join (a hang or a gloo size mismatch).
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


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
