"""launch_configs/accelerate/*.yaml: every file loads and parses with Accelerate; every CPU-runnable one trains.

Which test trains which config (real `accelerate launch` processes on CPU):
    cpu_2proc, deepspeed_zero2, deepspeed_zero3, multinode_template   tests/test_distributed.py
    ddp_8gpu (as --num_processes 2 under SLURM)                         tests/test_slurm.py
    deepspeed_zero1, deepspeed_zero3_offload, single_gpu                 here
    fsdp_8gpu                                                           GPU only: refused on CPU (test_distributed)
"""

from __future__ import annotations

import math

import pytest
import torch

from mpnet_dist.metrics import read_metrics
from tests import corpus
from tests.helpers import (
    CONFIGS,
    NO_DROPOUT,
    assert_loads_and_matches,
    finish_all,
    start,
    tiny_args,
    train_state,
    weights,
)

tiny_corpus = corpus.tiny_corpus  # session fixture

ALL = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
GPU_ONLY = {"fsdp_8gpu"}
TRAINED_ELSEWHERE = {"cpu_2proc", "deepspeed_zero2", "deepspeed_zero3", "multinode_template", "ddp_8gpu"}
TRAINED_HERE = {"deepspeed_zero1", "deepspeed_zero3_offload", "single_gpu"}


def _yaml(name: str) -> dict:
    import yaml

    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


def test_the_expected_configs_exist_and_each_is_trained_somewhere():
    assert set(ALL) == TRAINED_HERE | TRAINED_ELSEWHERE | GPU_ONLY


@pytest.mark.parametrize("name", ALL)
def test_config_loads_with_accelerate_and_says_what_it_is_for(name):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = CONFIGS / f"{name}.yaml"
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and len(first) > 30, (
        f"{path}: the first line must say what the config is for"
    )
    config = load_config_from_file(str(path))
    # The same parse `accelerate launch --config_file X` does before it starts anything.
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "mpnet_dist.train"])
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes == config.num_processes
    kind = str(config.distributed_type)
    if "deepspeed" in name:
        assert kind.endswith("DEEPSPEED") and args.use_deepspeed
        # srun starts one launcher per node: the default pdsh launcher would make every node a world of one.
        assert args.deepspeed_multinode_launcher == "standard"
        # Accumulation, clipping and micro-batch come from the training flags (the factory overwrites them).
        assert _yaml(name)["deepspeed_config"]["gradient_accumulation_steps"] == 1
    if name.startswith("deepspeed_zero3"):
        assert str(args.zero3_save_16bit_model).lower() == "true", (
            "ZeRO-3 export needs the 16-bit gather on save"
        )
    if name == "fsdp_8gpu":
        from mpnet_dist.model import mpnet

        layer = _yaml(name)["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"]
        assert kind.endswith("FSDP") and hasattr(mpnet, layer), layer
    if name in ("cpu_2proc", "ddp_8gpu", "multinode_template"):
        # MULTI_GPU is the launcher that starts N processes; the factory turns them into CPU DDP without CUDA.
        assert kind.endswith("MULTI_GPU") and args.multi_gpu


def test_offload_config_offloads_parameters_and_optimizer():
    ds = _yaml("deepspeed_zero3_offload")["deepspeed_config"]
    assert (ds["zero_stage"], ds["offload_param_device"], ds["offload_optimizer_device"]) == (3, "cpu", "cpu")


@pytest.fixture(scope="module")
def config_runs(tiny_corpus, tmp_path_factory) -> dict:
    """The configs not trained elsewhere, 4 steps each, launched concurrently (see test_distributed.runs)."""
    root = tmp_path_factory.mktemp("configs")
    runs = {name: root / name for name in sorted(TRAINED_HERE)}
    extra = {
        "deepspeed_zero1": ((), {}),
        # Written for 8 GPUs; 2 CPU processes here. DeepSpeed would swap AdamW for its CPUAdam, a C++ op that
        # takes minutes to compile on a 2-core machine: keep torch AdamW (same offload code paths otherwise).
        "deepspeed_zero3_offload": (
            ("--num_processes", "2"),
            {"MPNET_DIST_DEEPSPEED_OVERRIDES": '{"zero_force_ds_cpu_optimizer": false}'},
        ),
        "single_gpu": ((), {}),
    }
    procs = []
    for name, run_dir in runs.items():
        flags, env = extra[name]
        args = tiny_args(
            tiny_corpus, run_dir, *NO_DROPOUT, "--total-updates", "4", "--eval-interval-steps", "0"
        )
        log = root / f"{name}.log"
        procs.append(
            (start(CONFIGS / f"{name}.yaml", args, "--main_process_port", "0", *flags, log=log, **env), log)
        )
    finish_all(procs)
    return {
        name: (run_dir, (root / f"{name}.log").read_text(errors="replace")) for name, run_dir in runs.items()
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, kind, world, stage, precision",
    [
        ("deepspeed_zero1", "DEEPSPEED", 2, 1, "no"),
        ("deepspeed_zero3_offload", "DEEPSPEED", 2, 3, "bf16"),  # the config's bf16 is honoured, on CPU too
        ("single_gpu", "NO", 1, 0, "bf16"),
    ],
)
def test_cpu_runnable_config_trains(config_runs, name, kind, world, stage, precision):
    run_dir, out = config_runs[name]
    state = train_state(run_dir)
    assert (state["distributed_type"], state["world_size"], state["zero_stage"], state["step"]) == (
        f"DistributedType.{kind}",
        world,
        stage,
        4,
    )
    assert f"mixed precision {precision}" in out
    losses = [r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses), losses
    if stage:
        sd = weights(run_dir)  # ZeRO shards consolidate offline to fp32 (the export path for a dead job)
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in sd.values())
    if name == "deepspeed_zero3_offload":
        model_states = run_dir / "final" / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
        zero = torch.load(model_states, weights_only=False)["ds_config"]["zero_optimization"]
        assert zero["offload_param"]["device"] == zero["offload_optimizer"]["device"] == "cpu"


@pytest.mark.slow
def test_zero1_checkpoint_exports_and_verifies(config_runs, tmp_path):
    """ZeRO-1 is the one checkpoint kind test_export.py does not train itself: export its final checkpoint."""
    from mpnet_dist.export import export_checkpoint

    run_dir, _ = config_runs["deepspeed_zero1"]
    export_checkpoint(run_dir / "final", tmp_path / "hf")  # verifies itself; raises above tolerance
    assert assert_loads_and_matches(tmp_path / "hf", run_dir / "final") < 1e-4
