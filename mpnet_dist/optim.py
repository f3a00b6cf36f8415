"""Optimizer and learning-rate schedule, as the reference trainer: AdamW, linear warmup, polynomial decay."""

from __future__ import annotations

import torch
from torch import nn


def build_optimizer(model: nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (biases and norm weights are exempt).

    Tied parameters appear once: named_parameters() de-duplicates by identity.
    """
    params = dict(model.named_parameters())
    decay, no_decay = ([params[name] for name in names] for names in param_group_names(model))
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # Fused AdamW (CPU and CUDA kernels, torch >= 2.4) is decided here, before Accelerate moves the model to
    # its device, so it cannot key on where the parameters are now; it is faster than foreach on both.
    fused = all(p.is_floating_point() for p in decay + no_decay)
    return torch.optim.AdamW(
        groups,
        lr=lr_at(1, cfg.lr, cfg.resolved_warmup(), cfg.total_updates, cfg.end_learning_rate, cfg.power),
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.adam_eps,
        fused=fused,
    )


def param_group_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """(decay, no-decay) parameter names in the optimizer's order: the layout of its state, by group and index.

    Shapes are read from the module as built (call it before ZeRO-3 partitions the parameters, or on a copy
    built on the meta device).
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim == 1 or name.endswith(".bias") else decay).append(name)
    return decay, no_decay


def lr_at(step: int, peak: float, warmup: int, total: int, end: float = 0.0, power: float = 1.0) -> float:
    """Learning rate used for optimizer step `step` (1-based), applied before that step.

    Warmup: peak * step / warmup. Then (peak - end) * (1 - progress) ** power + end, with progress over the
    remaining steps; the reference's indexing, so lr never starts at 0 and reaches `end` at the last step.
    """
    if warmup > 0 and step <= warmup:
        return peak * step / warmup
    if warmup > 0:
        decay_step, decay_steps = step - warmup, total - warmup
    else:
        decay_step, decay_steps = step - 1, total - 1
    if decay_steps <= 0 or decay_step >= decay_steps:
        return end
    return (peak - end) * (1.0 - decay_step / decay_steps) ** power + end


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
