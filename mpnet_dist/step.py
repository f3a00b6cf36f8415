"""One optimizer step over `update_freq` micro-batches, and evaluation.

Host syncs: a step that does not log reads the device once, at its end: the agreed counts, stop votes and
non-finite flag (one all-reduced vector, copied to the host while the backward is still queued). Everything
else stays on the device: the loss scale is a device tensor, a non-finite step is skipped by the fused
optimizer itself (`found_inf`), and the gradient norm is read only when the step logs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from mpnet_dist.data.batch import IGNORE_INDEX
from mpnet_dist.optim import set_lr


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/Inf losses more times in a row than --max-nonfinite-skips allows."""


@dataclass(frozen=True)
class StepSettings:
    """What one optimizer step takes besides the model, the optimizer and the batches."""

    lr: float
    clip_grad_norm: float  # 0: no clipping (the norm is still computed)
    stop_vote: bool = False  # this rank saw a stop request (preemption); agreed at this step's end
    read_grad_norm: bool = True  # bring the gradient norm to the host (one more sync): log steps only


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # summed CE (nats) over this rank's predicted tokens, on device
    correct: torch.Tensor
    n_pred_global: int
    n_tokens_global: int
    grad_norm: float | None  # None unless settings.read_grad_norm
    skipped: bool  # non-finite loss: no update applied
    stop_requested: bool  # some rank asked to stop (preemption); agreed at this boundary


def forward(model, batch: dict[str, torch.Tensor], targets: torch.Tensor | None = None):
    """Logits [B, p, V]; with targets, what the model returns for them (see batch_loss)."""
    p = batch["targets"].shape[1]
    return model(batch["input_ids"], batch["positions"], p, batch.get("padding_mask"), targets)


def batch_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy over the predicted tokens, correct predictions) of one micro-batch: the same as
    prediction_loss(forward(model, batch), targets), with the LM head and the loss fused where that is faster."""
    return forward(model, batch, batch["targets"])


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def local_counts(
    batches: list[dict[str, torch.Tensor]], stop_vote: bool, device: torch.device
) -> torch.Tensor:
    """[predicted tokens, non-padding input tokens (specials included), stop vote] of this rank: [3] fp64.

    Computed on the device from the batches there: no host round trip.
    """
    n_pred = sum((b["targets"] != IGNORE_INDEX).sum() for b in batches)
    n_tokens = sum(count_input_tokens(b) for b in batches)
    stop = torch.full((), float(stop_vote), dtype=torch.float64, device=device)
    return torch.stack([n_pred.double(), n_tokens.double(), stop])


def count_input_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Non-padding tokens of the original (unpermuted) rows, specials included: a 0-dim tensor on the batch's
    device (no host read)."""
    p = batch["targets"].shape[1]
    rows, total = batch["input_ids"].shape
    length = total - 2 * p
    if "padding_mask" not in batch:
        return torch.full((), rows * length, dtype=torch.float64, device=batch["input_ids"].device)
    return (~batch["padding_mask"][:, :length]).sum()


def train_step(
    accelerator: Accelerator,
    model,
    optimizer,
    micro_batches: list[dict[str, torch.Tensor]],
    settings: StepSettings,
) -> StepResult:
    device = accelerator.device
    batches = [to_device(b, device) for b in micro_batches]  # no-op for batches the prefetcher moved
    # One all-reduce: global predicted-token count (the loss denominator), input tokens, and the stop votes.
    counts = accelerator.reduce(local_counts(batches, settings.stop_vote, device), reduction="sum")
    # Accelerate divides by update_freq and DDP/DeepSpeed average over ranks; undo both so the gradient is
    # exactly d(sum of CE over all predicted tokens of the step, all ranks) / n_pred_global.
    ranks = accelerator.gradient_accumulation_steps * accelerator.num_processes
    scale = (ranks / counts[0].clamp(min=1.0)).float()  # device scalar: no sync before backward
    set_lr(optimizer, settings.lr)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    loss_total = torch.zeros((), device=device)
    correct_total = torch.zeros((), device=device, dtype=torch.long)
    agreed, norm = None, None
    for index, batch in enumerate(batches):
        with accelerator.accumulate(model):
            loss_sum, correct = batch_loss(model, batch)
            loss_total = loss_total + loss_sum.detach()
            correct_total = correct_total + correct
            if index == len(batches) - 1:
                agreed = _agree_on_finite(accelerator, counts, loss_total)
                if deepspeed:
                    _stop_on_nonfinite(agreed.values())
            # Backward runs even on a skipped step so DDP's reducer sees the usual sequence of collectives;
            # the optimizer then drops the poisoned gradients instead of applying them.
            accelerator.backward(loss_sum * scale)
            if accelerator.sync_gradients and (settings.read_grad_norm or not deepspeed):
                norm = accelerator.clip_grad_norm_(model.parameters(), settings.clip_grad_norm or math.inf)
            _optimizer_step(optimizer, agreed)
            optimizer.zero_grad(set_to_none=True)
    n_pred, n_tokens, stops, bad = agreed.values()  # the step's one host sync (no-op if read above)
    grad_norm = float(norm) if settings.read_grad_norm and norm is not None else None
    return StepResult(loss_total, correct_total, int(n_pred), int(n_tokens), grad_norm, bad > 0, stops > 0)


