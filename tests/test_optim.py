"""Learning-rate schedule, weight-decay groups and the token-normalized loss."""

import pytest
import torch

from mpnet_dist.config import parse_config
from mpnet_dist.optim import build_optimizer, lr_at


def test_schedule_matches_reference_indexing():
    # reference test: warmup=2, total=4 -> 0.5, 1.0, 0.5 for steps 1..3, end lr at the last step
    assert [lr_at(k, 1.0, 2, 4) for k in (1, 2, 3, 4)] == [0.5, 1.0, 0.5, 0.0]
    assert lr_at(1, 1.0, 0, 5) == 1.0 and lr_at(5, 1.0, 0, 5) == 0.0
    assert lr_at(3, 1.0, 1, 5, end=0.1, power=2.0) == pytest.approx(0.9 * (1 - 2 / 4) ** 2 + 0.1)


def test_weight_decay_skips_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, parse_config(["--weight-decay", "0.05", "--total-updates", "10"]))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[1].weight)}
    assert len(no_decay["params"]) == 3  # linear bias, norm weight, norm bias
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6
