"""One optimizer step over `update_freq` micro-batches, and evaluation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from mpnet_dist.data.batch import IGNORE_INDEX
from mpnet_dist.loss import prediction_loss
from mpnet_dist.optim import set_lr


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/Inf losses more times in a row than --max-nonfinite-skips allows."""


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # summed CE (nats) over this rank's predicted tokens, on device
    correct: torch.Tensor
    n_pred_global: int
    n_tokens_global: int
    grad_norm: float | None
    skipped: bool  # non-finite loss: no update applied
    stop_requested: bool  # some rank asked to stop (preemption); agreed at this boundary


def count_input_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding tokens of the original (unpermuted) sequences, specials included. CPU, no device sync."""
    p = batch["targets"].shape[1]
    B, total = batch["input_ids"].shape
    length = total - 2 * p
    if "padding_mask" not in batch:
        return B * length
    return int((~batch["padding_mask"][:, :length]).sum())


def forward(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(
        batch["input_ids"], batch["positions"], batch["targets"].shape[1], batch.get("padding_mask")
    )  # [B, p, V]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(
    accelerator: Accelerator,
    model,
    optimizer,
    micro_batches: list[dict[str, torch.Tensor]],
    lr: float,
    clip_grad_norm: float,
    stop_flag: bool,
) -> StepResult:
    device = accelerator.device
    n_pred_local = sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in micro_batches)
    n_tokens_local = sum(count_input_tokens(b) for b in micro_batches)
    # One all-reduce: global predicted-token count (the loss denominator), input tokens, and the stop votes.
    agreed = torch.tensor(
        [n_pred_local, n_tokens_local, float(stop_flag)], device=device, dtype=torch.float64
    )
    n_pred_global, n_tokens_global, stops = accelerator.reduce(agreed, reduction="sum").tolist()  # host sync
    stop_requested = stops > 0
    # Accelerate divides by update_freq and DDP/DeepSpeed average over ranks; undo both so the gradient is
    # exactly d(sum of CE over all predicted tokens of the step, all ranks) / n_pred_global.
    scale = accelerator.gradient_accumulation_steps * accelerator.num_processes / max(n_pred_global, 1.0)
    set_lr(optimizer, lr)
    loss_total = torch.zeros((), device=device)
    correct_total = torch.zeros((), device=device, dtype=torch.long)
    grad_norm, skipped = None, False
    for index, batch in enumerate(micro_batches):
        batch = to_device(batch, device)
        with accelerator.accumulate(model):
            loss_sum, correct = prediction_loss(forward(model, batch), batch["targets"])
            loss_total = loss_total + loss_sum.detach()
            correct_total = correct_total + correct
            if index == len(micro_batches) - 1:
                skipped = not _finite_everywhere(accelerator, loss_total)
            # Backward runs even on a skipped step so DDP's reducer sees the usual sequence of collectives;
            # the poisoned gradients are then dropped instead of applied.
            accelerator.backward(loss_sum * scale)
            if skipped:
                optimizer.zero_grad(set_to_none=True)
                break
            if accelerator.sync_gradients:
                grad_norm = _clip(accelerator, model, clip_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return StepResult(
        loss_total,
        correct_total,
        int(n_pred_global),
        int(n_tokens_global),
        grad_norm,
        skipped,
        stop_requested,
    )


def _finite_everywhere(accelerator: Accelerator, loss_total: torch.Tensor) -> bool:
    bad = torch.tensor(0.0 if torch.isfinite(loss_total) else 1.0, device=accelerator.device)
    bad = accelerator.reduce(bad, reduction="sum").item()  # host sync, once per step
    if bad and accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed has already accumulated this step's earlier micro-batches in its own buffers and offers no
        # way to drop them, so a step cannot be skipped cleanly: stop instead (the last checkpoint stays good).
        raise NonFiniteLossError(
            "non-finite loss under DeepSpeed: stopping without saving; resume from the last checkpoint "
            "(consider a lower --lr, --clip-grad-norm, or bf16 instead of fp16)."
        )
    return not bad


def _clip(accelerator: Accelerator, model, max_norm: float) -> float | None:
    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else math.inf)
    if norm is None:
        return None
    return float(norm)  # host sync only on the step boundary


@torch.no_grad()
def evaluate(accelerator: Accelerator, model, batches) -> dict[str, float] | None:
    """Mean CE (nats) and accuracy over all ranks' eval batches; None when there is no eval data.

    Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively); a rank with fewer
    batches repeats its last one with zero weight.
    """
    local = list(batches) if batches is not None else []
    count = torch.tensor(len(local), device=accelerator.device)
    most = int(accelerator.reduce(count, reduction="max").item())
    if most == 0:
        return None
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, device=accelerator.device, dtype=torch.float64)  # loss, correct, predicted
    for index in range(most):
        weight = 1.0 if index < len(local) else 0.0
        batch = to_device(local[min(index, len(local) - 1)], accelerator.device) if local else None
        if batch is None:
            raise RuntimeError("a rank has no evaluation batches while others do; check the eval split")
        loss_sum, correct = prediction_loss(forward(model, batch), batch["targets"])
        n_pred = (batch["targets"] != IGNORE_INDEX).sum()
        sums += weight * torch.stack([loss_sum.double(), correct.double(), n_pred.double()])
    model.train(was_training)
    sums = accelerator.reduce(sums, reduction="sum")
    loss_sum, correct, n_pred = (v.item() for v in sums)
    return {
        "loss": loss_sum / max(n_pred, 1.0),
        "acc": correct / max(n_pred, 1.0),
        "pred_tokens": int(n_pred),
    }
