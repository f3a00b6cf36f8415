"""Scale-out with real `accelerate launch` processes on CPU (gloo).

One fresh run per backend is shared by every assertion about it (module-scoped fixtures):
- DDP, 2 processes: really 2-rank DDP; equals 1 process at twice the batch; its step-3 checkpoint resumes
  bitwise on two "machines" (two launches with --num_machines 2 on 127.0.0.1) and, at the same global batch,
  on 1 process, continuing the same data.
- ZeRO-2 and ZeRO-3: match DDP within ZERO_LOSS_TOL; resume to the same weights; ZeRO-3 really partitions
  the parameters; ZeRO-3 resumes on two "machines"; a ZeRO checkpoint on another world size is refused.
The launch helpers it uses are in tests/helpers.py, shared with test_launch_configs.py and test_slurm.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mpnet_dist.checkpoint import CheckpointError
from tests import corpus
from tests.helpers import (
    CONFIGS,
    NO_DROPOUT,
    finish_all,
    max_loss_diff,
    max_weight_diff,
    start,
    start_two_machines,
    tiny_args,
    train,
    train_losses,
    train_state,
    weights,
)

tiny_corpus = corpus.tiny_corpus  # session fixture: the corpus and tokenizer are built once

# Tiny test params stay whole under ZeRO-3's default persistence threshold (1e5 elements): force partitioning.
PARTITION_ALL = json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}})
DDP_LOSS_TOL = 1e-5  # 2 processes x batch b vs 1 process x batch 2b: only the reduction order differs
ZERO_LOSS_TOL = 1e-5  # ZeRO-2/3 vs DDP (same fp32 math, DeepSpeed's own clipping and bucketed reductions)
ZERO_WEIGHT_TOL = 1e-5


def _args(corpus, run_dir: Path, *extra: str) -> list[str]:
    return tiny_args(corpus, run_dir, *NO_DROPOUT, "--checkpoint-interval", "3", *extra)


def _from_step3(corpus, run_dir: Path, fresh: Path) -> list[str]:
    return _args(corpus, run_dir, "--resume-checkpoint", str(fresh / "step-00000003"))


@pytest.fixture(scope="module")
def runs(tiny_corpus, tmp_path_factory) -> dict:
    """Fresh 6-step runs (checkpoint at 3), then runs resumed from their step 3. Each phase runs its launches
    concurrently: a tiny run mostly waits on imports and gloo round trips, so 2 cores go further that way.

    ddp:   cpu_2proc.yaml, 2 processes x batch 4;   ddp_2m:   resumed on two "machines" (multinode_template.yaml)
    zero2: deepspeed_zero2.yaml;                     zero2_r:  resumed on the same node
    zero3: deepspeed_zero3.yaml, all params sharded; zero3_2m: resumed on two "machines" (standard launcher)
    """
    root = tmp_path_factory.mktemp("dist")
    dirs = {name: root / name for name in ("ddp", "zero2", "zero3", "ddp_2m", "zero2_r", "zero3_2m")}
    partition = {"MPNET_DIST_DEEPSPEED_OVERRIDES": PARTITION_ALL}
    port0 = ("--main_process_port", "0")
    fresh = [
        (start(CONFIGS / "cpu_2proc.yaml", _args(tiny_corpus, dirs["ddp"]), *port0, log=root / "ddp.log"),
         root / "ddp.log"),
        (start(CONFIGS / "deepspeed_zero2.yaml", _args(tiny_corpus, dirs["zero2"]), *port0,
               log=root / "zero2.log"), root / "zero2.log"),
        (start(CONFIGS / "deepspeed_zero3.yaml", _args(tiny_corpus, dirs["zero3"]), *port0,
               log=root / "zero3.log", **partition), root / "zero3.log"),
    ]  # fmt: skip
    finish_all(fresh)
    resumed = [
        # multinode_template.yaml is for GPU nodes (bf16); fp32 here so the result compares bit for bit.
        *start_two_machines(CONFIGS / "multinode_template.yaml", _from_step3(tiny_corpus, dirs["ddp_2m"],
                            dirs["ddp"]), "--mixed_precision", "no", log_dir=root / "ddp_2m_logs"),
        (start(CONFIGS / "deepspeed_zero2.yaml", _from_step3(tiny_corpus, dirs["zero2_r"], dirs["zero2"]),
               *port0, log=root / "zero2_r.log"), root / "zero2_r.log"),
        *start_two_machines(CONFIGS / "deepspeed_zero3.yaml", _from_step3(tiny_corpus, dirs["zero3_2m"],
                            dirs["zero3"]), "--deepspeed_multinode_launcher", "standard",
                            log_dir=root / "zero3_2m_logs", **partition),
    ]  # fmt: skip
    # A DDP checkpoint under DeepSpeed: must be refused with a message, not DeepSpeed's bare AssertionError.
    mismatch_log = root / "ddp_into_zero2.log"
    mismatch = start(CONFIGS / "deepspeed_zero2.yaml", _from_step3(tiny_corpus, root / "ddp_into_zero2", dirs["ddp"]),
                     *port0, log=mismatch_log)  # fmt: skip
    finish_all(resumed)
    mismatch.wait(timeout=300)
    dirs["mismatch"] = (mismatch.returncode, mismatch_log.read_text(errors="replace"))
    return dirs


def _log(run_dir: Path) -> str:
    return (run_dir.parent / f"{run_dir.name}.log").read_text(errors="replace")


@pytest.mark.slow
def test_ddp_is_two_rank_ddp_and_matches_one_process_at_twice_the_batch(runs, tiny_corpus, tmp_path):
    state = train_state(runs["ddp"])
    assert (state["distributed_type"], state["world_size"], state["zero_stage"]) == (
        "DistributedType.MULTI_CPU",
        2,
        0,
    )
    assert "MULTI_CPU, 2 process(es)" in _log(runs["ddp"])
    single = tmp_path / "single"
    assert train(tiny_args(tiny_corpus, single, *NO_DROPOUT, "--batch-size", "8")) == 0
    assert train_state(single)["world_size"] == 1
    two, one = train_losses(runs["ddp"]), train_losses(single)
    assert sorted(two) == sorted(one) == [1, 2, 3, 4, 5, 6]
    diff = max_loss_diff(two, one, range(1, 7))
    print(f"DDP 2x4 vs 1x8: max loss diff {diff:.2e}, max weight diff "
          f"{max_weight_diff(weights(runs['ddp']), weights(single)):.2e}")  # fmt: skip
    assert diff < DDP_LOSS_TOL


@pytest.mark.slow
def test_ddp_resumes_bitwise_on_two_machines(runs):
    """k=3 steps, then resume to N=6 with two single-process launches as two nodes: bitwise the 6-step run."""
    assert "resumed from" in (runs["ddp_2m"].parent / "ddp_2m_logs" / "machine0.log").read_text()
    full, again = train_losses(runs["ddp"]), train_losses(runs["ddp_2m"])
    assert sorted(again) == [4, 5, 6]
    assert all(again[s] == full[s] for s in (4, 5, 6)), (full, again)
    a, b = weights(runs["ddp"]), weights(runs["ddp_2m"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_state(runs["ddp_2m"])["world_size"] == 2


@pytest.mark.slow
def test_ddp_checkpoint_resumes_on_one_process_with_the_same_data(runs, tiny_corpus, tmp_path):
    """Same global batch (batch x update-freq x processes = 4 x 2 x 2 = 8 x 2 x 1): the block sequence goes on."""
    resumed = tmp_path / "one"
    args = tiny_args(tiny_corpus, resumed, *NO_DROPOUT, "--batch-size", "8", "--resume-checkpoint",
                     str(runs["ddp"] / "step-00000003"))  # fmt: skip
    assert train(args) == 0
    full, again = train_losses(runs["ddp"]), train_losses(resumed)
    assert sorted(again) == [4, 5, 6]
    diff = max_loss_diff(full, again, (4, 5, 6))
    wdiff = max_weight_diff(weights(runs["ddp"]), weights(resumed))
    print(f"DDP 2-process checkpoint resumed on 1 process: max loss diff {diff:.2e}, weights {wdiff:.2e}")
    assert diff < DDP_LOSS_TOL and wdiff < 1e-5
    data_full = torch.load(runs["ddp"] / "final" / "data_state_rank0.pt", weights_only=True)
    data_one = torch.load(resumed / "final" / "data_state_rank0.pt", weights_only=True)
    assert data_one["blocks_consumed"] == data_full["blocks_consumed"] == 6 * 2 * 8
    assert train_state(resumed)["tokens"] == train_state(runs["ddp"])["tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_is_deepspeed_with_two_ranks_and_matches_ddp(stage, runs):
    run = runs[f"zero{stage}"]
    state = train_state(run)
    assert (state["distributed_type"], state["world_size"], state["zero_stage"]) == (
        "DistributedType.DEEPSPEED", 2, stage)  # fmt: skip
    assert f"DEEPSPEED ZeRO-{stage}, 2 process(es)" in _log(run)
    diff = max_loss_diff(train_losses(runs["ddp"]), train_losses(run), range(1, 7))
    wdiff = max_weight_diff(weights(runs["ddp"]), weights(run))
    print(f"ZeRO-{stage} vs DDP: max loss diff {diff:.2e}, max weight diff {wdiff:.2e}")
    assert diff < ZERO_LOSS_TOL and wdiff < ZERO_WEIGHT_TOL


@pytest.mark.slow
@pytest.mark.parametrize("fresh, resumed", [("zero2", "zero2_r"), ("zero3", "zero3_2m")])
def test_zero_resume_matches_uninterrupted_run(fresh, resumed, runs):
    """ZeRO-2 resumes on the same node, ZeRO-3 on two "machines" (--deepspeed_multinode_launcher standard)."""
    full, again = train_losses(runs[fresh]), train_losses(runs[resumed])
    assert sorted(again) == [4, 5, 6]
    diff = max_loss_diff(full, again, (4, 5, 6))
    wdiff = max_weight_diff(weights(runs[fresh]), weights(runs[resumed]))
    print(f"{fresh} resumed ({resumed}): max loss diff {diff:.2e}, max weight diff {wdiff:.2e}")
    assert diff <= ZERO_LOSS_TOL and wdiff <= ZERO_WEIGHT_TOL


@pytest.mark.slow
def test_zero3_partitions_parameters(runs):
    """Each rank's checkpoint holds empty placeholders for every parameter and half of the fp32 master copy."""
    folder = runs["zero3"] / "step-00000003" / "pytorch_model"
    shares = []
    for rank in (0, 1):
        model = torch.load(folder / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", weights_only=False)
        zero_cfg = model["ds_config"]["zero_optimization"]
        assert zero_cfg["stage3_param_persistence_threshold"] == 0
        assert zero_cfg["stage3_gather_16bit_weights_on_model_save"] is True  # what export needs
        full = {name: shape.numel() for group in model["param_shapes"] for name, shape in group.items()}
        local = {name: t.numel() for name, t in model["module"].items() if name in full}
        assert local and all(local[n] < full[n] for n in local), local  # shards, not whole tensors
        optim = torch.load(folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False)
        shares.append(sum(t.numel() for t in optim["optimizer_state_dict"]["fp32_flat_groups"]))
    total = sum(full.values())
    assert all(share < total for share in shares) and sum(shares) >= total, (shares, total)


@pytest.mark.slow
def test_zero_checkpoint_on_another_world_size_is_refused(runs, tiny_corpus, tmp_path):
    args = _from_step3(tiny_corpus, tmp_path / "one", runs["zero2"])
    with pytest.raises(
        CheckpointError, match=r"ZeRO-2 on 2 processes.*Resume on 2 processes.*mpnet-dist export"
    ):
        train(args)


@pytest.mark.slow
def test_checkpoint_of_another_kind_is_refused_with_the_way_forward(runs):
    code, out = runs["mismatch"]
    assert code != 0
    assert "was written by DDP / a single process; this run uses DeepSpeed ZeRO-2" in out, out[-3000:]
    assert "mpnet-dist export" in out


def test_fsdp_on_a_cuda_less_host_is_refused(monkeypatch):
    from mpnet_dist.config import parse_config
    from mpnet_dist.distributed import build_accelerator

    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only refusal")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RuntimeError, match="deepspeed_zero3.yaml"):
        build_accelerator(parse_config(["--batch-size", "2"]))


@pytest.mark.parametrize(
    "flag, launcher, expected",
    [
        ("no", "bf16", "no"),  # the training flag wins
        (None, "bf16", "bf16"),  # a launch config's bf16 is honoured, on CPU too
        (None, "no", "bf16" if torch.cuda.is_available() else "no"),  # the launcher's "no" means "not set"
        (None, None, "bf16" if torch.cuda.is_available() else "no"),
    ],
)
def test_mixed_precision_precedence(monkeypatch, flag, launcher, expected):
    from mpnet_dist.distributed import resolve_mixed_precision

    if launcher is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    assert resolve_mixed_precision(flag) == expected
