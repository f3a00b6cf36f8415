"""step.py: one optimizer step over several micro-batches, and evaluation, on a single CPU process; its host
reads per step, and its update against a plain PyTorch step."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.overrides import TorchFunctionMode

from mpnet_dist.config import parse_config
from mpnet_dist.data.batch import IGNORE_INDEX, MaskingSpec, make_mpnet_batch
from mpnet_dist.loss import prediction_loss
from mpnet_dist.optim import build_optimizer
from mpnet_dist.step import StepSettings, count_input_tokens, evaluate, forward, train_step
from tests.helpers import prepared_step, reset_accelerate, step_micro_batches, tiny_model

SPEC = MaskingSpec(mask_id=99, pad_id=1, special_ids=(0, 1, 2, 3), vocab_size=100)


def batch(rows: int, seed: int, pad_from: int | None = None) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, 99, size=(rows, 16))
    if pad_from is not None:
        tokens[:, pad_from:] = SPEC.pad_id
    return make_mpnet_batch(tokens, None, np.arange(rows, dtype=np.uint64) + seed, SPEC)


def step_weights(micro_batches: list[dict[str, torch.Tensor]], clip: float) -> dict[str, torch.Tensor]:
    reset_accelerate()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=len(micro_batches))
    model = tiny_model(seed=3).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer = accelerator.prepare(model, optimizer)
    result = train_step(accelerator, model, optimizer, micro_batches, StepSettings(0.5, clip))
    assert not result.skipped and not result.stop_requested
    assert result.n_pred_global == sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in micro_batches)
    return {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}


def test_count_input_tokens_counts_unpadded_tokens_only():
    assert count_input_tokens(batch(3, 0)) == 3 * 16
    assert count_input_tokens(batch(3, 0, pad_from=10)) == 3 * 10


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_micro_batches_step_like_one_batch(clip):
    """Loss / predicted tokens of the whole step: two micro-batches of different prediction counts update the
    weights as their concatenation does in one (with and without clipping)."""
    a, b = batch(2, 1), batch(3, 2, pad_from=12)
    a["padding_mask"] = torch.zeros_like(b["padding_mask"][:2])
    p = max(a["targets"].shape[1], b["targets"].shape[1])
    assert a["targets"].shape[1] == b["targets"].shape[1] == p  # same L: one p for both
    joined = {k: torch.cat([a[k], b[k]]) for k in a}
    split, whole = step_weights([a, b], clip), step_weights([joined], clip)
    assert all(torch.allclose(split[k], whole[k], atol=1e-6) for k in whole)
    assert any(not torch.equal(split[k], tiny_model(seed=3).state_dict()[k]) for k in split)  # it did step


def test_evaluate_is_the_mean_over_all_predicted_tokens_and_none_without_data():
    reset_accelerate()
    accelerator = Accelerator(cpu=True)
    model = tiny_model(seed=4)
    batches = [batch(2, 5), batch(3, 6, pad_from=9)]
    assert evaluate(accelerator, model, None) is None and evaluate(accelerator, model, []) is None
    result = evaluate(accelerator, model, batches)
    with torch.no_grad():
        sums = [prediction_loss(forward(model, x), x["targets"])[0] for x in batches]
    n_pred = sum(int((x["targets"] != IGNORE_INDEX).sum()) for x in batches)
    assert result["pred_tokens"] == n_pred
    assert result["loss"] == pytest.approx(float(sum(sums)) / n_pred, rel=1e-6)
    assert model.training is False  # evaluate restores the mode it found


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


@pytest.mark.parametrize("logs, expected", [(False, 1), (True, 2)])
def test_one_host_read_per_step_unless_it_logs(logs, expected):
    accelerator, model, optimizer = prepared_step(update_freq=2)
    settings = StepSettings(lr=0.01, clip_grad_norm=1.0, read_grad_norm=logs)
    train_step(
        accelerator, model, optimizer, step_micro_batches(2), settings
    )  # first step: optimizer state built
    with HostReads() as counter:
        result = train_step(accelerator, model, optimizer, step_micro_batches(2, seed=5), settings)
    assert len(counter.reads) == expected, counter.reads
    assert (result.grad_norm is not None) == logs
    assert result.n_pred_global == 2 * 3 * 4 and result.n_tokens_global == 2 * 3 * 12
    assert not result.skipped and not result.stop_requested


def test_step_equals_a_plain_pytorch_step():
    """Summed CE over both micro-batches / predicted tokens, clipped to 1, one AdamW step: same weights."""
    accelerator, model, optimizer = prepared_step(update_freq=2)
    reference = copy.deepcopy(accelerator.unwrap_model(model))
    ref_optimizer = build_optimizer(reference, parse_config(["--lr", "0.01", "--total-updates", "10"]))
    batches = step_micro_batches(2, seed=3)
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
