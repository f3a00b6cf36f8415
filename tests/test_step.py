"""train_step: device-to-host reads per optimizer step, and the update against a plain PyTorch step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.overrides import TorchFunctionMode

from mpnet_dist.config import parse_config
from mpnet_dist.optim import build_optimizer
from mpnet_dist.step import StepSettings, train_step
from tests.corpus import reset_accelerate
from tests.test_model import random_batch, tiny_model

# Every way Python code reads a tensor's value on the host (on CUDA each one waits for the device).
HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"}


class HostReads(TorchFunctionMode):
    """Counts host reads of tensor values made by Python code (ours, Accelerate's, torch.optim's...)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def micro_batches(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    batches = []
    for index in range(count):
        input_ids, positions = random_batch(3, 12, 4, seed=seed + index)
        batches.append({"input_ids": input_ids, "positions": positions, "targets": input_ids[:, -4:].clone()})
    return batches


def prepared(update_freq: int, cpu: bool = True):
    reset_accelerate()
    accelerator = Accelerator(cpu=cpu, gradient_accumulation_steps=update_freq)
    model = tiny_model().train()
    optimizer = build_optimizer(model, parse_config(["--lr", "0.01", "--total-updates", "10"]))
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


@pytest.mark.parametrize("logs, expected", [(False, 1), (True, 2)])
def test_one_host_read_per_step_unless_it_logs(logs, expected):
    accelerator, model, optimizer = prepared(update_freq=2)
    settings = StepSettings(lr=0.01, clip_grad_norm=1.0, read_grad_norm=logs)
    train_step(accelerator, model, optimizer, micro_batches(2), settings)  # first step: optimizer state built
    with HostReads() as counter:
        result = train_step(accelerator, model, optimizer, micro_batches(2, seed=5), settings)
    assert len(counter.reads) == expected, counter.reads
    assert (result.grad_norm is not None) == logs
    assert result.n_pred_global == 2 * 3 * 4 and result.n_tokens_global == 2 * 3 * 12
    assert not result.skipped and not result.stop_requested


def test_step_equals_a_plain_pytorch_step():
    """Summed CE over both micro-batches / predicted tokens, clipped to 1, one AdamW step: same weights."""
    accelerator, model, optimizer = prepared(update_freq=2)
    reference = copy.deepcopy(accelerator.unwrap_model(model))
    ref_optimizer = build_optimizer(reference, parse_config(["--lr", "0.01", "--total-updates", "10"]))
    batches = micro_batches(2, seed=3)
    settings = StepSettings(lr=0.01, clip_grad_norm=1.0)
    result = train_step(accelerator, model, optimizer, batches, settings)

    total = sum(
        F.cross_entropy(reference(b["input_ids"], b["positions"], 4).flatten(0, 1), b["targets"].flatten(),
                        reduction="sum")
        for b in batches
    )  # fmt: skip
    (total / 24).backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    ref_optimizer.step()
    assert result.grad_norm == pytest.approx(norm.item(), rel=1e-5)
    assert float(result.loss_sum) == pytest.approx(total.item(), rel=1e-6)
    got = accelerator.unwrap_model(model).state_dict()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(got[name], tensor, atol=1e-6, rtol=1e-5, msg=name)