class _Agreed:
    """The all-reduced [n_pred, n_tokens, stop votes, non-finite ranks], copied to the host asynchronously."""

    def __init__(self, flags: torch.Tensor) -> None:
        self.device_flags = flags  # [4] fp64 on the device
        self.bad = flags[3].float()  # fp32 scalar: what the fused optimizer reads as found_inf
        # Start the copy now: reading it later waits only for the work queued before this point, not for
        # the backward and optimizer queued after it.
        self._host = flags.to("cpu", non_blocking=True)
        self._event = None
        if flags.device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()
        self._values: list[float] | None = None

    def values(self) -> list[float]:
        if self._values is None:
            if self._event is not None:
                self._event.synchronize()
            self._values = self._host.tolist()  # host sync
        return self._values


def _agree_on_finite(accelerator: Accelerator, counts: torch.Tensor, loss_total: torch.Tensor) -> _Agreed:
    bad = (~torch.isfinite(loss_total)).double()[None]  # [1]
    bad = accelerator.reduce(bad, reduction="sum")
    return _Agreed(torch.cat([counts, bad]))


def _skips_on_device(optimizer) -> bool:
    """Fused torch optimizers take `found_inf` and skip the update (and the step count) on the device."""
    return getattr(_inner(optimizer), "_step_supports_amp_scaling", False)


def _inner(optimizer):
    while hasattr(optimizer, "optimizer"):  # Accelerate's wrapper
        optimizer = optimizer.optimizer
    return optimizer


def _stop_on_nonfinite(values: list[float]) -> None:
    if values[3] > 0:
        # DeepSpeed has already accumulated this step's earlier micro-batches in its own buffers and offers no
        # way to drop them, so a step cannot be skipped cleanly: stop instead (the last checkpoint stays good).
        raise NonFiniteLossError(
            "non-finite loss under DeepSpeed: stopping without saving; resume from the last checkpoint "
            "(consider a lower --lr, --clip-grad-norm, or bf16 instead of fp16)."
        )


def _optimizer_step(optimizer, agreed: _Agreed | None) -> None:
    """optimizer.step(), skipped where any rank's loss was not finite (known only on the last micro-batch)."""
    if agreed is None:  # an accumulation micro-batch: Accelerate's wrapper does not step
        optimizer.step()
        return
    if _skips_on_device(optimizer):
        inner = _inner(optimizer)
        inner.found_inf = agreed.bad  # an fp16 GradScaler replaces it with its own (inf/NaN in the gradients)
        try:
            optimizer.step()
        finally:
            vars(inner).pop("found_inf", None)  # the GradScaler deletes it itself
    elif not agreed.values()[3] > 0:  # host check (read once, before the step)
        optimizer.step()


@torch.no_grad()
def evaluate(accelerator: Accelerator, model, batches) -> dict[str, float] | None:
    """Mean CE (nats) and accuracy over all ranks' eval batches; None when there is no eval data.

    Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively); a rank with fewer
    batches repeats its last one with zero weight. A compiled model evaluates eagerly: evaluation is rare,
    and compiling its graphs (no grad, eval mode, a shorter last batch) would cost more than it saves.
    """
    local = list(batches) if batches is not None else []
    count = torch.tensor(len(local), device=accelerator.device)
    most = int(accelerator.reduce(count, reduction="max").item())
    if most == 0:
        return None
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, device=accelerator.device, dtype=torch.float64)  # loss, correct, predicted
    with torch.compiler.set_stance("force_eager"):
        for index in range(most):
            weight = 1.0 if index < len(local) else 0.0
            batch = to_device(local[min(index, len(local) - 1)], accelerator.device) if local else None
            if batch is None:
                raise RuntimeError("a rank has no evaluation batches while others do; check the eval split")
            loss_sum, correct = batch_loss(model, batch)
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
